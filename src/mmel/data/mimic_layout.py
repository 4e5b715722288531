"""Read and write the "MIMIC-cleaned" dataset layout used by the official MIMIC and M3EL code.

Layout (shared/specs/models.md §0): `kb_entity.json` (list of rows: `id`, `type`, URL-quoted
`entity_name`, `attr` or M3EL's `desc`, `image_list` of files in `kb_image/`), `qid2id.json`
(one-line object QID -> row id), `<PREFIX>_{train,dev,test}.json` (lists of mentions: URL-quoted
`mentions`, `sentence`, `imgPath` with '' for no image, `answer` a QID or 'nil'; M3EL adds
`entities`) and mention images in `mention_image/` (RichpediaMEL's archive: `mention_images/`).

Differences from the official loaders, on purpose: 'nil' mentions are kept as NIL mentions (and
counted) instead of dropped; rows and mentions keep fields the official code ignores in `extra`,
so that writing them back loses nothing.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, unquote

from tqdm import tqdm

from mmel.core.errors import DataError, PathEscapeError
from mmel.core.paths import (
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    link_or_copy,
    read_json,
    resolve_in_root,
)
from mmel.core.types import Dataset, Entity, KnowledgeBase, Mention, locate_span
from mmel.data.jsonl_format import check_output_directory, unique_mention_ids

logger = logging.getLogger(__name__)

KB_ENTITY_FILE = "kb_entity.json"
QID2ID_FILE = "qid2id.json"
KB_IMAGE_DIR = "kb_image"
MENTION_IMAGE_DIRS = ("mention_image", "mention_images")  # the configs read the first; RichpediaMEL ships the second
SPLIT_NAMES = ("train", "dev", "test")
PREFIX_TO_NAME = {"WIKIMEL": "wikimel", "RichpediaMEL": "richpediamel", "wiki_diverse": "wikidiverse",
                  "WikiDiverse": "wikidiverse"}
NIL_ANSWER = "nil"
PLACEHOLDER_QID_PREFIX = "mimic-row-"  # QID given to a KB row that carries none and is absent from qid2id.json

_ENTITY_FIELDS = ("id", "qid", "entity_name", "attr", "desc", "image_list")
_MENTION_FIELDS = ("id", "mentions", "sentence", "imgPath", "answer")


@dataclass
class MimicReadReport:
    """What `read_mimic_layout` found beyond the records themselves: sources of QIDs and inconsistencies."""

    prefix: str = ""
    entities: int = 0
    qid_sources: Counter[str] = field(default_factory=Counter)  # "qid field" / "qid2id.json" / "placeholder"
    qid2id_entries: int = 0
    qid2id_rows_not_in_kb: int = 0       # qid2id.json points at a row id no KB row has
    qid_conflicts: int = 0               # a row's `qid` field disagrees with qid2id.json
    ids_not_dense: bool = False          # row ids are not exactly 0..N-1
    mentions: dict[str, int] = field(default_factory=dict)
    nil_mentions: dict[str, int] = field(default_factory=dict)
    mentions_with_image: dict[str, int] = field(default_factory=dict)
    generated_mention_ids: int = 0
    renamed_mention_ids: int = 0         # a repeated id (one per sample, not per mention) made "<id>#<n>"
    examples: dict[str, list[str]] = field(default_factory=dict)

    def note(self, kind: str, example: str) -> None:
        examples = self.examples.setdefault(kind, [])
        if len(examples) < 5:
            examples.append(example)

    def summary(self) -> str:
        sources = ", ".join(f"{count} from {source}" for source, count in sorted(self.qid_sources.items()))
        lines = [f"MIMIC layout {self.prefix or '(no mention files)'}: {self.entities} entities (QIDs: {sources})"]
        for split, count in self.mentions.items():
            lines.append(f"  {split}: {count} mentions, {self.nil_mentions.get(split, 0)} NIL, "
                         f"{self.mentions_with_image.get(split, 0)} with an image path")
        problems = {"qid2id.json rows not in kb_entity.json": self.qid2id_rows_not_in_kb,
                    "rows whose qid disagrees with qid2id.json": self.qid_conflicts,
                    "mentions without id (generated)": self.generated_mention_ids,
                    "mentions repeating an earlier id (renamed '<id>#<n>')": self.renamed_mention_ids}
        lines += [f"  {label}: {count}" for label, count in problems.items() if count]
        if self.ids_not_dense:
            lines.append("  row ids are not 0..N-1: mmel rows follow the sorted ids")
        return "\n".join(lines)


def read_mimic_layout(root: Path, name: str | None = None, report: MimicReadReport | None = None) -> Dataset:
    """Read a MIMIC-layout directory into a `Dataset` (KB rows sorted by `id`, as the official code does).

    `name` is the file prefix (WIKIMEL, RichpediaMEL, wiki_diverse, WikiDiverse, or any other);
    by default it is detected from the `*_{train,dev,test}.json` files present.
    """
    root = Path(root)
    report = MimicReadReport() if report is None else report
    if not (root / KB_ENTITY_FILE).is_file():
        raise DataError(f"not a MIMIC-layout directory: {KB_ENTITY_FILE} not found", path=root)
    prefix = detect_prefix(root) if name is None else name
    report.prefix = prefix or ""
    kb = _read_kb(root, report)
    splits = {}
    if prefix:
        image_dir = _mention_image_dir(root)
        for split in SPLIT_NAMES:
            path = root / f"{prefix}_{split}.json"
            if path.exists():
                splits[split] = _read_mentions(path, split, image_dir, root, report)
        if not splits:
            raise DataError(f"no mention files {prefix}_{{{','.join(SPLIT_NAMES)}}}.json found", path=root)
    if (report.qid_conflicts or report.qid2id_rows_not_in_kb or report.qid_sources["placeholder"]
            or report.renamed_mention_ids):
        logger.warning("%s", report.summary())
    dataset_name = PREFIX_TO_NAME.get(prefix, prefix.lower()) if prefix else root.name
    return Dataset(name=dataset_name, kb=kb, splits=splits, root=root)


def detect_prefix(root: Path) -> str | None:
    """The one `<PREFIX>` with `<PREFIX>_{train,dev,test}.json` files in `root`; None when there is none."""
    prefixes = sorted({path.name[: -len(f"_{split}.json")] for split in SPLIT_NAMES
                       for path in Path(root).glob(f"*_{split}.json")})
    if len(prefixes) > 1:
        raise DataError(f"several mention file prefixes found ({', '.join(prefixes)}); pass the one to read "
                        "as `name`", path=root)
    return prefixes[0] if prefixes else None


def write_mimic_layout(dataset: Dataset, out_dir: Path, prefix: str = "WIKIMEL") -> Path:
    """Write `dataset` as a MIMIC-layout directory the official MIMIC/M3EL loaders can read; returns `out_dir`.

    Names and surfaces are URL-quoted (`urllib.parse.quote`), NIL becomes 'nil', no image becomes
    ''. Every row gets `attr`; `desc` is written for every row when any entity has a description
    (M3EL's loader reads `desc`). Existing image files are hard-linked or copied into `kb_image/`
    and `mention_image/` (mention images renamed `<stem>.jpg`, the name the official code looks up).
    """
    out_dir = Path(out_dir)
    if not prefix or "/" in prefix:
        raise DataError(f"prefix {prefix!r} must be a non-empty file-name prefix such as WIKIMEL")
    if dataset.kb.duplicate_qids:
        raise DataError(f"the KB has duplicate QIDs ({', '.join(dataset.kb.duplicate_qids[:5])}); qid2id.json "
                        "cannot hold them: deduplicate the KB first", path=dataset.root)
    check_output_directory(out_dir, marker_names=(KB_ENTITY_FILE,))
    with_descriptions = any(entity.description for entity in dataset.kb)
    with atomic_directory(out_dir) as staging:
        kb_images = _ImageFiles(dataset.root, staging / KB_IMAGE_DIR)
        rows = [_entity_to_row(row, entity, with_descriptions, kb_images) for row, entity in enumerate(dataset.kb)]
        atomic_write_json(staging / KB_ENTITY_FILE, rows, indent=None)
        atomic_write_text(staging / QID2ID_FILE, _qid2id_line(dataset.kb))
        mention_images = _ImageFiles(dataset.root, staging / MENTION_IMAGE_DIRS[0])
        for split, mentions in dataset.splits.items():
            records = [_mention_to_record(mention, mention_images) for mention in mentions]
            atomic_write_json(staging / f"{prefix}_{split}.json", records, indent=None)
        copied = (kb_images.copy_all(), mention_images.copy_all())
    logger.info("wrote MIMIC layout %s: %d entities, %d KB and %d mention image files", out_dir, len(dataset.kb),
                *copied)
    return out_dir


def _read_kb(root: Path, report: MimicReadReport) -> KnowledgeBase:
    path = root / KB_ENTITY_FILE
    rows = read_json(path)
    if not isinstance(rows, list):
        raise DataError(f"expected a JSON list of entity rows, got {type(rows).__name__}", path=path)
    for index, row in enumerate(rows):
        _check_row(row, index, path)
    rows = sorted(rows, key=lambda row: row["id"])
    ids = [row["id"] for row in rows]
    duplicated = [row_id for row_id, count in Counter(ids).items() if count > 1]
    if duplicated:
        raise DataError(f"duplicate row id(s) {duplicated[:5]}: every row needs its own id", path=path)
    report.ids_not_dense = ids != list(range(len(ids)))
    id_to_qid = _read_qid2id(root, set(ids), report)
    entities = [_row_to_entity(row, id_to_qid, root, path, report) for row in rows]
    report.entities = len(entities)
    return KnowledgeBase(entities)


def _check_row(row: Any, index: int, path: Path) -> None:
    where = f"#{index}"
    if not isinstance(row, dict):
        raise DataError(f"expected an object, got {type(row).__name__}", path=path, record=where)
    for key, expected in (("id", int), ("entity_name", str)):
        if key not in row:
            raise DataError(f"missing required key {key!r}", path=path, record=where)
        if not isinstance(row[key], expected) or isinstance(row[key], bool):
            raise DataError(f"{key!r} must be {expected.__name__}, got {row[key]!r:.60}", path=path, record=where)
    for key in ("attr", "desc", "qid"):
        if key in row and not isinstance(row[key], str):
            raise DataError(f"{key!r} must be a string, got {row[key]!r:.60}", path=path, record=where)
    images = row.get("image_list", [])
    if not isinstance(images, list) or not all(isinstance(name, str) for name in images):
        raise DataError(f"'image_list' must be a list of file names, got {images!r:.60}", path=path, record=where)


def _read_qid2id(root: Path, row_ids: set[int], report: MimicReadReport) -> dict[int, str]:
    """Invert qid2id.json into row id -> QID (first QID wins), checking it against the KB row ids."""
    path = root / QID2ID_FILE
    if not path.exists():
        return {}
    mapping = read_json(path)
    if not isinstance(mapping, dict):
        raise DataError(f"expected a JSON object QID -> row id, got {type(mapping).__name__}", path=path)
    id_to_qid: dict[int, str] = {}
    for qid, row_id in mapping.items():
        if not isinstance(row_id, int) or isinstance(row_id, bool):
            raise DataError(f"row id must be an integer, got {row_id!r:.60}", path=path, record=qid)
        if row_id not in row_ids:
            report.qid2id_rows_not_in_kb += 1
            report.note("qid2id row not in KB", f"{qid} -> {row_id}")
        elif row_id in id_to_qid:
            report.qid_conflicts += 1
            report.note("qid conflict", f"row {row_id}: {id_to_qid[row_id]} and {qid}")
        else:
            id_to_qid[row_id] = qid
    report.qid2id_entries = len(mapping)
    return id_to_qid


def _row_to_entity(row: dict[str, Any], id_to_qid: dict[int, str], root: Path, path: Path,
                   report: MimicReadReport) -> Entity:
    qid = _entity_qid(row, id_to_qid, report)
    where = f"id {row['id']}"
    images = tuple(_confined(root, f"{KB_IMAGE_DIR}/{name}", path, where) for name in row.get("image_list", []))
    extra = {key: value for key, value in row.items() if key not in _ENTITY_FIELDS}
    return Entity(qid=qid, name=unquote(row["entity_name"]), attributes=row.get("attr", ""),
                  description=row.get("desc", ""), images=images, extra=extra)


def _entity_qid(row: dict[str, Any], id_to_qid: dict[int, str], report: MimicReadReport) -> str:
    """A row's QID: its own `qid` field (third-party layouts), else qid2id.json inverted, else a placeholder."""
    mapped = id_to_qid.get(row["id"])
    if row.get("qid"):
        if mapped is not None and mapped != row["qid"]:
            report.qid_conflicts += 1
            report.note("qid conflict", f"row {row['id']}: qid field {row['qid']}, qid2id.json {mapped}")
        report.qid_sources["qid field"] += 1
        return row["qid"]
    if mapped is not None:
        report.qid_sources["qid2id.json"] += 1
        return mapped
    report.qid_sources["placeholder"] += 1
    report.note("placeholder qid", f"row {row['id']}")
    return f"{PLACEHOLDER_QID_PREFIX}{row['id']}"


def _mention_image_dir(root: Path) -> str:
    return next((name for name in MENTION_IMAGE_DIRS if (root / name).is_dir()), MENTION_IMAGE_DIRS[0])


def _read_mentions(path: Path, split: str, image_dir: str, root: Path, report: MimicReadReport) -> list[Mention]:
    records = read_json(path)
    if not isinstance(records, list):
        raise DataError(f"expected a JSON list of mentions, got {type(records).__name__}", path=path)
    mentions, renamed = unique_mention_ids([_record_to_mention(record, index, split, image_dir, root, path, report)
                                            for index, record in enumerate(records)])
    report.renamed_mention_ids += renamed
    report.mentions[split] = len(mentions)
    report.nil_mentions[split] = sum(mention.is_nil for mention in mentions)
    report.mentions_with_image[split] = sum(mention.image is not None for mention in mentions)
    return mentions


def _record_to_mention(record: Any, index: int, split: str, image_dir: str, root: Path, path: Path,
                       report: MimicReadReport) -> Mention:
    where = f"#{index}"
    if not isinstance(record, dict):
        raise DataError(f"expected an object, got {type(record).__name__}", path=path, record=where)
    for key in ("mentions", "sentence", "answer"):
        if key not in record:
            raise DataError(f"missing required key {key!r}", path=path, record=where)
    for key in ("mentions", "sentence", "answer", "imgPath"):
        if key in record and not isinstance(record[key], str):
            raise DataError(f"{key!r} must be a string, got {record[key]!r:.60}", path=path, record=where)
    if "id" in record:
        mention_id = str(record["id"])
    else:
        mention_id = f"{split}-{index}"
        report.generated_mention_ids += 1
    surface = unquote(record["mentions"])
    image_path = record.get("imgPath", "")
    image = _confined(root, f"{image_dir}/{official_image_name(image_path)}", path, where) if image_path else None
    answer = record["answer"]
    gold = None if answer.strip().lower() == NIL_ANSWER else answer
    extra = {key: value for key, value in record.items() if key not in _MENTION_FIELDS}
    return Mention(id=mention_id, sentence=record["sentence"], surface=surface,
                   span=locate_span(record["sentence"], surface), image=image, gold_qid=gold, extra=extra)


def official_image_name(image_path: str) -> str:
    """The mention image file the official code opens for `imgPath` (spec §1.1): `<stem>.jpg`."""
    return image_path.split("/")[-1].split(".")[0] + ".jpg"


def _confined(root: Path, relative: str, path: Path, where: str) -> str:
    try:
        resolve_in_root(root, relative)
    except PathEscapeError as error:
        raise PathEscapeError(str(error), path=path, record=where) from None
    return relative


class _ImageFiles:
    """Assigns each source image one unique file name in a target folder, then copies them all."""

    def __init__(self, source_root: Path, target_dir: Path):
        self.source_root = source_root
        self.target_dir = target_dir
        self.names: dict[str, str] = {}  # source relative path -> target file name
        self.taken: set[str] = set()

    def name_for(self, relative: str, preferred_stem: str, suffix: str) -> str:
        if relative not in self.names:
            stem, number = preferred_stem, 0
            while f"{stem}{suffix}" in self.taken:
                number += 1
                stem = f"{preferred_stem}_{number}"
            self.names[relative] = f"{stem}{suffix}"
            self.taken.add(self.names[relative])
        return self.names[relative]

    def copy_all(self) -> int:
        copied = 0
        for relative, name in tqdm(self.names.items(), desc=f"copy {self.target_dir.name}", unit="img",
                                   disable=len(self.names) < 1000):
            source = resolve_in_root(self.source_root, relative)
            if source.is_file():
                link_or_copy(source, self.target_dir / name)
                copied += 1
        return copied


def _entity_to_row(row: int, entity: Entity, with_descriptions: bool, images: _ImageFiles) -> dict[str, Any]:
    image_list = []
    for number, relative in enumerate(entity.images):
        source = PurePosixPath(relative)
        preferred = source.stem if relative.startswith(f"{KB_IMAGE_DIR}/") else f"{entity.qid}_{number}"
        image_list.append(images.name_for(relative, preferred, source.suffix or ".jpg"))
    record: dict[str, Any] = {"id": row, "type": "entity", "qid": entity.qid, "entity_name": quote(entity.name),
                              "attr": entity.attributes}
    if with_descriptions:
        record["desc"] = entity.description
    record["image_list"] = image_list
    return _merge_extra(record, entity.extra, _ENTITY_FIELDS, f"entity {entity.qid!r}")


def _mention_to_record(mention: Mention, images: _ImageFiles) -> dict[str, Any]:
    image_path = ""
    if mention.image:
        stem = PurePosixPath(mention.image).stem.replace(".", "_") or "image"
        image_path = images.name_for(mention.image, stem, ".jpg")
    record: dict[str, Any] = {"id": mention.id, "mentions": quote(mention.surface), "sentence": mention.sentence,
                              "imgPath": image_path, "answer": NIL_ANSWER if mention.is_nil else mention.gold_qid}
    return _merge_extra(record, mention.extra, _MENTION_FIELDS, f"mention {mention.id!r}")


def _merge_extra(record: dict[str, Any], extra: dict[str, Any], reserved: tuple[str, ...],
                 owner: str) -> dict[str, Any]:
    """Extra fields become top-level keys again (the inverse of reading); they may not shadow real fields."""
    clashes = sorted(set(extra) & set(reserved))
    if clashes:
        raise DataError(f"'extra' of {owner} holds {', '.join(clashes)}, which the MIMIC layout uses itself")
    return {**record, **extra}


def _qid2id_line(kb: KnowledgeBase) -> str:
    """qid2id.json on ONE line: the official loader reads it with `json.loads(f.readline())`."""
    return json.dumps({qid: row for row, qid in enumerate(kb.qids)}, ensure_ascii=False) + "\n"


__all__ = [
    "KB_ENTITY_FILE",
    "MENTION_IMAGE_DIRS",
    "QID2ID_FILE",
    "MimicReadReport",
    "detect_prefix",
    "official_image_name",
    "read_mimic_layout",
    "write_mimic_layout",
]
