"""Reranking a first stage's shortlists with a model, the name prior and the tie rule (the one implementation).

For each mention, the model scores the mention against each of its K shortlisted entities
(`MelModel.match_candidates` over the entities' cached rows). With a context prior (an mmel option
fitted on dev and stored in the checkpoint: `lexical.context_features`), each score becomes
`score + sum_f w_f * f(mention, entity)` and the unit scores gain each weighted feature; the name
prior `score + w * name_match(surface, entity name)` is its one-feature case. Candidates are then
ordered by score, ties keeping first-stage order (`order_by_score`).

The served linker, `mmel evaluate --first-stage`, `mmel tune-name-prior` and `mmel fit-prior` all go
through here.

Shapes: B mentions, K candidates per mention, U distinct shortlisted entities.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from mmel.core.types import Entity, Mention
from mmel.lexical.context_features import FEATURE_NAMES, NO_PRIOR, ContextPrior, candidate_features
from mmel.models.base import MelModel, RowCache
from mmel.retrieval.first_stage import Shortlist

CacheRows = Callable[[list[str]], RowCache]
"""QIDs [U] -> the model's entity cache rows of those entities, in that order."""


@dataclass
class RankedCandidate:
    """One reranked entity: final score, the model's unit scores and where the first stage had it."""

    qid: str
    score: float
    unit_scores: dict[str, float]
    retrieval_score: float
    first_stage_rank: int       # 0-based position in the shortlist


def order_by_score(scores: Sequence[float], first_stage_ranks: Sequence[int] | None = None) -> list[int]:
    """Positions sorted by descending score, equal scores in first-stage order (the tie rule).

    `first_stage_ranks` gives each position's first-stage rank; None means the positions are in first-stage order.
    """
    ranks = range(len(scores)) if first_stage_ranks is None else first_stage_ranks
    return sorted(range(len(scores)), key=lambda i: (-scores[i], ranks[i]))


def with_prior(scores: Sequence[float], features: Sequence[Sequence[float]], prior: ContextPrior
               ) -> tuple[list[float], dict[str, list[float]]]:
    """[K] scores with the prior added, and the [K] values of each weighted feature (as unit scores)."""
    if not prior:
        return list(scores), {}
    used = [name for name, weight in prior.to_dict().items() if weight]
    units = {name: [row[FEATURE_NAMES.index(name)] for row in features] for name in used}
    return prior.apply(scores, features), units


def model_scores(model: MelModel, mentions: RowCache, shortlists: list[Shortlist],
                 cache_rows: CacheRows) -> list[tuple[list[float], dict[str, list[float]]]]:
    """The model's score and unit scores of each mention against each of its shortlisted entities.

    Every distinct shortlisted entity's cache row is gathered once; shorter shortlists are padded
    with the first row and the padding is never read.
    """
    distinct = list(dict.fromkeys(qid for shortlist in shortlists for qid, _ in shortlist))
    if not distinct:
        return [([], {}) for _ in shortlists]
    position = {qid: index for index, qid in enumerate(distinct)}
    width = max(len(shortlist) for shortlist in shortlists)
    candidates = torch.zeros((len(shortlists), width), dtype=torch.long)                # [B, K]
    for row, shortlist in enumerate(shortlists):
        candidates[row, :len(shortlist)] = torch.tensor([position[qid] for qid, _ in shortlist], dtype=torch.long)
    output = model.match_candidates(mentions, cache_rows(distinct), candidates)
    scored = []
    for row, shortlist in enumerate(shortlists):
        count = len(shortlist)
        scored.append((output.scores[row, :count].tolist(),
                       {name: values[row, :count].tolist() for name, values in output.unit_scores.items()}))
    return scored


def rerank(model: MelModel | None, encoded: RowCache | None, shortlists: list[Shortlist], cache_rows: CacheRows, *,
           mentions: Sequence[Mention], entities: Mapping[str, Entity], prior: ContextPrior = NO_PRIOR
           ) -> list[list[RankedCandidate]]:
    """Each mention's shortlist reranked (best first), scored from the model's `encoded` mentions cache [B].

    `model` None keeps the first-stage scores (and needs no cache).
    `entities` (QID -> Entity) must cover the shortlisted entities when `prior` weights anything.
    """
    if model is None:
        scored = [([score for _, score in shortlist], {}) for shortlist in shortlists]
    else:
        scored = model_scores(model, encoded, shortlists, cache_rows)
    ranked = []
    for mention, shortlist, (scores, units) in zip(mentions, shortlists, scored, strict=True):
        if prior:
            features = candidate_features(mention, [entities[qid] for qid, _ in shortlist])      # [K][F]
            scores, prior_units = with_prior(scores, features, prior)
            units = {**units, **prior_units}
        ranked.append([RankedCandidate(qid=shortlist[i][0], score=scores[i],
                                       unit_scores={name: values[i] for name, values in units.items()},
                                       retrieval_score=shortlist[i][1], first_stage_rank=i)
                       for i in order_by_score(scores)])
    return ranked


__all__ = ["CacheRows", "RankedCandidate", "model_scores", "order_by_score", "rerank", "with_prior"]
