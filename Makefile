# The README's two commands: `make demo` (main job on the shipped example data) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A local CPU build of torch 2.13.0 lies in /opt/wheels on this project's machines; elsewhere pip
# takes it from PyPI.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: setup demo test lint browser clean

$(BIN)/mmel: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(FIND_LINKS) "torch==2.13.0"
	$(BIN)/pip install --quiet $(FIND_LINKS) -e ".[dev]"
	touch $(BIN)/mmel

setup: $(BIN)/mmel

# Headless Chromium for the web-page test (Debian's package; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

demo: setup
	$(BIN)/mmel demo

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports

test: setup browser lint
	$(BIN)/pytest -n 2 --dist loadgroup -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
