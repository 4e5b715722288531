"""`mmel data validate`: a report of what a dataset holds and what is wrong with it.

Errors are problems that make numbers wrong or ambiguous (a gold QID missing from the KB, the same
QID on two KB rows, the same mention id twice in a split, an image path that leaves the data root).
Everything else is counted as information: NIL mentions, surfaces not found in their sentence,
missing or unusable images (the normal case for these benchmarks), entities without text, entities
with a description and mentions with a caption, and the steps of `enrichment.json` (`mmel enrich`).
"""

from __future__ import annotations

import stat
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mmel.core.errors import DataError, PathEscapeError
from mmel.core.images import ImageReport, load_image
from mmel.core.paths import read_json, resolve_in_root
from mmel.core.types import Dataset, Mention, locate_span

_EXAMPLES_PER_KIND = 5
_ESCAPES = "escapes the data root"
ENRICHMENT_FILE = "enrichment.json"  # provenance written by `mmel enrich` beside the data
_STEP_COUNTS = {"answered": "answered", "cached": "from cache", "failed": "failed"}  # key -> label in the report


@dataclass
class ValidationReport:
    """Counts per split and per KB, with a few examples of each problem."""

    name: str
    root: str
    entities: int
    split_counts: dict[str, int] = field(default_factory=dict)
    nil_mentions: dict[str, int] = field(default_factory=dict)
    surface_not_in_sentence: dict[str, int] = field(default_factory=dict)
    gold_missing_from_kb: dict[str, int] = field(default_factory=dict)
    duplicate_mention_ids: dict[str, int] = field(default_factory=dict)
    mentions_with_image: dict[str, int] = field(default_factory=dict)
    duplicate_qids: list[str] = field(default_factory=list)
    entities_without_text: int = 0
    entities_with_images: int = 0
    entities_with_description: int = 0
    mentions_with_caption: dict[str, int] = field(default_factory=dict)
    enrichment: list[str] = field(default_factory=list)
    images_decoded: bool = True
    mention_images: ImageReport = field(default_factory=ImageReport)
    entity_images: ImageReport = field(default_factory=ImageReport)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add_example(self, kind: str, example: str) -> None:
        examples = self.examples.setdefault(kind, [])
        if len(examples) < _EXAMPLES_PER_KIND:
            examples.append(example)

    def errors(self) -> list[str]:
        """One line per kind of error; empty when the dataset can be used as it is."""
        found = []
        if sum(self.gold_missing_from_kb.values()):
            found.append(f"{sum(self.gold_missing_from_kb.values())} mentions whose gold QID is not in the KB")
        if self.duplicate_qids:
            found.append(f"{len(self.duplicate_qids)} QIDs on more than one KB row")
        if sum(self.duplicate_mention_ids.values()):
            found.append(f"{sum(self.duplicate_mention_ids.values())} repeated mention ids within a split")
        escaping = sum(images.problems[_ESCAPES] for images in (self.mention_images, self.entity_images))
        if escaping:
            found.append(f"{escaping} image paths that escape the data root")
        return found

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "root": self.root, "entities": self.entities, "split_counts": self.split_counts,
            "nil_mentions": self.nil_mentions, "surface_not_in_sentence": self.surface_not_in_sentence,
            "gold_missing_from_kb": self.gold_missing_from_kb, "duplicate_mention_ids": self.duplicate_mention_ids,
            "mentions_with_image": self.mentions_with_image, "duplicate_qids": self.duplicate_qids,
            "entities_without_text": self.entities_without_text, "entities_with_images": self.entities_with_images,
            "entities_with_description": self.entities_with_description,
            "mentions_with_caption": self.mentions_with_caption, "enrichment": self.enrichment,
            "images_decoded": self.images_decoded, "mention_images": _image_report_dict(self.mention_images),
            "entity_images": _image_report_dict(self.entity_images), "examples": self.examples,
            "errors": self.errors(),
        }

    def to_markdown(self) -> str:
        lines = [f"# Dataset `{self.name}`", "", f"Root: `{self.root}`", "",
                 f"Knowledge base: {self.entities:,} entities, {self.entities_with_images:,} with images, "
                 f"{self.entities_without_text:,} without text, {self.entities_with_description:,} with a "
                 f"description, {len(self.duplicate_qids):,} duplicate QIDs.", "",
                 "| split | mentions | NIL | surface not in sentence | gold not in KB | duplicate ids | with image |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for split, count in self.split_counts.items():
            values = (self.nil_mentions, self.surface_not_in_sentence, self.gold_missing_from_kb,
                      self.duplicate_mention_ids, self.mentions_with_image)
            lines.append(f"| {split} | {count:,} | " + " | ".join(f"{v.get(split, 0):,}" for v in values) + " |")
        if any(self.mentions_with_caption.values()):
            lines += ["", "Mentions with a caption: " + ", ".join(
                f"{split} {count:,}" for split, count in self.mentions_with_caption.items()) + "."]
        if self.enrichment:
            lines += ["", f"Enrichment ({ENRICHMENT_FILE}):"] + [f"- {step}" for step in self.enrichment]
        check = "decoded" if self.images_decoded else "checked for existence only"
        lines += ["", f"Images ({check}): mentions: {self.mention_images.summary()}; "
                      f"entities: {self.entity_images.summary()}."]
        lines += ["", "## Errors", ""] + ([f"- {error}" for error in self.errors()] or ["- none"])
        if self.examples:
            lines += ["", "## Examples", ""]
            lines += [f"- {kind}: {'; '.join(examples)}" for kind, examples in sorted(self.examples.items())]
        return "\n".join(lines) + "\n"


def validate_dataset(dataset: Dataset, *, decode_images: bool = True) -> ValidationReport:
    """Check `dataset` and count what is wrong; never raises on bad content.

    With `decode_images=False` image files are only checked for existence (fast on large KBs).
    """
    report = ValidationReport(name=dataset.name, root=str(dataset.root), entities=len(dataset.kb),
                              duplicate_qids=list(dataset.kb.duplicate_qids), images_decoded=decode_images)
    for qid in report.duplicate_qids:
        report.add_example("duplicate QID", qid)
    _check_entities(dataset, report)
    for split, mentions in dataset.splits.items():
        _check_split(dataset, split, mentions, report)
    mention_images = {m.image for mentions in dataset.splits.values() for m in mentions if m.image}
    entity_images = {image for entity in dataset.kb for image in entity.images}
    _check_images(dataset, sorted(mention_images), report.mention_images, decode_images, "mention images")
    _check_images(dataset, sorted(entity_images), report.entity_images, decode_images, "entity images")
    report.enrichment = _enrichment_steps(dataset)
    return report


def _check_entities(dataset: Dataset, report: ValidationReport) -> None:
    for entity in dataset.kb:
        if not entity.text().strip():
            report.entities_without_text += 1
            report.add_example("entity without text", entity.qid)
        if entity.images:
            report.entities_with_images += 1
        if entity.description.strip():
            report.entities_with_description += 1


def _check_split(dataset: Dataset, split: str, mentions: list[Mention], report: ValidationReport) -> None:
    report.split_counts[split] = len(mentions)
    report.nil_mentions[split] = sum(mention.is_nil for mention in mentions)
    report.mentions_with_image[split] = sum(mention.image is not None for mention in mentions)
    report.mentions_with_caption[split] = sum(mention.caption is not None for mention in mentions)
    not_found = [m for m in mentions if locate_span(m.sentence, m.surface) is None]
    report.surface_not_in_sentence[split] = len(not_found)
    for mention in not_found:
        report.add_example("surface not in sentence", f"{split}/{mention.id}: {_shorten(mention.surface)!r}")
    missing_gold = [m for m in mentions if not m.is_nil and m.gold_qid not in dataset.kb]
    report.gold_missing_from_kb[split] = len(missing_gold)
    for mention in missing_gold:
        report.add_example("gold QID not in KB", f"{split}/{mention.id}: {mention.gold_qid}")
    repeated = [(mention_id, count) for mention_id, count in Counter(m.id for m in mentions).items() if count > 1]
    report.duplicate_mention_ids[split] = sum(count - 1 for _, count in repeated)
    for mention_id, count in repeated:
        report.add_example("duplicate mention id", f"{split}/{mention_id} x{count}")


def _check_images(dataset: Dataset, relatives: Iterable[str], image_report: ImageReport, decode: bool,
                  label: str) -> None:
    relatives = list(relatives)
    for relative in tqdm(relatives, desc=f"check {label}", unit="img", disable=len(relatives) < 1000):
        try:
            if decode:
                load_image(dataset.root, relative, image_report)
            else:
                _check_image_file(resolve_in_root(dataset.root, relative), relative, image_report)
        except PathEscapeError:
            image_report.add_problem(_ESCAPES, relative)


def _check_image_file(path: Path, relative: str, image_report: ImageReport) -> None:
    """Existence check without opening: a FIFO or device is a named problem, not a usable image."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        image_report.add_problem("missing", relative)
        return
    except OSError as error:
        image_report.add_problem(f"unreadable ({error.strerror})", relative)
        return
    if stat.S_ISREG(mode):
        image_report.loaded += 1
    else:
        image_report.add_problem("not a regular file", relative)


def read_enrichment(root: Path) -> dict[str, Any]:
    """The `enrichment.json` beside the dataset at `root`, checked ({} when there is none).

    It is read back by `mmel enrich` (to add a step) and by validation (to report the steps): the
    fields they use are checked here, each bad step named by its position.
    """
    path = Path(root) / ENRICHMENT_FILE
    if not path.is_file():
        return {}
    record = read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("steps"), list):
        raise DataError("expected an object with a 'steps' list", path=path)
    for key in ("source_dataset", "source_note"):
        if not isinstance(record.get(key, ""), str):
            raise DataError(f"{key!r} must be a string, got {record[key]!r:.60}", path=path)
    for index, step in enumerate(record["steps"]):
        _check_step(step, path, f"step #{index}")
    return record


def _check_step(step: Any, path: Path, where: str) -> None:
    if not isinstance(step, dict):
        raise DataError(f"expected an object, got {type(step).__name__}", path=path, record=where)
    for key in ("step", "model"):
        if not isinstance(step.get(key), str):
            raise DataError(f"{key!r} must be a string, got {step.get(key)!r:.60}", path=path, record=where)
    if not isinstance(step.get("date", ""), str):
        raise DataError(f"'date' must be a string, got {step['date']!r:.60}", path=path, record=where)
    counts = step.get("counts", {})
    if not isinstance(counts, dict) or not all(_is_count(counts.get(key, 0)) for key in _STEP_COUNTS):
        raise DataError(f"'counts' must map {', '.join(_STEP_COUNTS)} to integers, got {counts!r:.60}",
                        path=path, record=where)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _enrichment_steps(dataset: Dataset) -> list[str]:
    """One line per step of the dataset's `enrichment.json`; an unreadable file is reported, not raised."""
    try:
        steps = read_enrichment(dataset.root).get("steps", [])
    except DataError as error:
        return [f"unreadable: {error}"]
    return [f"{step['step']} by {step['model']} on {step.get('date', '?')}: {_step_counts(step)}" for step in steps]


def _step_counts(step: dict[str, Any]) -> str:
    counts = step.get("counts", {})
    return ", ".join(f"{counts.get(key, 0):,} {label}" for key, label in _STEP_COUNTS.items())


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _image_report_dict(report: ImageReport) -> dict[str, Any]:
    return {"usable": report.loaded, "problems": dict(report.problems), "examples": report.examples}


__all__ = ["ENRICHMENT_FILE", "ValidationReport", "read_enrichment", "validate_dataset"]
