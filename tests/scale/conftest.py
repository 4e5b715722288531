"""Fixtures for the scale-out tests: one private single-node Ray (2 workers) for the whole session.

Ray starts in a few seconds and its worker processes import torch once, so every Ray test shares
the one engine; the tests are marked `ray` (deselect with `-m "not ray"`) and grouped on one
pytest-xdist worker (`xdist_group`), so `make test` starts Ray once.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

RAY_WORKERS = 2


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ray: uses the session's private local Ray (2 CPUs)")
    config.addinivalue_line("markers", "xdist_group(name): pytest-xdist runs a group's tests on one worker")


@pytest.fixture(scope="session")
def ray_engine() -> Iterator:
    """A RayEngine with two workers on a private single-node Ray, shut down after the session."""
    from mmel.scale.ray_engine import RayEngine

    with RayEngine(RAY_WORKERS) as engine:
        yield engine


@pytest.fixture(autouse=True)
def workers_can_unpickle_this_test_module(request: pytest.FixtureRequest) -> None:
    """Ray workers cannot import test modules (they are not on the workers' path): the worker
    factories a test module (or its helper module here) defines travel by value instead
    (cloudpickle's documented switch)."""
    if "ray_engine" in request.fixturenames:
        from ray import cloudpickle

        here = Path(__file__).parent
        for module in list(sys.modules.values()):
            if Path(getattr(module, "__file__", None) or "/").parent == here:
                cloudpickle.register_pickle_by_value(module)
