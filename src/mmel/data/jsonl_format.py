"""mmel's own on-disk dataset format: `dataset.json` + `kb.jsonl` + `mentions/<split>.jsonl` + images.

Every prepared dataset uses it and users write it for their own knowledge bases; docs/DATA_FORMAT.md
is the reference. Reading is strict: a missing required key, a wrong type, an unknown key, a span
that does not fit its sentence or a path that leaves the dataset directory raises `DataError`
naming the file and the line. Images are referenced by paths relative to the dataset directory;
a missing image file is not an error here (it means "no image"; `validate_dataset` counts them).
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mmel.core.errors import DataError, PathEscapeError
from mmel.core.paths import (
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    link_or_copy,
    read_json,
    read_jsonl,
    resolve_in_root,
    write_jsonl,
)
from mmel.core.types import Dataset, Entity, KnowledgeBase, Mention

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DATASET_FILE = "dataset.json"
KB_FILE = "kb.jsonl"
MENTIONS_DIR = "mentions"
MAX_SPLIT_NAME_BYTES = 100   # file systems allow 255, and atomic writes add a prefix and a suffix to the name

_DATASET_KEYS = {"name": str, "format_version": int, "splits": list, "source": str}
_DATASET_REQUIRED = ("name", "format_version", "splits")
_ENTITY_KEYS = {"qid": str, "name": str, "attributes": str, "description": str, "images": list, "extra": dict}
_ENTITY_REQUIRED = ("qid", "name")
_MENTION_KEYS = {"id": str, "sentence": str, "surface": str, "span": (list, type(None)),
                 "image": (str, type(None)), "gold_qid": (str, type(None)), "extra": dict,
                 "caption": (str, type(None))}
_MENTION_REQUIRED = ("id", "sentence", "surface")

Relocate = Callable[[str], str]  # maps an image path of the source dataset to its path in the output


@dataclass(frozen=True)
class DatasetInfo:
    """The contents of `dataset.json`."""

    name: str
    format_version: int
    splits: tuple[str, ...]
    source: str = ""


def write_dataset(dataset: Dataset, out_dir: Path, *, source: str = "", image_subdir: str | None = None,
                  extra_files: Mapping[str, str] | None = None) -> Path:
    """Write `dataset` in mmel JSONL format into `out_dir`, atomically; returns `out_dir`.

    Image files that exist under `dataset.root` are hard-linked or copied to the same relative path
    (under `image_subdir` when given, e.g. "images"); references to missing files are kept as they
    are. `extra_files` maps relative names to text files written beside the data (a README, a
    preparation report). An existing `out_dir` is replaced only if it already holds a dataset.
    """
    out_dir = Path(out_dir)
    check_output_directory(out_dir, marker_names=(DATASET_FILE, KB_FILE))
    relocate = _image_relocation(image_subdir)
    with atomic_directory(out_dir) as staging:
        copied = _copy_dataset_images(dataset, staging, relocate)
        info = DatasetInfo(dataset.name, FORMAT_VERSION, tuple(dataset.splits), source)
        atomic_write_json(staging / DATASET_FILE, _info_to_record(info))
        write_jsonl(staging / KB_FILE, (_entity_to_record(entity, relocate) for entity in dataset.kb))
        for split, mentions in dataset.splits.items():
            check_split_name(split, DATASET_FILE)
            write_jsonl(staging / MENTIONS_DIR / f"{split}.jsonl",
                        (_mention_to_record(mention, relocate) for mention in mentions))
        for relative, text in (extra_files or {}).items():
            atomic_write_text(resolve_in_root(staging, relative, source="extra_files"), text)
    logger.info("wrote %s: %d entities, %d mentions, %d image files", out_dir, len(dataset.kb),
                sum(len(m) for m in dataset.splits.values()), copied)
    return out_dir


def read_dataset(path: Path) -> Dataset:
    """Read a dataset directory (`dataset.json` + `kb.jsonl` + `mentions/`), or a lone `kb.jsonl`.

    A directory without `dataset.json` but with `kb.jsonl` is read as the KB plus every
    `mentions/*.jsonl` found. A `kb.jsonl` file given directly gives a dataset with no splits.
    """
    path = Path(path)
    if path.is_file():
        return Dataset(name=path.parent.name, kb=read_kb_jsonl(path), splits={}, root=path.parent)
    if not path.is_dir():
        raise DataError("no such file or directory", path=path)
    info_path = path / DATASET_FILE
    if info_path.exists():
        info = read_dataset_info(path)
        split_names = list(info.splits)
        _check_no_unlisted_splits(path, split_names)
        name = info.name
    elif (path / KB_FILE).exists():
        split_names = sorted(p.stem for p in (path / MENTIONS_DIR).glob("*.jsonl"))
        name = path.name
    else:
        raise DataError(f"not an mmel dataset directory: neither {DATASET_FILE} nor {KB_FILE} found", path=path)
    kb = read_kb_jsonl(path / KB_FILE, root=path)
    splits = {split: read_mentions_jsonl(path / MENTIONS_DIR / f"{split}.jsonl", root=path) for split in split_names}
    return Dataset(name=name, kb=kb, splits=splits, root=path)


def read_dataset_info(path: Path) -> DatasetInfo:
    """Read and check `dataset.json` of the dataset directory `path`."""
    info_path = Path(path) / DATASET_FILE
    record = read_json(info_path)
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}", path=info_path)
    _check_record(record, _DATASET_KEYS, _DATASET_REQUIRED, info_path, None)
    if record["format_version"] != FORMAT_VERSION:
        raise DataError(f"format_version {record['format_version']} is not supported (this mmel reads "
                        f"{FORMAT_VERSION}); upgrade mmel or re-prepare the dataset", path=info_path)
    splits = record["splits"]
    for split in splits:
        if not isinstance(split, str):
            raise DataError(f"'splits' must be a list of strings, found {split!r}", path=info_path)
        check_split_name(split, info_path)
    if len(set(splits)) != len(splits):
        raise DataError(f"'splits' lists a split twice: {splits}", path=info_path)
    return DatasetInfo(record["name"], record["format_version"], tuple(splits), record.get("source", ""))


def read_kb_jsonl(path: Path, root: Path | None = None) -> KnowledgeBase:
    """Read a `kb.jsonl` file; image paths must lie under `root` (default: the file's directory)."""
    path = Path(path)
    root = path.parent if root is None else Path(root)
    entities = []
    for line, record in read_jsonl(path):
        where = f"line {line}"
        _check_record(record, _ENTITY_KEYS, _ENTITY_REQUIRED, path, where)
        if not record["qid"]:
            raise DataError("'qid' must not be empty", path=path, record=where)
        images = record.get("images", [])
        for image in images:
            _check_image_path(image, root, path, where)
        entities.append(Entity(qid=record["qid"], name=record["name"], attributes=record.get("attributes", ""),
                               description=record.get("description", ""), images=tuple(images),
                               extra=record.get("extra", {})))
    return KnowledgeBase(entities)


def read_mentions_jsonl(path: Path, root: Path | None = None) -> list[Mention]:
    """Read a mentions file; image paths must lie under `root` (default: the file's directory).

    Inside a dataset directory the root is the dataset directory, not `mentions/`: `read_dataset`
    passes it.
    """
    path = Path(path)
    root = path.parent if root is None else Path(root)
    return mentions_from_records(((f"line {line}", record) for line, record in read_jsonl(path)), path, root)


def mentions_from_records(records: Iterable[tuple[str, dict[str, Any]]], path: Path, root: Path) -> list[Mention]:
    """Mentions from `(where, record)` pairs of a file's reader (JSONL lines, Parquet rows), checked as
    this format's mention records (`where` names the record in errors), with repeated ids made unique."""
    mentions = []
    for where, record in records:
        _check_record(record, _MENTION_KEYS, _MENTION_REQUIRED, path, where)
        span = _parse_span(record, path, where)
        image = record.get("image")
        if image is not None:
            _check_image_path(image, root, path, where)
        mentions.append(Mention(id=record["id"], sentence=record["sentence"], surface=record["surface"], span=span,
                                image=image, gold_qid=record.get("gold_qid"), extra=record.get("extra", {}),
                                caption=record.get("caption")))
    mentions, renamed = unique_mention_ids(mentions)
    if renamed:
        logger.warning("%s: %d mention(s) repeat an earlier mention's id; renamed '<id>#<n>' (n = 2, 3, ...) so "
                       "every mention is linked, scored and resumed on its own", path, renamed)
    return mentions


def unique_mention_ids(mentions: list[Mention]) -> tuple[list[Mention], int]:
    """The mentions with every repeated id made unique, and how many were renamed.

    Sources such as the MIMIC layout give every mention of a sentence the sample's id. Keyed by id,
    the later mentions would overwrite or (on resume) skip each other, so the n-th occurrence of an
    id becomes "<id>#<n>": stable for the same file, and never an id the file already uses.
    """
    taken = {mention.id for mention in mentions}
    seen: Counter[str] = Counter()
    unique, renamed = [], 0
    for mention in mentions:
        seen[mention.id] += 1
        if seen[mention.id] == 1:
            unique.append(mention)
            continue
        number = seen[mention.id]
        while f"{mention.id}#{number}" in taken:
            number += 1
        new_id = f"{mention.id}#{number}"
        taken.add(new_id)
        unique.append(replace(mention, id=new_id))
        renamed += 1
    return unique, renamed


def span_matches(sentence: str, surface: str, span: tuple[int, int]) -> bool:
    """Whether `span` is a valid [start, end) range of `sentence` holding `surface` (case-insensitively)."""
    start, end = span
    if not 0 <= start < end <= len(sentence):
        return False
    return sentence[start:end].lower() == surface.lower()


def _check_record(record: dict[str, Any], schema: Mapping[str, Any], required: tuple[str, ...], path: Path,
                  where: str | None) -> None:
    missing = [key for key in required if key not in record]
    if missing:
        raise DataError(f"missing required key(s) {', '.join(missing)}", path=path, record=where)
    unknown = sorted(set(record) - set(schema))
    if unknown:
        raise DataError(f"unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(schema)} "
                        "(put custom fields under 'extra')", path=path, record=where)
    for key, value in record.items():
        expected = schema[key]
        if not isinstance(value, expected) or isinstance(value, bool):
            raise DataError(f"{key!r} must be {_type_names(expected)}, got {type(value).__name__} {value!r:.60}",
                            path=path, record=where)
    for key in ("images", "splits"):
        if key in record and not all(isinstance(item, str) for item in record[key]):
            raise DataError(f"{key!r} must be a list of strings", path=path, record=where)


def _type_names(expected: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", list: "a list", dict: "an object", type(None): "null"}
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(names[t] for t in types)


def _parse_span(record: dict[str, Any], path: Path, where: str) -> tuple[int, int] | None:
    span = record.get("span")
    if span is None:
        return None
    if len(span) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in span):
        raise DataError(f"'span' must be [start, end] with two integers or null, got {span!r}",
                        path=path, record=where)
    start, end = span
    if not span_matches(record["sentence"], record["surface"], (start, end)):
        found = record["sentence"][max(start, 0):max(end, 0)]
        raise DataError(f"span [{start}, {end}] does not hold the surface {record['surface']!r} "
                        f"(sentence of length {len(record['sentence'])}, text at span: {found!r})",
                        path=path, record=where)
    return start, end


def _check_image_path(image: str, root: Path, path: Path, where: str) -> None:
    if not image or os.path.isabs(image) or image.startswith(("/", "\\")):
        raise PathEscapeError(f"image path {image!r} must be a non-empty path relative to the dataset directory",
                              path=path, record=where)
    try:
        resolve_in_root(root, image)
    except PathEscapeError as error:
        raise PathEscapeError(str(error), path=path, record=where) from None


def check_split_name(split: str, source: object, record: object = None) -> None:
    """A split name becomes the file name `mentions/<split>.jsonl`: refuse anything but a plain name."""
    if (not split or "/" in split or "\\" in split or split.startswith(".")
            or any(unicodedata.category(char) == "Cc" for char in split)
            or len(split.encode("utf-8", "surrogatepass")) > MAX_SPLIT_NAME_BYTES):
        raise DataError(f"split name {split!r:.80} must be a plain file name (no '/', no leading '.', no control "
                        f"characters, at most {MAX_SPLIT_NAME_BYTES} bytes)", path=source, record=record)


def _check_no_unlisted_splits(path: Path, split_names: list[str]) -> None:
    unlisted = sorted(p.name for p in (path / MENTIONS_DIR).glob("*.jsonl") if p.stem not in split_names)
    if unlisted:
        raise DataError(f"mention file(s) {', '.join(unlisted)} are not listed in 'splits' "
                        f"({', '.join(split_names) or 'none'}); add them or remove the files", path=path / DATASET_FILE)


def check_output_directory(out_dir: Path, marker_names: tuple[str, ...]) -> None:
    """Writers replace their output directory; never let that delete a directory that is not a dataset."""
    if out_dir.is_file():
        raise DataError("output path is a file; give a directory", path=out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not any((out_dir / m).exists() for m in marker_names):
        raise DataError(f"output directory is not empty and holds no dataset ({' or '.join(marker_names)}); "
                        "refusing to replace it: choose a new or empty directory", path=out_dir)


def _image_relocation(image_subdir: str | None) -> Relocate:
    if image_subdir is None:
        return lambda relative: relative
    check_split_name(image_subdir, "image_subdir")
    return lambda relative: f"{image_subdir}/{relative}"


def _copy_dataset_images(dataset: Dataset, staging: Path, relocate: Relocate) -> int:
    """Link or copy every existing image file of `dataset` into `staging`; returns the number of files."""
    relatives = {image for entity in dataset.kb for image in entity.images}
    relatives.update(m.image for mentions in dataset.splits.values() for m in mentions if m.image)
    copied = 0
    for relative in tqdm(sorted(relatives), desc="copy images", unit="img", disable=len(relatives) < 1000):
        source = resolve_in_root(dataset.root, relative, source=f"dataset {dataset.name!r}")
        if source.is_file():
            link_or_copy(source, resolve_in_root(staging, relocate(relative)))
            copied += 1
    return copied


def _info_to_record(info: DatasetInfo) -> dict[str, Any]:
    return {"name": info.name, "format_version": info.format_version, "splits": list(info.splits),
            "source": info.source}


def _entity_to_record(entity: Entity, relocate: Relocate) -> dict[str, Any]:
    return {"qid": entity.qid, "name": entity.name, "attributes": entity.attributes,
            "description": entity.description, "images": [relocate(image) for image in entity.images],
            "extra": _json_safe(entity.extra, f"entity {entity.qid!r}")}


def _mention_to_record(mention: Mention, relocate: Relocate) -> dict[str, Any]:
    """`caption` is written only when set, so datasets without captions stay readable by older mmel."""
    record = {"id": mention.id, "sentence": mention.sentence, "surface": mention.surface,
            "span": None if mention.span is None else list(mention.span),
            "image": None if mention.image is None else relocate(mention.image),
            "gold_qid": mention.gold_qid, "extra": _json_safe(mention.extra, f"mention {mention.id!r}")}
    if mention.caption is not None:
        record["caption"] = mention.caption
    return record


def _json_safe(extra: dict[str, Any], owner: str) -> dict[str, Any]:
    """`extra` must survive a JSON round trip unchanged; fail at write time, not at read time."""
    try:
        json.dumps(extra, ensure_ascii=False)
    except (TypeError, ValueError) as error:
        raise DataError(f"'extra' of {owner} is not JSON-serialisable: {error}") from None
    return extra


__all__ = [
    "DATASET_FILE",
    "FORMAT_VERSION",
    "KB_FILE",
    "MENTIONS_DIR",
    "DatasetInfo",
    "check_output_directory",
    "check_split_name",
    "mentions_from_records",
    "read_dataset",
    "read_dataset_info",
    "read_kb_jsonl",
    "read_mentions_jsonl",
    "span_matches",
    "unique_mention_ids",
    "write_dataset",
]
