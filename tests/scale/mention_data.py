"""Mention files for the linking tests: the tiny index's queries as JSONL and Parquet records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def query_records(queries: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """One record per query (ids q0..), one id repeated (renamed '#2' on reading), one mention that cannot be linked."""
    records: list[dict[str, Any]] = [{"id": f"q{i}", "sentence": sentence, "surface": surface, "gold_qid": qid}
                                     for i, (sentence, surface, qid) in enumerate(queries)]
    records.append({"id": "q0", "sentence": queries[1][0], "surface": queries[1][1]})
    records.append({"id": "blank", "sentence": "Nothing to link here.", "surface": "\u200b"})
    return records


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_parquet(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)
    return path
