"""Kill a piece of mmel at a named crash point and look at what it left: the crash tests' tools.

Every kill is a real SIGKILL at a `mmel.core.crashpoints` stage, so no cleanup code runs:
- `run_killed_at` forks this process and arms the child, which runs a library call; the child
  shares the parent's loaded backbone, so a kill point costs about a second (the fast tests);
- `run_cli` runs an `mmel` command line in a child forked from this process (its imports already
  done) or, with `fresh_process`, in a new `python -m mmel` process (bench/crash_runs.py).

`index_snapshot` is what "the same index" means: the QIDs in every part, the stored entities, the
change log (without times), the cache segments, the BM25 rows, the files, and the ranked candidates
of some queries. `leftovers` lists what no finished command may leave behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmel.core.crashpoints import CRASH_AT_VARIABLE, TRACE_VARIABLE
from mmel.core.paths import read_json
from mmel.lexical.bm25 import BM25Index
from mmel.retrieval.edit_journal import JOURNAL_FILE, STAGED_DIR
from mmel.retrieval.entity_cache import SEGMENT_NAME, SEGMENTS_FILE
from mmel.retrieval.index import VectorIndex
from mmel.retrieval.index_build import BM25_DIR, CACHE_DIR, ENTITIES_FILE, VECTORS_DIR, read_manifest
from mmel.retrieval.kb_store import EntityStore
from mmel.retrieval.linker import Linker

CHILD_LIMIT_S = 600      # a child still running after this long is hung: it is killed and the test fails
_DEBRIS = re.compile(r"\..+\.(?:[a-z0-9_]{8}\.tmp|old)|.+\.sqlite-(?:wal|shm|journal)")


# --- killing ---------------------------------------------------------------------------------------

def run_killed_at(stage: str, action: Callable[[], object]) -> None:
    """Run `action` in a forked child that SIGKILLs itself at `stage`; fail unless it died exactly so."""
    status = _in_child(_exit_code_zero(action), {CRASH_AT_VARIABLE: stage})
    if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
        raise AssertionError(f"the child did not die at stage {stage!r}: {_describe(status)}")


def traced_stages(action: Callable[[], object], trace_file: Path) -> list[str]:
    """Run `action` to the end in a forked child and return the crash points it passed, as '<stage>#<n>'."""
    trace_file.unlink(missing_ok=True)
    status = _in_child(_exit_code_zero(action), {TRACE_VARIABLE: str(trace_file)})
    if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
        raise AssertionError(f"the traced run failed: {_describe(status)}")
    return numbered(trace_file.read_text().splitlines() if trace_file.is_file() else [])


def numbered(stages: Sequence[str]) -> list[str]:
    """'<stage>#<n>' for the n-th time each stage appears, in order (what MMEL_CRASH_AT accepts)."""
    seen: dict[str, int] = {}
    result = []
    for stage in stages:
        seen[stage] = seen.get(stage, 0) + 1
        result.append(f"{stage}#{seen[stage]}")
    return result


@dataclass
class CommandResult:
    returncode: int     # the exit code, or minus the signal that killed the command (-9: SIGKILL)
    stdout: str
    stderr: str


def run_cli(arguments: Sequence[str], *, crash_at: str | None = None, trace: Path | None = None,
            fresh_process: bool = False, cwd: Path | None = None) -> CommandResult:
    """Run `mmel <arguments>`, armed to die at `crash_at` and/or tracing its stages into `trace`."""
    environment = {CRASH_AT_VARIABLE: crash_at, TRACE_VARIABLE: None if trace is None else str(trace)}
    if fresh_process:
        return _run_fresh(arguments, environment, cwd)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        def command() -> int:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            if cwd is not None:
                os.chdir(cwd)
            return _cli_exit_code(arguments)

        status = _in_child(command, environment)
        out.seek(0)
        err.seek(0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return CommandResult(code, out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def _cli_exit_code(arguments: Sequence[str]) -> int:
    """Run the mmel command line as `mmel` does (click's standalone mode), returning its exit code."""
    import typer

    from mmel.cli.main import app

    try:
        typer.main.get_command(app).main(args=list(arguments), prog_name="mmel", standalone_mode=True)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    return 0


def _run_fresh(arguments: Sequence[str], environment: dict[str, str | None], cwd: Path | None) -> CommandResult:
    env = {key: value for key, value in os.environ.items() if key not in environment}
    env.update({key: value for key, value in environment.items() if value is not None})
    done = subprocess.run([sys.executable, "-m", "mmel", *arguments], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=CHILD_LIMIT_S, check=False)
    return CommandResult(done.returncode, done.stdout, done.stderr)


def _exit_code_zero(action: Callable[[], object]) -> Callable[[], int]:
    def body() -> int:
        action()
        return 0
    return body


def _in_child(body: Callable[[], int], environment: dict[str, str | None]) -> int:
    """Fork; the child sets `environment` (None: unset), runs `body` single-threaded and exits with its code.

    Single-threaded (torch and FAISS) because OpenMP thread pools do not survive a fork.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:   # the child: never return into the caller's code (pytest), whatever happens
        code = 70
        try:
            import faiss
            import torch

            torch.set_num_threads(1)
            faiss.omp_set_num_threads(1)
            for key, value in environment.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            code = body()
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return _wait(pid)


def _wait(pid: int) -> int:
    deadline = time.monotonic() + CHILD_LIMIT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the child was still running after {CHILD_LIMIT_S} s: hung")
        time.sleep(0.02)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit code {os.WEXITSTATUS(status)} (0: the stage was never reached)"


# --- looking ---------------------------------------------------------------------------------------

def index_snapshot(directory: Path, queries: Sequence[tuple[str, str]], *, backbone: Any = None) -> dict[str, Any]:
    """Everything two runs must agree on for their indexes to count as the same (see the module docstring)."""
    directory = Path(directory)
    with Linker.load(directory, backbone=backbone) as linker:
        ranked = [[(c.qid, round(c.score, 5)) for c in linker.link(sentence, mention=mention, top_k=5).candidates]
                  for sentence, mention in queries]
        info = linker.info()
    manifest = read_manifest(directory)
    with EntityStore.open(directory / ENTITIES_FILE) as store:
        entities = [(e.qid, e.name, e.attributes, e.description, e.images) for e in store]
    listing = read_json(directory / CACHE_DIR / SEGMENTS_FILE)
    bm25 = BM25Index.load(directory / BM25_DIR).qids if (directory / BM25_DIR).is_dir() else None
    return {
        "ranked": ranked, "entities": entities, "vector_qids": VectorIndex.load(directory / VECTORS_DIR).qids(),
        "bm25_qids": bm25, "revision": manifest.get("revision", 0),
        "changes": [{k: v for k, v in change.items() if k != "time"} for change in manifest.get("changes", [])],
        "segments": listing["segments"], "cache_rows_on_disk": info["cache_rows_on_disk"],
        "files": sorted(str(path.relative_to(directory)) for path in directory.rglob("*")),
    }


def leftovers(directory: Path) -> list[str]:
    """What a killed command may leave and the next one must remove: temporary and old copies, SQLite
    side files, an edit journal or its staged inputs, and cache segments the listing does not name."""
    directory = Path(directory)
    inside = [path for path in directory.rglob("*") if _DEBRIS.fullmatch(path.name)]
    beside = [path for path in directory.parent.iterdir()
              if path.name.startswith(f".{directory.name}.") and _DEBRIS.fullmatch(path.name)]
    found = [str(path.relative_to(directory.parent)) for path in inside + beside]
    found += [name for name in (JOURNAL_FILE, STAGED_DIR) if (directory / name).exists()]
    listing = directory / CACHE_DIR / SEGMENTS_FILE
    if listing.is_file():
        listed = {info["name"] for info in read_json(listing)["segments"]}
        found += [f"{CACHE_DIR}/{path.name}" for path in (directory / CACHE_DIR).iterdir()
                  if SEGMENT_NAME.fullmatch(path.name) and path.name not in listed]
    return sorted(found)
