"""mmel.data: read, write, prepare and validate MEL datasets; every reader returns `mmel.core.types.Dataset`.

Formats: mmel's own JSONL format (`jsonl_format`, docs/DATA_FORMAT.md) and the MIMIC-cleaned
layout of the official MIMIC/M3EL code (`mimic_layout`). `raw_release` prepares WikiMEL and
RichpediaMEL from their raw releases; `validate` reports what is wrong with a dataset.
"""

from __future__ import annotations

from pathlib import Path

from mmel.core.errors import DataError
from mmel.core.types import Dataset
from mmel.data.jsonl_format import (
    DATASET_FILE,
    KB_FILE,
    read_dataset,
    read_dataset_info,
    read_kb_jsonl,
    read_mentions_jsonl,
    write_dataset,
)
from mmel.data.mimic_layout import KB_ENTITY_FILE, read_mimic_layout, write_mimic_layout
from mmel.data.raw_release import PreparationReport, prepare_richpediamel, prepare_wikimel
from mmel.data.validate import ValidationReport, validate_dataset


def load_dataset(path: Path | str) -> Dataset:
    """Read a dataset in whichever supported format `path` holds.

    A directory with `dataset.json` or `kb.jsonl` (or a `.jsonl` KB file) is mmel JSONL; a directory
    with `kb_entity.json` is the MIMIC layout.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("no such file or directory", path=path)
    if path.is_file():
        if path.suffix == ".jsonl":
            return read_dataset(path)
        raise DataError("a dataset file must be a kb.jsonl knowledge base; otherwise give the dataset directory",
                        path=path)
    if (path / DATASET_FILE).is_file() or (path / KB_FILE).is_file():
        return read_dataset(path)
    if (path / KB_ENTITY_FILE).is_file():
        return read_mimic_layout(path)
    raise DataError(f"not a dataset directory: expected {DATASET_FILE} (mmel JSONL format, see docs/DATA_FORMAT.md) "
                    f"or {KB_ENTITY_FILE} (MIMIC layout)", path=path)


CONVERT_TARGETS = ("jsonl", "mimic")


def convert_dataset(source: Path | str, out_dir: Path | str, to: str, prefix: str = "WIKIMEL") -> Path:
    """Read the dataset at `source` (any supported format) and write it to `out_dir` as `to` ("jsonl" or "mimic").

    `prefix` names the mention files of the MIMIC layout. Converting to JSONL keeps the source note
    of an mmel dataset, or records where the data came from.
    """
    if to not in CONVERT_TARGETS:
        raise DataError(f"unknown target format {to!r}; available: {', '.join(CONVERT_TARGETS)}")
    source, out_dir = Path(source), Path(out_dir)
    dataset = load_dataset(source)
    if to == "mimic":
        return write_mimic_layout(dataset, out_dir, prefix=prefix)
    note = read_dataset_info(source).source if (source / DATASET_FILE).is_file() else ""
    return write_dataset(dataset, out_dir, source=note or f"converted by mmel from {source.resolve()}")


__all__ = [
    "CONVERT_TARGETS",
    "PreparationReport",
    "ValidationReport",
    "convert_dataset",
    "load_dataset",
    "prepare_richpediamel",
    "prepare_wikimel",
    "read_dataset",
    "read_kb_jsonl",
    "read_mentions_jsonl",
    "read_mimic_layout",
    "validate_dataset",
    "write_dataset",
    "write_mimic_layout",
]
