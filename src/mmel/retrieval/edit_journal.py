"""The write-ahead journal of an index edit, its staged inputs, and the lock that serialises edits.

An edit (`mmel index add/remove/compact`) changes up to five parts of an index directory, each one
atomically but not all at once: the reranker cache, the entity store, the vectors, BM25 and the
manifest. Before the first part changes, the edit writes `edit-journal.json` (atomically): the
operation, its QIDs, the revision it produces, the report it gives and the cache segments listed
before it. An add first stages its entities and vectors in `edit-staged/`, so finishing it needs
neither the model nor the backbone nor the input files. The journal goes last, after the manifest;
`mmel.retrieval.kb_edits` writes it, applies the edit and recovers from it.

Processes: edits and recovery hold an exclusive `flock` on the index directory itself (no lock
file to leave behind), so recovery never mistakes another process's edit in progress for an
interrupted one. The kernel drops the lock when its holder dies, kill -9 included.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmel.core.errors import DataError
from mmel.core.paths import atomic_directory, atomic_write_json, read_json
from mmel.core.types import Entity
from mmel.retrieval.kb_store import EntityStore

logger = logging.getLogger(__name__)

JOURNAL_FILE = "edit-journal.json"
STAGED_DIR = "edit-staged"
_STAGED_ENTITIES = "entities.sqlite"
_STAGED_VECTORS = "vectors.npy"
OPERATIONS = ("add", "remove", "compact")


@dataclass
class EditJournal:
    """What an edit in progress changes: enough to finish it, or to see that it never started."""

    operation: str                 # one of OPERATIONS
    revision: int                  # manifest revision once the edit is done (compact: unchanged)
    request: str                   # digest of the request, so a rerun of the same command is recognised
    qids: list[str]
    report: dict[str, Any]         # what the edit reports (counts, image problems of an add)
    segments_before: list[str] = field(default_factory=list)   # cache segments listed before the edit

    def write(self, directory: Path) -> None:
        atomic_write_json(Path(directory) / JOURNAL_FILE, asdict(self), indent=None)

    @classmethod
    def read(cls, directory: Path) -> EditJournal | None:
        """The journal of an interrupted edit, or None when there is none."""
        path = Path(directory) / JOURNAL_FILE
        if not path.is_file():
            return None
        raw = read_json(path)
        try:
            journal = cls(**raw)
        except TypeError as error:
            raise DataError(f"malformed edit journal: {error}", path=path) from None
        if journal.operation not in OPERATIONS:
            raise DataError(f"unknown edit operation {journal.operation!r}", path=path)
        return journal


def clear_journal(directory: Path) -> None:
    """End an edit: drop its staged inputs, then the journal (the last thing an edit removes)."""
    directory = Path(directory)
    shutil.rmtree(directory / STAGED_DIR, ignore_errors=True)
    (directory / JOURNAL_FILE).unlink(missing_ok=True)


def stage_added_entities(directory: Path, entities: Sequence[Entity], vectors: np.ndarray) -> None:
    """Keep an add's entities and first-stage vectors [N, D] in the index, so recovery can finish it."""
    with atomic_directory(Path(directory) / STAGED_DIR) as tmp:
        EntityStore.create(tmp / _STAGED_ENTITIES, entities, progress=False).close()
        np.save(tmp / _STAGED_VECTORS, np.asarray(vectors, dtype=np.float32), allow_pickle=False)


def read_staged_entities(directory: Path) -> tuple[list[Entity], np.ndarray]:
    """The entities and vectors [N, D] that `stage_added_entities` kept."""
    staged = Path(directory) / STAGED_DIR
    if not staged.is_dir():
        raise DataError("the journal names an add whose staged entities are missing; rebuild the index",
                        path=staged)
    with EntityStore.open(staged / _STAGED_ENTITIES) as store:
        entities = list(store)
    return entities, np.load(staged / _STAGED_VECTORS, allow_pickle=False)


@contextlib.contextmanager
def index_lock(directory: Path) -> Iterator[None]:
    """Hold the exclusive edit lock of an index directory (waiting, with a log line, while another process holds it)."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("%s: another process is editing this index; waiting for it to finish", directory)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


__all__ = ["JOURNAL_FILE", "STAGED_DIR", "EditJournal", "clear_journal", "index_lock", "read_staged_entities",
           "stage_added_entities"]
