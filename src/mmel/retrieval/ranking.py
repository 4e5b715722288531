"""Rank mentions against a whole KB with a trained model: exhaustive, or retrieve-then-rerank.

`ModelScorer` computes everything that depends on the entity alone once per KB
(`MelModel.encode_entities`) and only the mention-entity interaction per block, unlike the
published evaluation, which re-runs every unit for every mention batch (`NaiveModelScorer`
keeps that behaviour as the reference for benchmarks and equivalence tests).

`rank_two_stage` is the shape text-linking toolkits use: a cheap first stage (dense, BM25 or
their fusion) keeps the top K entities, the model reranks them. It returns a full-KB ranking all
the same: the reranked K first, then every other entity in first-stage order, so its Hits@k,
MRR and MR are full-KB numbers comparable with exhaustive ranking (a gold entity the first
stage misses keeps its first-stage rank, which is > K).

Letters: M mentions, N entities, b mentions in a block, n entities in a block, K candidates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mmel.core.features import FeatureTable
from mmel.evaluation.protocols import RankingResult, ScoreBlock, as_numpy_scores, rank_full_kb
from mmel.models.base import MelModel

Reranker = Callable[[np.ndarray, np.ndarray], "np.ndarray | torch.Tensor"]
"""(mention_rows [b], candidate_rows [b, K]) -> scores [b, K]."""


class ModelScorer:
    """Scores with a MelModel; the entity side is encoded once, the mention side once per block of rows."""

    def __init__(self, model: MelModel, entities: FeatureTable, mentions: FeatureTable, *,
                 encode_batch_size: int = 1024, progress: bool = True, entity_cache: Any = None):
        """`entity_cache`: the model's cache of `entities`, when already computed (e.g. for another split)."""
        self.model = model.eval()
        self.entities = entities
        self.mentions = mentions
        self.encode_batch_size = encode_batch_size
        self.progress = progress
        self._entity_cache = entity_cache
        self._mention_rows: np.ndarray | None = None
        self._mention_cache = None

    @property
    def entity_cache(self):
        """The model's per-entity cache for the whole KB, computed on first use."""
        if self._entity_cache is None:
            self._entity_cache = self._encode_all_entities()
        return self._entity_cache

    @torch.inference_mode()
    def _encode_all_entities(self):
        starts = range(0, len(self.entities), self.encode_batch_size)
        parts = [self.model.encode_entities(self.entities.gather(np.arange(s, min(s + self.encode_batch_size,
                                                                                   len(self.entities)))))
                 for s in tqdm(starts, desc="encoding KB (entity side)", unit="batch", disable=not self.progress)]
        return self.model.entity_cache_class.concat(parts)

    @torch.inference_mode()
    def encoded_mentions(self, mention_rows: np.ndarray):
        """The model's mention cache for `mention_rows` (kept for the next call with the same rows)."""
        if self._mention_rows is None or not np.array_equal(self._mention_rows, mention_rows):
            self._mention_cache = self.model.encode_mentions(self.mentions.gather(mention_rows))
            self._mention_rows = np.array(mention_rows, copy=True)
        return self._mention_cache

    @torch.inference_mode()
    def score_block(self, mention_rows: np.ndarray, start: int, stop: int) -> torch.Tensor:
        """[b, n] scores of mentions `mention_rows` against entity rows [start, stop)."""
        mentions = self.encoded_mentions(mention_rows)
        return self.model.match(mentions, self.entity_cache.select(slice(start, stop))).scores

    @torch.inference_mode()
    def rerank(self, mention_rows: np.ndarray, candidate_rows: np.ndarray) -> torch.Tensor:
        """[b, K] scores of each mention against its own K candidate entities."""
        mentions = self.encoded_mentions(mention_rows)
        return self.model.match_candidates(mentions, self.entity_cache, torch.as_tensor(candidate_rows)).scores


class NaiveModelScorer:
    """The published evaluation's cost model: every block re-encodes its entities and mentions (reference)."""

    def __init__(self, model: MelModel, entities: FeatureTable, mentions: FeatureTable):
        self.model = model.eval()
        self.entities = entities
        self.mentions = mentions

    @torch.inference_mode()
    def score_block(self, mention_rows: np.ndarray, start: int, stop: int) -> torch.Tensor:
        mentions = self.mentions.gather(mention_rows)
        entities = self.entities.gather(np.arange(start, stop))
        return self.model(mentions, entities).scores


def rank_two_stage(first_stage: ScoreBlock, rerank: Reranker, gold_rows: np.ndarray, num_entities: int, *,
                   num_candidates: int, mention_batch_size: int = 64, entity_chunk_size: int = 8192,
                   progress: bool = True) -> RankingResult:
    """Full-KB ranking where only the first stage's top `num_candidates` are reranked (see module doc)."""
    first = rank_full_kb(first_stage, gold_rows, num_entities, top_k=num_candidates,
                         mention_batch_size=mention_batch_size, entity_chunk_size=entity_chunk_size,
                         progress=progress)
    return rerank_first_stage(first, rerank, mention_batch_size=mention_batch_size, progress=progress)


def rerank_first_stage(first: RankingResult, rerank: Reranker, *, mention_batch_size: int = 64,
                       progress: bool = True) -> RankingResult:
    """`first` (a full-KB ranking that kept its top K) with each mention's top K reordered by `rerank`.

    Reuse one first stage for several rerankers (e.g. when tuning a weight) without ranking the KB again.
    """
    num_candidates = first.topk_rows.shape[1]
    result = RankingResult(gold_rows=first.gold_rows.copy(), gold_scores=first.gold_scores.copy(),
                           num_greater=first.num_greater.copy(), num_tied=first.num_tied.copy(),
                           topk_rows=first.topk_rows.copy(), topk_scores=first.topk_scores.copy())
    batches = range(0, len(first.gold_rows), mention_batch_size)
    for start in tqdm(batches, desc=f"reranking top {num_candidates}", unit="batch", disable=not progress):
        rows = np.arange(start, min(start + mention_batch_size, len(first.gold_rows)))
        _rerank_batch(rerank, rows, result)
    return result


def _rerank_batch(rerank: Reranker, rows: np.ndarray, result: RankingResult) -> None:
    candidates = result.topk_rows[rows]                                               # [b, K]
    scores = as_numpy_scores(rerank(rows, candidates), np.float64)                   # [b, K]
    if scores.shape != candidates.shape:
        raise ValueError(f"reranker returned shape {scores.shape} for candidates {candidates.shape}")
    order = np.lexsort((candidates, -scores), axis=-1)
    result.topk_rows[rows] = np.take_along_axis(candidates, order, axis=1)
    result.topk_scores[rows] = np.take_along_axis(scores, order, axis=1)
    gold = result.gold_rows[rows]
    found = (candidates == gold[:, None]) & (gold[:, None] >= 0)                      # [b, K]
    for position in np.flatnonzero(found.any(axis=1)):
        gold_score = scores[position][found[position]][0]
        index = rows[position]
        result.gold_scores[index] = gold_score
        result.num_greater[index] = int((scores[position] > gold_score).sum())
        result.num_tied[index] = int((scores[position] == gold_score).sum()) - 1


__all__ = ["ModelScorer", "NaiveModelScorer", "Reranker", "rank_two_stage", "rerank_first_stage"]
