"""`mmel data prepare`: turn the raw WikiMEL / RichpediaMEL releases into mmel JSONL datasets.

Raw layout (shared data README): `<raw>/wikimel/{Wikidata-MEL,splits,ne2qid,qid2abs}.json`,
`<raw>/richpediamel/{train,test,ne2qid,qid2abs,qid2abs_long,img_list}.json` (plus the optional
`Richpedia-MEL.json`, used only for cross-checks) and mention images in `<raw>/images/<name>/`.
The knowledge base is ne2qid inverted (names) + qid2abs (attribute text); RichpediaMEL adds
qid2abs_long as the description. Every skipped record is counted, with its reason, in a
`PreparationReport` written beside the data as PREPARATION.md and preparation.json.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from mmel.core.errors import DataError
from mmel.core.paths import read_json
from mmel.core.types import Dataset, Entity, KnowledgeBase, Mention, locate_span
from mmel.data.jsonl_format import check_split_name, read_dataset, span_matches, write_dataset

logger = logging.getLogger(__name__)

SPLIT_ORDER = ("train", "dev", "test")
# 1/8 of train: train:dev:test is then 7:1:2 as in the MIMIC split (12,464 / 1,780 / 3,561 mentions).
RICHPEDIAMEL_DEV_FRACTION = 0.125
RICHPEDIAMEL_SEED = 0
IMAGE_SUBDIR = "images"
REPORT_MARKDOWN = "PREPARATION.md"
REPORT_JSON = "preparation.json"

_CITATION = ("Wang et al., 'Multimodal Entity Linking: A New Dataset and A Baseline', ACM MM 2021; "
             "Wang et al., SIGIR 2022 (GHMFC)")
_WIKIMEL_SOURCE = ("WikiMEL prepared by mmel from MELBench Wikidata-MEL.json (MIT, (c) 2021 BlueStragglers) and "
                   f"MEL-GHMFC splits.json, ne2qid.json, qid2abs.json. Cite: {_CITATION}.")
_RICHPEDIAMEL_SOURCE = ("RichpediaMEL prepared by mmel from MEL-GHMFC train.json, test.json, ne2qid.json, "
                        "qid2abs.json, qid2abs_long.json, img_list.json (records of MELBench Richpedia-MEL.json, "
                        f"MIT, (c) 2021 BlueStragglers); dev split carved from train. Cite: {_CITATION}.")


@dataclass
class PreparationReport:
    """Counts of what a `prepare_*` run produced and skipped, with reasons."""

    name: str
    raw_dir: str = ""
    images_dir: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    entities: int = 0
    mentions: dict[str, int] = field(default_factory=dict)
    spans_not_located: dict[str, int] = field(default_factory=dict)
    mentions_with_image: dict[str, int] = field(default_factory=dict)
    gold_missing_from_kb: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, example: str) -> None:
        self.skipped[reason] += 1
        self.add_example(reason, example)

    def add_example(self, kind: str, example: str) -> None:
        examples = self.examples.setdefault(kind, [])
        if len(examples) < 5:
            examples.append(example)

    def count_split(self, split: str, mentions: list[Mention]) -> None:
        self.mentions[split] = len(mentions)
        self.spans_not_located[split] = sum(mention.span is None for mention in mentions)
        self.mentions_with_image[split] = sum(mention.image is not None for mention in mentions)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["skipped"] = dict(self.skipped)
        return values

    def to_markdown(self) -> str:
        lines = [f"# Preparation report: {self.name}", "",
                 f"- raw release: `{self.raw_dir}`", f"- mention images: `{self.images_dir or 'none'}`"]
        lines += [f"- {key}: {value}" for key, value in self.settings.items()]
        lines += ["", f"Knowledge base: {self.entities:,} entities. Gold QIDs missing from the KB: "
                      f"{self.gold_missing_from_kb:,}.", "",
                  "| split | mentions | span not located | with image |", "|---|---:|---:|---:|"]
        lines += [f"| {split} | {count:,} | {self.spans_not_located.get(split, 0):,} | "
                  f"{self.mentions_with_image.get(split, 0):,} |" for split, count in self.mentions.items()]
        lines += ["", "## Skipped", ""]
        lines += [f"- {reason}: {count:,} (e.g. {', '.join(self.examples.get(reason, []))})"
                  for reason, count in sorted(self.skipped.items())] or ["- nothing"]
        if self.notes:
            lines += ["", "## Notes", "", *[f"- {note}" for note in self.notes]]
        return "\n".join(lines) + "\n"


def default_images_dir(raw_dir: Path, name: str) -> Path | None:
    """`<raw>/images/<name>` when it exists (the shared data layout), else None."""
    candidate = Path(raw_dir) / "images" / name
    return candidate if candidate.is_dir() else None


def prepare_wikimel(raw_dir: Path, out_dir: Path, images_dir: Path | None = None,
                    report: PreparationReport | None = None) -> Dataset:
    """Build the WikiMEL dataset (KB of 18,880 entities; train/dev/test from splits.json) into `out_dir`.

    Each sample is exploded into one mention per (sample, mention) with id `<sample id>-<k>`
    (k from 0); the mention image is the sample's `<id>.jpg` when it exists in `images_dir`.
    """
    folder = _release_dir(raw_dir, "wikimel", "Wikidata-MEL.json")
    report = _start_report(report, "wikimel", folder, images_dir)
    samples = _read_object(folder / "Wikidata-MEL.json")
    kb = _build_kb(folder, report, description_file=None, fallback_names={})
    split_ids = _read_wikimel_splits(folder / "splits.json", samples, report)
    image_files = _image_files(images_dir)
    splits = {split: [mention for sample_id in ids
                      for mention in _explode_wikimel_sample(samples[sample_id], sample_id, image_files, folder)]
              for split, ids in split_ids.items()}
    dataset = Dataset("wikimel", kb, splits, images_dir or folder)
    return _finish(dataset, out_dir, report, _WIKIMEL_SOURCE, image_files)


def prepare_richpediamel(raw_dir: Path, out_dir: Path, images_dir: Path | None = None,
                         dev_fraction: float = RICHPEDIAMEL_DEV_FRACTION, seed: int = RICHPEDIAMEL_SEED,
                         report: PreparationReport | None = None) -> Dataset:
    """Build the RichpediaMEL dataset (KB = the 17,805 gold entities) into `out_dir`.

    train.json / test.json give the mentions (their sentences are the cleaned ones); a fixed dev
    split of `floor(dev_fraction * len(train))` samples is drawn from train with `seed`. Names come
    from ne2qid.json, and from the records' `entities` field for QIDs that ne2qid lacks (several
    entities share one name, and a JSON object keeps only one of them).
    """
    if not 0.0 <= dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    folder = _release_dir(raw_dir, "richpediamel", "train.json")
    report = _start_report(report, "richpediamel", folder, images_dir)
    report.settings.update({"dev_fraction": dev_fraction, "seed": seed})
    train = _richpedia_records(folder / "train.json")
    test = _richpedia_records(folder / "test.json")
    _check_disjoint(train, test, folder)
    _cross_check_full_release(folder, {**train, **test}, report)
    gold_names = {record["answer"]: record["entities"] for record in [*train.values(), *test.values()]}
    kb = _build_kb(folder, report, description_file="qid2abs_long.json", fallback_names=gold_names)
    image_files = _richpedia_image_files(folder, images_dir, set(train) | set(test), report)
    train_ids, dev_ids = _carve_dev(list(train), dev_fraction, seed)
    to_mentions = _richpedia_mentions
    splits = {"train": to_mentions(train, train_ids, image_files), "dev": to_mentions(train, dev_ids, image_files),
              "test": to_mentions(test, list(test), image_files)}
    dataset = Dataset("richpediamel", kb, splits, images_dir or folder)
    return _finish(dataset, out_dir, report, _RICHPEDIAMEL_SOURCE, _image_files(images_dir))


def _start_report(report: PreparationReport | None, name: str, folder: Path,
                  images_dir: Path | None) -> PreparationReport:
    report = PreparationReport(name) if report is None else report
    report.name, report.raw_dir = name, str(folder)
    report.images_dir = None if images_dir is None else str(images_dir)
    if images_dir is not None and not Path(images_dir).is_dir():
        raise DataError("images directory not found", path=images_dir)
    return report


def _release_dir(raw_dir: Path, name: str, marker: str) -> Path:
    """Accept either the raw root (holding `<name>/`) or the release folder itself."""
    raw_dir = Path(raw_dir)
    for folder in (raw_dir / name, raw_dir):
        if (folder / marker).is_file():
            return folder
    raise DataError(f"{marker} not found in {raw_dir / name} or {raw_dir}: is this the raw {name} release?",
                    path=raw_dir)


def _read_object(path: Path) -> dict[str, Any]:
    value = read_json(path)
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object, got {type(value).__name__}", path=path)
    return value


def _read_str_map(path: Path) -> dict[str, str]:
    mapping = _read_object(path)
    for key, value in mapping.items():
        if not isinstance(value, str):
            raise DataError(f"expected a string value, got {value!r:.60}", path=path, record=key)
    return mapping


def _build_kb(folder: Path, report: PreparationReport, description_file: str | None,
              fallback_names: dict[str, str]) -> KnowledgeBase:
    """Entities in qid2abs.json order: ne2qid inverted for names (else `fallback_names`), qid2abs as attributes."""
    names = _invert_ne2qid(folder / "ne2qid.json", report)
    attributes = _read_str_map(folder / "qid2abs.json")
    descriptions = _read_str_map(folder / description_file) if description_file else {}
    entities = []
    named_from_records: list[str] = []
    for qid, attribute_text in attributes.items():
        if not qid.strip():
            raise DataError("an empty QID: every entity needs one", path=folder / "qid2abs.json", record=repr(qid))
        name = names.get(qid)
        if name is None and qid in fallback_names:
            name = fallback_names[qid]
            named_from_records.append(qid)
        if name is None:
            report.skip("entities without any name (QID used as the name)", qid)
            name = qid
        entities.append(Entity(qid=qid, name=name, attributes=attribute_text, description=descriptions.get(qid, "")))
    if named_from_records:
        report.notes.append(f"{len(named_from_records):,} entity names are missing from ne2qid.json (it maps each "
                            "name to one QID and several entities share a name); they are taken from the records' "
                            f"`entities` field, e.g. {', '.join(named_from_records[:5])}.")
    for qid in sorted(set(names) - set(attributes)):
        report.skip("ne2qid.json QIDs without a qid2abs.json entry (not in the KB)", qid)
    for qid in sorted(set(descriptions) - set(attributes)):
        report.skip(f"{description_file} QIDs without a qid2abs.json entry (not in the KB)", qid)
    report.entities = len(entities)
    return KnowledgeBase(entities)


def _invert_ne2qid(path: Path, report: PreparationReport) -> dict[str, str]:
    names: dict[str, str] = {}
    for name, qid in _read_str_map(path).items():
        if qid in names:
            report.skip("ne2qid.json names of a QID that already has one (first kept)", f"{qid}: {name}")
        else:
            names[qid] = name
    return names


def _read_wikimel_splits(path: Path, samples: dict[str, Any], report: PreparationReport) -> dict[str, list[str]]:
    """Sample ids per split, in file order; unknown ids are counted and ignored, overlaps are errors."""
    raw_splits = _read_object(path)
    ordered = [s for s in SPLIT_ORDER if s in raw_splits] + [s for s in raw_splits if s not in SPLIT_ORDER]
    assigned: dict[str, str] = {}
    split_ids: dict[str, list[str]] = {}
    for split in ordered:
        check_split_name(split, path, record=split)
        if not isinstance(raw_splits[split], list):
            raise DataError(f"must be a list of sample ids, got {raw_splits[split]!r:.60}", path=path, record=split)
        split_ids[split] = []
        for raw_id in raw_splits[split]:
            sample_id = str(raw_id)
            if sample_id not in samples:
                report.skip("splits.json ids not in Wikidata-MEL.json (ignored)", sample_id)
            elif sample_id in assigned:
                raise DataError(f"sample {sample_id} is in both {assigned[sample_id]!r} and {split!r}", path=path)
            else:
                assigned[sample_id] = split
                split_ids[split].append(sample_id)
    for sample_id in samples:
        if sample_id not in assigned:
            report.skip("Wikidata-MEL.json samples in no split (not used)", sample_id)
    return split_ids


def _check_fields(record: Any, fields: dict[str, type], path: Path, where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"expected an object, got {type(record).__name__}", path=path, record=where)
    for key, expected in fields.items():
        if key not in record:
            raise DataError(f"missing required key {key!r}", path=path, record=where)
        if not isinstance(record[key], expected):
            raise DataError(f"{key!r} must be a {expected.__name__}, got {record[key]!r:.60}", path=path,
                            record=where)


def _explode_wikimel_sample(sample: Any, sample_id: str, image_files: set[str], folder: Path) -> list[Mention]:
    path = folder / "Wikidata-MEL.json"
    _check_fields(sample, {"sentence": str, "mentions": list, "entities": list, "answer": list}, path, sample_id)
    surfaces, names, answers = sample["mentions"], sample["entities"], sample["answer"]
    if not len(surfaces) == len(names) == len(answers):
        raise DataError(f"'mentions', 'entities' and 'answer' differ in length ({len(surfaces)}, {len(names)}, "
                        f"{len(answers)})", path=path, record=sample_id)
    image = f"{sample_id}.jpg" if f"{sample_id}.jpg" in image_files else None
    return [_mention(f"{sample_id}-{k}", sample["sentence"], surface, image, answer,
                     {"sample_id": sample_id, "entities": name})
            for k, (surface, name, answer) in enumerate(zip(surfaces, names, answers, strict=True))]


def _mention(mention_id: str, sentence: str, surface: str, image: str | None, answer: str,
             extra: dict[str, Any]) -> Mention:
    span = locate_span(sentence, surface)
    if span is not None and not span_matches(sentence, surface, span):
        span = None  # lower() changed the length of some character before the match
    gold = None if answer.strip().lower() in ("", "nil") else answer
    return Mention(id=mention_id, sentence=sentence, surface=surface, span=span, image=image, gold_qid=gold,
                   extra=extra)


def _image_files(images_dir: Path | None) -> set[str]:
    if images_dir is None:
        return set()
    return {path.name for path in Path(images_dir).iterdir() if path.is_file()}


def _richpedia_records(path: Path) -> dict[str, dict[str, Any]]:
    """Records of train.json / test.json keyed by sample id (the files are objects keyed by id)."""
    records = _read_object(path)
    for sample_id, record in records.items():
        _check_fields(record, {"sentence": str, "mentions": str, "entities": str, "answer": str}, path, sample_id)
    return records


def _check_disjoint(train: dict[str, Any], test: dict[str, Any], folder: Path) -> None:
    overlap = sorted(set(train) & set(test))
    if overlap:
        raise DataError(f"{len(overlap)} samples are in both train.json and test.json, e.g. {overlap[:5]}",
                        path=folder)


def _cross_check_full_release(folder: Path, used: dict[str, dict[str, Any]], report: PreparationReport) -> None:
    """Compare with Richpedia-MEL.json when present: count samples left out and sentences that differ."""
    full_path = folder / "Richpedia-MEL.json"
    if not full_path.is_file():
        return
    full = _read_object(full_path)
    for sample_id in full:
        if sample_id not in used:
            report.skip("Richpedia-MEL.json samples in neither train.json nor test.json", sample_id)
    changed = sum(1 for sample_id, record in used.items()
                  if isinstance(full.get(sample_id), dict) and full[sample_id].get("sentence") != record["sentence"])
    if changed:
        report.notes.append(f"{changed:,} sentences in train.json/test.json differ from Richpedia-MEL.json "
                            "(parenthetical asides removed); the train/test versions are used.")


def _richpedia_image_files(folder: Path, images_dir: Path | None, sample_ids: set[str],
                           report: PreparationReport) -> dict[str, str]:
    """Sample id -> image file name, from img_list.json, keeping only files present in `images_dir`.

    img_list.json's order matches neither Richpedia-MEL.json nor train+test, but each file's stem
    is its sample id (`raw_data/imgs/Q32529.jpg`), so entries are matched by stem.
    """
    list_path = folder / "img_list.json"
    if not list_path.is_file():
        report.notes.append("img_list.json not found: no mention images.")
        return {}
    entries = read_json(list_path)
    if not isinstance(entries, list):
        raise DataError(f"expected a JSON list of image paths, got {type(entries).__name__}", path=list_path)
    for index, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise DataError(f"expected an image path, got {entry!r:.60}", path=list_path, record=f"#{index}")
    present = _image_files(images_dir)
    by_sample: dict[str, str] = {}
    for entry in entries:
        file_name = PurePosixPath(entry).name
        sample_id = PurePosixPath(entry).stem
        if sample_id not in sample_ids:
            report.skip("img_list.json entries whose file stem is no sample id", entry)
        elif file_name in present:
            by_sample[sample_id] = file_name
    report.notes.append(f"img_list.json lists {len(entries):,} images, matched to samples by file stem; "
                        f"{len(by_sample):,} of them exist in the images directory.")
    return by_sample


def _carve_dev(train_ids: list[str], dev_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split train ids into (train, dev), both in file order; dev has floor(fraction * n) seeded-random ids."""
    dev = set(random.Random(seed).sample(train_ids, math.floor(dev_fraction * len(train_ids))))
    return [i for i in train_ids if i not in dev], [i for i in train_ids if i in dev]


def _richpedia_mentions(records: dict[str, dict[str, Any]], sample_ids: list[str],
                        image_files: dict[str, str]) -> list[Mention]:
    return [_mention(sample_id, records[sample_id]["sentence"], records[sample_id]["mentions"],
                     image_files.get(sample_id), records[sample_id]["answer"],
                     {"entities": records[sample_id]["entities"]})
            for sample_id in sample_ids]


def _finish(dataset: Dataset, out_dir: Path, report: PreparationReport, source: str,
            image_files: set[str]) -> Dataset:
    """Count, write the dataset with its report, and return it read back from `out_dir`."""
    used_images = {m.image for mentions in dataset.splits.values() for m in mentions}
    for file_name in sorted(image_files - used_images):
        report.skip("image files of no prepared mention (sample not in the release or not in a split)", file_name)
    for split, mentions in dataset.splits.items():
        report.count_split(split, mentions)
    gold_missing = [m for mentions in dataset.splits.values() for m in mentions
                    if not m.is_nil and m.gold_qid not in dataset.kb]
    report.gold_missing_from_kb = len(gold_missing)
    for mention in gold_missing[:5]:
        report.add_example("gold QIDs missing from the KB (kept)", f"{mention.id}: {mention.gold_qid}")
    extra_files = {REPORT_MARKDOWN: report.to_markdown(),
                   REPORT_JSON: json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n"}
    write_dataset(dataset, out_dir, source=source, image_subdir=IMAGE_SUBDIR, extra_files=extra_files)
    logger.info("prepared %s in %s: %d entities, %s", dataset.name, out_dir, len(dataset.kb), report.mentions)
    return read_dataset(out_dir)


__all__ = [
    "RICHPEDIAMEL_DEV_FRACTION",
    "RICHPEDIAMEL_SEED",
    "PreparationReport",
    "default_images_dir",
    "prepare_richpediamel",
    "prepare_wikimel",
]
