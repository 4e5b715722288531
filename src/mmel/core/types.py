"""The one data model of mmel: entities, mentions, knowledge bases, datasets.

Every reader produces these types and every model, baseline and evaluator consumes them.
Image paths are stored relative to the dataset root (`Dataset.root`) and resolved with
`mmel.core.paths.resolve_in_root`, so no record can point outside its data root.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmel.core.errors import NotFoundError

NIL = None  # gold_qid value of a mention whose entity is not in the KB


@dataclass(frozen=True)
class Entity:
    """One knowledge-base entity.

    `attributes` is the structured attribute text (MIMIC's `attr`, e.g. "Sex: male. Birth: ...");
    `description` is free prose (M3EL's `desc`, DIM's LLM-made brief). `images` are paths relative
    to the dataset root, first one = the image used at evaluation (spec §1.1).
    """

    qid: str
    name: str
    attributes: str = ""
    description: str = ""
    images: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def text(self, field_name: str = "attributes") -> str:
        """The entity text a model reads: `attributes` or `description` (falls back to the other)."""
        if field_name not in ("attributes", "description"):
            raise ValueError(f"unknown entity text field {field_name!r}; use 'attributes' or 'description'")
        primary = self.attributes if field_name == "attributes" else self.description
        fallback = self.description if field_name == "attributes" else self.attributes
        return primary or fallback


@dataclass(frozen=True)
class Mention:
    """One mention to link. `gold_qid is None` means NIL (no entity in the KB).

    `span` is the [start, end) character span of `surface` in `sentence`, or None when the
    surface form does not occur verbatim. `image` is relative to the dataset root, or None.
    `caption` is what an image-to-text model wrote about the image (DIM's BLIP-2 "expert cue",
    made by `mmel enrich captions`), or None.
    """

    id: str
    sentence: str
    surface: str
    span: tuple[int, int] | None = None
    image: str | None = None
    gold_qid: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    caption: str | None = None

    @property
    def is_nil(self) -> bool:
        return self.gold_qid is None


def locate_span(sentence: str, surface: str) -> tuple[int, int] | None:
    """First [start, end) occurrence of `surface` in `sentence` (exact, then case-insensitive).

    Offsets always index `sentence` itself: case folding can change a string's length ('İ'.lower()
    is two characters), so the case-insensitive search runs on the original text and keeps only
    windows of `len(surface)` characters whose lower-case form equals the surface's.
    """
    if not surface:
        return None
    start = sentence.find(surface)
    if start >= 0:
        return start, start + len(surface)
    folded = surface.lower()
    for match in re.finditer(f"(?={re.escape(surface)})", sentence, re.IGNORECASE):
        start = match.start()
        if sentence[start:start + len(surface)].lower() == folded:
            return start, start + len(surface)
    return None


class KnowledgeBase(Sequence[Entity]):
    """An ordered list of entities with O(1) QID lookup. Row order is the ranking order."""

    def __init__(self, entities: Iterable[Entity]):
        self._entities: list[Entity] = list(entities)
        self._row: dict[str, int] = {}
        duplicates = []
        for row, entity in enumerate(self._entities):
            if entity.qid in self._row:
                duplicates.append(entity.qid)
            else:
                self._row[entity.qid] = row
        self.duplicate_qids: tuple[str, ...] = tuple(duplicates)

    def __len__(self) -> int:
        return len(self._entities)

    def __getitem__(self, row):  # type: ignore[override]
        return self._entities[row]

    def __iter__(self) -> Iterator[Entity]:
        return iter(self._entities)

    def __contains__(self, qid: object) -> bool:
        return qid in self._row

    @property
    def qids(self) -> list[str]:
        return [entity.qid for entity in self._entities]

    def row_of(self, qid: str) -> int:
        """Row of `qid`; raises KeyError naming the QID."""
        try:
            return self._row[qid]
        except KeyError:
            raise NotFoundError(f"QID {qid!r} is not in the knowledge base ({len(self)} entities)") from None

    def get(self, qid: str) -> Entity | None:
        row = self._row.get(qid)
        return None if row is None else self._entities[row]


@dataclass
class Dataset:
    """A knowledge base plus named splits of mentions, rooted at a directory for images."""

    name: str
    kb: KnowledgeBase
    splits: dict[str, list[Mention]]
    root: Path

    def split(self, name: str) -> list[Mention]:
        try:
            return self.splits[name]
        except KeyError:
            raise NotFoundError(f"dataset {self.name!r} has no split {name!r}; available: "
                           f"{', '.join(sorted(self.splits)) or 'none'}") from None


@dataclass(frozen=True)
class Candidate:
    """One ranked entity for a mention: final score plus the model's per-unit scores."""

    qid: str
    name: str
    score: float
    rank: int
    unit_scores: dict[str, float] = field(default_factory=dict)
    retrieval_score: float | None = None
    first_stage_rank: int | None = None   # 0-based position in the first stage's shortlist


@dataclass(frozen=True)
class LinkResult:
    """The answer for one mention: ranked candidates, and `nil` when the NIL statistic is under the threshold.

    `nil_statistic` names what the threshold applies to: the top-1 'score', or its 'margin' over the runner-up.
    """

    mention: Mention
    candidates: tuple[Candidate, ...]
    nil: bool = False
    nil_threshold: float | None = None
    nil_statistic: str | None = None

    @property
    def best(self) -> Candidate | None:
        return None if self.nil or not self.candidates else self.candidates[0]
