"""The enrichment answer cache: one SQLite file, one committed row per answer.

LLM and captioning calls cost money or GPU hours, so every answer is committed the moment it
arrives: a rerun asks only for what is missing and a `kill -9` loses at most the requests in
flight. SQLite in rollback-journal mode with `synchronous=FULL` gives that without debris: a
committed row is on disk, and a transaction cut short is rolled back from its journal the next
time the file is opened. Only answers are stored, never failures, so a rerun retries them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mmel.core.errors import DataError

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


def default_cache_path() -> Path:
    """`$MMEL_CACHE_DIR/enrich.sqlite`, else the XDG cache directory: shared by every dataset and output.

    Keys hold the entity's text hash (descriptions) or the image's content hash (captions), so one
    cache serves every copy of a KB without mixing answers up.
    """
    base = os.environ.get("MMEL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mmel")
    return Path(base) / CACHE_FILE_NAME


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
        try:
            self._connection = sqlite3.connect(self.path, isolation_level=None)
            self._connection.execute("PRAGMA journal_mode=DELETE")
            self._connection.execute("PRAGMA synchronous=FULL")
            self._connection.execute(_SCHEMA)
        except sqlite3.DatabaseError as error:
            raise DataError(f"not a usable enrichment cache ({error}); delete it or pass another --cache",
                            path=self.path) from None

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
        if not answers:
            return
        record = json.dumps(dict(provenance), ensure_ascii=False, sort_keys=True)
        now = time.time()
        with self._connection:  # BEGIN ... COMMIT, rolled back on error
            self._connection.execute("BEGIN")
            self._connection.executemany(
                "INSERT OR REPLACE INTO answers (kind, key, answer, provenance, created) VALUES (?, ?, ?, ?, ?)",
                [(kind, key, text, record, now) for key, text in answers.items()])

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> AnswerCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["CACHE_FILE_NAME", "AnswerCache", "cache_key", "default_cache_path", "sha256_text"]
