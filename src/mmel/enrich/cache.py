"""The enrichment answer cache: one SQLite file, one committed row per answer.

LLM and captioning calls cost money or GPU hours, so every answer is committed as soon as it
arrives: a rerun asks only for what is missing and a `kill -9` loses at most the requests in
flight. SQLite in rollback-journal mode with `synchronous=FULL` gives that without debris: a
committed row is on disk, and a transaction cut short is rolled back from its journal the next
time the file is opened. A durable commit costs milliseconds (20 ms on the test machine), so
`CacheWriter` commits from a background thread, all answers that arrived during the previous
commit in one transaction: requests never wait for the disk. Only answers are stored, never
failures, so a rerun retries them.
"""

from __future__ import annotations

import hashlib
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mmel.core.errors import DataError
from mmel.core.paths import mmel_cache_dir

CACHE_FILE_NAME = "enrich.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    answer TEXT NOT NULL,
    provenance TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (kind, key)
)
"""
_COLUMNS = {"kind", "key", "answer", "provenance", "created"}


def default_cache_path() -> Path:
    """`$MMEL_CACHE_DIR/enrich.sqlite`, else the XDG cache directory: shared by every dataset and output.

    Keys hold the entity's text hash (descriptions) or the image's content hash (captions), so one
    cache serves every copy of a KB without mixing answers up.
    """
    return mmel_cache_dir() / CACHE_FILE_NAME


def cache_key(*parts: object) -> str:
    """A stable SHA-256 over JSON-encoded parts: the cache key of one request."""
    return sha256_text(json.dumps(parts, ensure_ascii=False, sort_keys=True, separators=(",", ":")))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class AnswerCache:
    """Answers by (kind, key); `kind` is "description" or "caption". Use from one thread."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._connection = _connect(self.path)

    def get_many(self, kind: str, keys: Iterable[str]) -> dict[str, str]:
        """The cached answers among `keys`."""
        found: dict[str, str] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):  # stay under SQLite's bound-parameter limit
            chunk = unique[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._connection.execute(
                f"SELECT key, answer FROM answers WHERE kind = ? AND key IN ({marks})", (kind, *chunk))
            found.update(rows.fetchall())
        return found

    def put_many(self, kind: str, answers: Mapping[str, str], provenance: Mapping[str, Any]) -> None:
        """Commit `answers` (key -> text) in one durable transaction."""
        record = json.dumps(dict(provenance), ensure_ascii=False, sort_keys=True)
        _commit(self._connection, [(kind, key, text, record, time.time()) for key, text in answers.items()])

    def writer(self, kind: str) -> CacheWriter:
        """A background committer of `kind` answers; use it as a context manager."""
        return CacheWriter(self.path, kind)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> AnswerCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class CacheWriter:
    """Commits answers from its own thread and connection, grouping those that queue up during a commit.

    `put` never blocks on the disk; leaving the `with` block commits everything put so far and
    re-raises a commit error. A `kill -9` loses only answers put in the last few milliseconds.
    """

    def __init__(self, path: Path, kind: str, *, close_timeout_s: float = 120.0):
        self.kind = kind
        self._queue: queue.Queue[tuple[str, str, str, str, float] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._close_timeout_s = close_timeout_s
        self._thread = threading.Thread(target=self._commit_loop, args=(Path(path),), daemon=True,
                                        name="mmel-cache-writer")
        self._thread.start()

    def put(self, key: str, answer: str, provenance: Mapping[str, Any]) -> None:
        if self._error is not None:
            raise self._error
        record = json.dumps(dict(provenance), ensure_ascii=False, sort_keys=True)
        self._queue.put((self.kind, key, answer, record, time.time()))

    def _commit_loop(self, path: Path) -> None:
        try:
            connection = _connect(path)
        except BaseException as error:
            self._error = error
            return
        try:
            finished = False
            while not finished:
                batch = [self._queue.get()]
                while True:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                finished = batch[-1] is None
                _commit(connection, [row for row in batch if row is not None])
        except BaseException as error:
            self._error = error
        finally:
            connection.close()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._queue.put(None)
        self._thread.join(timeout=self._close_timeout_s)
        if self._thread.is_alive():
            raise DataError(f"the cache writer did not finish within {self._close_timeout_s:g} s")
        if self._error is not None:
            raise DataError(f"could not commit answers to the cache: {self._error}")


def _connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode with durable (rollback journal, synchronous=FULL) commits."""
    try:
        connection = sqlite3.connect(path, isolation_level=None, timeout=30)
        connection.execute("PRAGMA journal_mode=DELETE")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute(_SCHEMA)
        columns = {row[1] for row in connection.execute("PRAGMA table_info(answers)")}
    except sqlite3.DatabaseError as error:
        raise DataError(f"not a usable enrichment cache ({error}); delete it or pass another --cache",
                        path=path) from None
    if columns != _COLUMNS:   # an SQLite file of another program that happens to have an `answers` table
        connection.close()
        raise DataError(f"not an enrichment cache (its 'answers' table has columns {', '.join(sorted(columns))}); "
                        "delete it or pass another --cache", path=path)
    return connection


def _commit(connection: sqlite3.Connection, rows: list[tuple[str, str, str, str, float]]) -> None:
    """Insert `rows` (kind, key, answer, provenance, created) in one transaction."""
    if not rows:
        return
    with connection:  # COMMIT on success, ROLLBACK on error
        connection.execute("BEGIN")
        connection.executemany(
            "INSERT OR REPLACE INTO answers (kind, key, answer, provenance, created) VALUES (?, ?, ?, ?, ?)", rows)


__all__ = ["CACHE_FILE_NAME", "AnswerCache", "CacheWriter", "cache_key", "default_cache_path", "sha256_text"]
