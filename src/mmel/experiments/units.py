"""What each of a model's units contributes: its ranking alone, and where it is right when the model is not.

MIMIC and M3EL sum (or average) the scores of several matching units (text, image, cross-modal).
To say why one model beats another, `unit_analysis` links a split once through the served linker
with the model alone, then ranks each mention's same K candidates by every unit's score on its own:

- Hits@1 / MRR of the unit alone (full-KB protocol, ties against the gold, as every report);
- `unit_right_model_wrong`: mentions the unit ranks correctly while the model's sum does not (what
  the other units cost there), and `model_right_unit_wrong` the reverse (what the unit gets from the
  others);
- `scored_pairs`: the share of (mention, candidate) pairs where the unit's score is not exactly 0, as
  a masked unit (an image unit where a side has no image) scores 0 and carries no signal there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmel.core.types import Dataset, LinkResult
from mmel.evaluation.protocols import RankingResult
from mmel.experiments.evaluate import link_split_once, ranking_from_links, rescored
from mmel.features.views import DatasetFeatures

MODEL = "model"   # the row of the model's own score


@dataclass
class UnitAnalysis:
    """Per unit (and the model itself, row `MODEL`): metrics alone and agreement with the model at rank 1."""

    checkpoint: str
    split: str
    mentions: int
    first_stage: str
    candidates: int
    metrics: dict[str, dict[str, float]]        # unit -> hits@k, mrr
    unit_right_model_wrong: dict[str, int]
    model_right_unit_wrong: dict[str, int]
    scored_pairs: dict[str, float]              # unit -> share of pairs with a non-zero score

    def to_markdown(self) -> str:
        lines = [f"Units of {self.checkpoint} on {self.split} ({self.mentions} mentions, {self.first_stage} top "
                 f"{self.candidates} reranked by each unit alone, full KB, ties against the gold)", "",
                 "| unit | H@1 | H@3 | H@10 | MRR | right where the model is wrong | wrong where the model is right "
                 "| pairs scored |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for unit, values in self.metrics.items():
            lines.append(f"| {unit} | {100 * values['hits@1']:.2f} | {100 * values['hits@3']:.2f} | "
                         f"{100 * values['hits@10']:.2f} | {100 * values['mrr']:.2f} | "
                         f"{self.unit_right_model_wrong[unit]} | {self.model_right_unit_wrong[unit]} | "
                         f"{100 * self.scored_pairs[unit]:.1f}% |")
        return "\n".join(lines) + "\n"


def unit_analysis(dataset: Dataset, split: str, checkpoint: Path, features: DatasetFeatures, *,
                  first_stage: str = "hybrid", num_candidates: int = 100, progress: bool = True) -> UnitAnalysis:
    """Rank `split`'s served shortlists by the model and by each of its units alone (module doc)."""
    to_rank, linked = link_split_once(dataset, split, checkpoint, features, first_stage=first_stage,
                                      num_candidates=num_candidates, progress=progress)
    units = _unit_names(linked)
    model_ranking = ranking_from_links(linked, to_rank.gold_rows, dataset.kb.qids)
    model_first = _gold_first(model_ranking)
    metrics = {MODEL: model_ranking.metrics()}
    right_wrong, wrong_right = {MODEL: 0}, {MODEL: 0}
    scored = {MODEL: _scored_share(linked, None)}
    for unit in units:
        by_unit = [rescored(result, [c.unit_scores[unit] for c in result.candidates]) for result in linked]
        unit_ranking = ranking_from_links(by_unit, to_rank.gold_rows, dataset.kb.qids)
        metrics[unit] = unit_ranking.metrics()
        unit_first = _gold_first(unit_ranking)
        right_wrong[unit] = int((unit_first & ~model_first).sum())
        wrong_right[unit] = int((model_first & ~unit_first).sum())
        scored[unit] = _scored_share(linked, unit)
    return UnitAnalysis(checkpoint=str(checkpoint), split=to_rank.name, mentions=len(to_rank.gold_rows),
                        first_stage=first_stage, candidates=num_candidates, metrics=metrics,
                        unit_right_model_wrong=right_wrong, model_right_unit_wrong=wrong_right, scored_pairs=scored)


def _unit_names(linked: Sequence[LinkResult]) -> list[str]:
    """The units the model reported, in its order (every candidate of a model reports the same units)."""
    return next((list(result.candidates[0].unit_scores) for result in linked if result.candidates), [])


def _gold_first(ranking: RankingResult) -> np.ndarray:
    """[M] bool: the gold is at rank 1 with no tie (ties count against the gold, as in every report)."""
    return (ranking.gold_rows >= 0) & (ranking.num_greater == 0) & (ranking.num_tied == 0)


def _scored_share(linked: Sequence[LinkResult], unit: str | None) -> float:
    """Share of candidate pairs whose score (the unit's, or the model's when `unit` is None) is not exactly 0."""
    values = [c.score if unit is None else c.unit_scores[unit] for result in linked for c in result.candidates]
    return float(np.mean(np.asarray(values) != 0.0)) if values else 0.0


__all__ = ["MODEL", "UnitAnalysis", "unit_analysis"]
