"""Entity metadata (names, texts, image paths) in an embedded SQLite database.

The vector index answers "which QIDs"; this store answers "what are they" without holding a
million entities in Python objects. Rows keep the KB's order (row = ranking order); new
entities go after the last row, deleted ones leave a gap, so iteration stays in KB order.

Threads: one connection opened with `check_same_thread=False`, every use under one lock, and
every write in a transaction. Server threads read a few hundred rows by primary key per request
(well under a millisecond), so serialising them costs nothing measurable, while one
connection per thread would need per-thread lifetimes and could not be closed from `close()`.
The database runs in WAL mode, so other processes can read while this one writes.

`kb_checksum` hashes entity content in row order; the index manifest records it so that an
index refuses to be paired with a different KB.

The store also records the revision of the last index edit it took part in (`revision()`), written
in the same transaction as the edit's rows, so a journaled edit that was interrupted can tell
whether this part of it already happened (`mmel.retrieval.kb_edits`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mmel.core.errors import DataError, MismatchError, NotFoundError
from mmel.core.types import Entity

SCHEMA_VERSION = 1
_INSERT_CHUNK = 10_000      # entities per executemany while building
_LOOKUP_CHUNK = 500         # QIDs per `IN (...)` query, below every SQLite variable limit
_PAGE_SIZE = 2_000          # rows per page while iterating
_COLUMNS = "qid, name, attributes, description, images, extra"
_INSERT = f"INSERT INTO entities (row, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
_REVISION_KEY = "edit_revision"
_SCHEMA = """
CREATE TABLE entities (
    qid TEXT PRIMARY KEY,
    row INTEGER NOT NULL UNIQUE,
    name TEXT NOT NULL,
    attributes TEXT NOT NULL,
    description TEXT NOT NULL,
    images TEXT NOT NULL,   -- JSON list of paths relative to the dataset root
    extra TEXT NOT NULL     -- JSON object
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class UpsertReport:
    """What `EntityStore.upsert` did: QIDs appended as new rows and QIDs whose content was replaced."""

    added: tuple[str, ...]
    updated: tuple[str, ...]


class EntityStore:
    """SQLite-backed entity table: get by QID, upsert, delete, iterate in row order, checksum.

    Create one with `EntityStore.create(path, entities)` or open one with `EntityStore.open(path)`.
    Use as a context manager, or call `close()`.
    """

    def __init__(self, path: Path, connection: sqlite3.Connection):
        self.path = Path(path)
        self._connection = connection
        self._lock = threading.Lock()

    # --- opening ----------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, entities: Iterable[Entity], *, overwrite: bool = False,
               progress: bool = True) -> EntityStore:
        """Write a new store from `entities` (a KnowledgeBase or any iterable) in their order.

        The database is written to a temporary file and renamed into place, so a failure (such as a
        duplicate QID, which raises DataError) never leaves a half-built store at `path`.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            connection = sqlite3.connect(tmp)
            try:
                _write_new_database(connection, entities, source=path, progress=progress)
            finally:
                connection.close()
            _remove_sidecars(path)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return cls.open(path)

    @classmethod
    def open(cls, path: Path) -> EntityStore:
        """Open an existing store; a missing file or another schema raises with the path."""
        path = Path(path)
        if not path.is_file():
            raise DataError("entity store not found", path=path)
        connection = sqlite3.connect(path, check_same_thread=False)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            version = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as error:
            connection.close()
            raise DataError(f"not an mmel entity store ({error})", path=path) from None
        if version is None or int(version[0]) != SCHEMA_VERSION:
            connection.close()
            raise MismatchError(f"{path}: entity store schema {version and version[0]!r} is not supported "
                                f"(this mmel reads {SCHEMA_VERSION}); rebuild the store")
        return cls(path, connection)

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def __enter__(self) -> EntityStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- reading ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.count()

    def count(self) -> int:
        with self._lock:
            return self._connection.execute("SELECT COUNT(*) FROM entities").fetchone()[0]

    def __contains__(self, qid: object) -> bool:
        return isinstance(qid, str) and self.get(qid) is not None

    def get(self, qid: str) -> Entity | None:
        with self._lock:
            found = self._connection.execute(f"SELECT {_COLUMNS} FROM entities WHERE qid = ?", (qid,)).fetchone()
        return None if found is None else _entity_from_row(found, self.path)

    def get_many(self, qids: Sequence[str]) -> list[Entity | None]:
        """Entities in the order of `qids` (None where a QID is not stored)."""
        found: dict[str, Entity] = {}
        unique = list(dict.fromkeys(qids))
        with self._lock:
            for start in range(0, len(unique), _LOOKUP_CHUNK):
                chunk = unique[start:start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._connection.execute(f"SELECT {_COLUMNS} FROM entities WHERE qid IN ({marks})", chunk)
                found.update((row[0], _entity_from_row(row, self.path)) for row in rows)
        return [found.get(qid) for qid in qids]

    def __iter__(self) -> Iterator[Entity]:
        """Entities in row order, fetched a page at a time (the lock is not held between pages)."""
        last_row = -1
        while True:
            with self._lock:
                page = self._connection.execute(
                    f"SELECT row, {_COLUMNS} FROM entities WHERE row > ? ORDER BY row LIMIT ?",
                    (last_row, _PAGE_SIZE)).fetchall()
            if not page:
                return
            for record in page:
                yield _entity_from_row(record[1:], self.path)
            last_row = page[-1][0]

    def qids(self) -> list[str]:
        """All QIDs in row order."""
        with self._lock:
            return [row[0] for row in self._connection.execute("SELECT qid FROM entities ORDER BY row")]

    def checksum(self) -> str:
        """`kb_checksum` of the stored entities in row order."""
        return kb_checksum(self)

    def revision(self) -> int | None:
        """The index revision of the last upsert or delete given one (None: none since the store was created)."""
        with self._lock:
            found = self._connection.execute("SELECT value FROM meta WHERE key = ?", (_REVISION_KEY,)).fetchone()
        return None if found is None else int(found[0])

    # --- writing ----------------------------------------------------------------------------
    def upsert(self, entities: Iterable[Entity], *, revision: int | None = None) -> UpsertReport:
        """Insert new entities after the last row and replace existing ones in place, in one transaction.

        `revision`, if given, is recorded in the same transaction (see `revision()`).
        """
        entities = list(entities)
        _check_unique([entity.qid for entity in entities], source=self.path)
        encoded = [_encode_entity(entity, self.path) for entity in entities]
        added: list[str] = []
        updated: list[str] = []
        with self._lock, self._connection:
            next_row = self._connection.execute("SELECT COALESCE(MAX(row), -1) + 1 FROM entities").fetchone()[0]
            for values in encoded:
                changed = self._connection.execute(
                    "UPDATE entities SET name = ?, attributes = ?, description = ?, images = ?, extra = ? "
                    "WHERE qid = ?", (*values[1:], values[0])).rowcount
                if changed:
                    updated.append(values[0])
                    continue
                self._connection.execute(_INSERT, (next_row, *values))
                added.append(values[0])
                next_row += 1
            self._record_revision(revision)
        return UpsertReport(added=tuple(added), updated=tuple(updated))

    def delete(self, qids: Iterable[str], *, revision: int | None = None) -> int:
        """Delete entities in one transaction; unknown QIDs raise KeyError and nothing is deleted.

        `revision`, if given, is recorded in the same transaction (see `revision()`).
        """
        qids = list(dict.fromkeys(qids))
        with self._lock, self._connection:
            deleted = 0
            for start in range(0, len(qids), _LOOKUP_CHUNK):
                chunk = qids[start:start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                deleted += self._connection.execute(f"DELETE FROM entities WHERE qid IN ({marks})", chunk).rowcount
            if deleted != len(qids):  # raising inside `with connection` rolls the transaction back
                raise NotFoundError(f"{len(qids) - deleted} of {len(qids)} QID(s) are not in {self.path}; "
                                    "nothing deleted")
            self._record_revision(revision)
        return deleted

    def _record_revision(self, revision: int | None) -> None:
        """Inside a write transaction: remember the index revision it belongs to."""
        if revision is not None:
            self._connection.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                     (_REVISION_KEY, str(revision)))


def kb_checksum(entities: Iterable[Entity]) -> str:
    """SHA-256 over each entity's QID, name, attributes, description and images, in the given order.

    `Entity.extra` is left out, as it is from entity equality: it holds reader-specific
    provenance, so the same KB read from two formats gets the same checksum. Row numbers are
    left out too: only the order counts.
    """
    digest = hashlib.sha256(f"mmel-kb-v{SCHEMA_VERSION}\n".encode())
    for entity in entities:
        content = [entity.qid, entity.name, entity.attributes, entity.description, list(entity.images)]
        digest.update(json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _write_new_database(connection: sqlite3.Connection, entities: Iterable[Entity], *, source: Path,
                        progress: bool) -> None:
    from mmel import __version__

    connection.executescript(_SCHEMA)
    connection.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                           [("schema_version", str(SCHEMA_VERSION)), ("mmel_version", __version__)])
    total = len(entities) if isinstance(entities, Sequence) else None
    seen: set[str] = set()
    batch: list[tuple[Any, ...]] = []
    with tqdm(total=total, desc="storing entities", unit="entity", disable=not progress) as bar:
        for row, entity in enumerate(entities):
            if entity.qid in seen:
                raise DataError(f"duplicate QID {entity.qid!r}", path=source, record=f"entity {row}")
            seen.add(entity.qid)
            batch.append((row, *_encode_entity(entity, source)))
            if len(batch) == _INSERT_CHUNK:
                connection.executemany(_INSERT, batch)
                bar.update(len(batch))
                batch = []
        connection.executemany(_INSERT, batch)
        bar.update(len(batch))
    connection.commit()


def _check_unique(qids: list[str], *, source: Path) -> None:
    seen: set[str] = set()
    for position, qid in enumerate(qids):
        if qid in seen:
            raise DataError(f"duplicate QID {qid!r} in one upsert", path=source, record=f"entity {position}")
        seen.add(qid)


def _encode_entity(entity: Entity, source: Path) -> tuple[str, str, str, str, str, str]:
    if not isinstance(entity.qid, str) or not entity.qid:
        raise DataError(f"entity QID must be a non-empty string, got {entity.qid!r}", path=source)
    try:
        extra = json.dumps(entity.extra, ensure_ascii=False, sort_keys=True)
    except TypeError as error:
        raise DataError(f"extra is not JSON-serialisable: {error}", path=source, record=entity.qid) from None
    images = json.dumps(list(entity.images), ensure_ascii=False)
    return entity.qid, entity.name, entity.attributes, entity.description, images, extra


def _entity_from_row(row: Sequence[Any], source: Path) -> Entity:
    qid, name, attributes, description, images, extra = row
    try:
        return Entity(qid=qid, name=name, attributes=attributes, description=description,
                      images=tuple(json.loads(images)), extra=json.loads(extra))
    except json.JSONDecodeError as error:
        raise DataError(f"stored images/extra are not valid JSON: {error.msg}", path=source, record=qid) from None


def _remove_sidecars(path: Path) -> None:
    """Drop an old database's WAL files before replacing it, so they are never applied to the new one."""
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


__all__ = ["EntityStore", "UpsertReport", "kb_checksum"]
