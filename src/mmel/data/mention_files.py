"""Files of mentions to link: mmel's mentions JSONL, the same records as Parquet rows, or a directory of either.

A Parquet file holds one mention per row with the columns of the JSONL records (docs/DATA_FORMAT.md:
`id`, `sentence`, `surface`, optional `span` (list of two integers), `image`, `gold_qid`,
`caption`, `extra` (a struct)). Parquet has no "absent", so a null optional column means the key
is absent. Rows are checked exactly like JSONL records, and errors name the file and the row
(1-based). Parquet is read with pyarrow (installed with `ray[data]`, mmel's dev extra), imported
only when a Parquet file is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmel.core.errors import DataError, UsageError
from mmel.core.paths import open_data_file
from mmel.core.types import Mention
from mmel.data.jsonl_format import mentions_from_records, read_mentions_jsonl

MENTION_FILE_SUFFIXES = (".jsonl", ".parquet")
PARQUET_ROWS_PER_READ = 65_536


def read_mentions_file(path: Path, root: Path | None = None) -> list[Mention]:
    """The mentions of a `.jsonl` or `.parquet` file; image paths must lie under `root` (default: its folder)."""
    path = Path(path)
    if path.suffix == ".parquet":
        return read_mentions_parquet(path, root)
    if path.suffix == ".jsonl":
        return read_mentions_jsonl(path, root)
    raise DataError(f"not a mentions file: expected a name ending in {' or '.join(MENTION_FILE_SUFFIXES)}", path=path)


def read_mentions_parquet(path: Path, root: Path | None = None) -> list[Mention]:
    """The mentions of a Parquet file, one per row, checked as mention records."""
    path = Path(path)
    root = path.parent if root is None else Path(root)
    return mentions_from_records(_parquet_records(path), path, root)


def mention_files(directory: Path) -> list[Path]:
    """The mention files directly inside `directory`, sorted by name; refuses a directory without any."""
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.suffix in MENTION_FILE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise DataError(f"no mention files (*{', *'.join(MENTION_FILE_SUFFIXES)}) in this directory", path=directory)
    return files


def _parquet_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(`row <n>`, record without null values) for each row, read a row group at a time."""
    parquet = _import_parquet()
    row = 0
    with open_data_file(path) as handle:
        try:
            batches = parquet.ParquetFile(handle).iter_batches(batch_size=PARQUET_ROWS_PER_READ)
            for batch in batches:
                for record in batch.to_pylist():
                    row += 1
                    yield f"row {row}", {key: value for key, value in record.items() if value is not None}
        except (OSError, ValueError) as error:   # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"cannot read as Parquet: {error}", path=path,
                            record=f"row {row + 1}" if row else None) from None


def _import_parquet() -> Any:
    try:
        import pyarrow.parquet
    except ImportError:
        raise UsageError("reading Parquet needs pyarrow: pip install pyarrow (mmel's dev extra installs it)") from None
    return pyarrow.parquet


__all__ = ["MENTION_FILE_SUFFIXES", "mention_files", "read_mentions_file", "read_mentions_parquet"]
