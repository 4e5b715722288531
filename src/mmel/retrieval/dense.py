"""Zero-shot dense dual encoder: cosine similarity of global text vectors, mention against entity.

No training and no image: it ranks the KB by the cosine between the mention's and each entity's
`text_global` vector from the feature store (mean-pooled MiniLM or CLIP's text_embeds). Entity
vectors are read block by block from the table's (memory-mapped) matrix, so the KB never has to
be loaded whole. FAISS indexing lives in `retrieval/index.py`; this is the exact, small baseline.

Shapes: b mentions, n entities in a block, N entities, D text width, k hits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmel.core.errors import UsageError
from mmel.core.features import FeatureTable, unit_rows
from mmel.evaluation.protocols import ScoreBlock


@dataclass
class DenseHits:
    scores: np.ndarray  # [b, k] cosine, best first
    rows: np.ndarray    # [b, k] entity rows; ties broken by the lower row


class DenseScorer:
    """Cosine scores of mention vectors against the entities of a FeatureTable."""

    def __init__(self, entities: FeatureTable, *, block_size: int = 65_536):
        if block_size < 1:
            raise UsageError(f"block_size must be positive, got {block_size}")
        self.entity_matrix = entities.text_global_matrix()   # [N, D], possibly memory-mapped float16
        self.block_size = block_size

    @property
    def num_entities(self) -> int:
        return len(self.entity_matrix)

    def score_block(self, mention_vectors: np.ndarray, start: int, stop: int) -> np.ndarray:
        """[b, stop - start] cosine of each mention vector with entity rows [start, stop)."""
        if not 0 <= start <= stop <= self.num_entities:
            raise UsageError(f"entity block [{start}, {stop}) is outside 0..{self.num_entities}")
        queries = _checked_unit_rows(np.asarray(mention_vectors, dtype=np.float32), "mention_vectors")  # [b, D]
        if queries.shape[1] != self.entity_matrix.shape[1]:
            raise UsageError(f"mention vectors have width {queries.shape[1]}, entity vectors "
                             f"{self.entity_matrix.shape[1]}: they come from different backbones")
        block = _checked_unit_rows(np.asarray(self.entity_matrix[start:stop], dtype=np.float32),
                                   "entity vectors")                                          # [n, D]
        return queries @ block.T

    def search(self, mention_vectors: np.ndarray, k: int) -> DenseHits:
        """The k best entities per mention over the whole KB, scanned block by block."""
        if k < 1:
            raise UsageError(f"k must be positive, got {k}")
        k = min(k, self.num_entities)
        count = len(mention_vectors)
        best_scores = np.empty((count, 0), dtype=np.float32)
        best_rows = np.empty((count, 0), dtype=np.int64)
        for start in range(0, self.num_entities, self.block_size):
            stop = min(start + self.block_size, self.num_entities)
            scores = np.concatenate([best_scores, self.score_block(mention_vectors, start, stop)], axis=1)
            rows = np.concatenate([best_rows, np.broadcast_to(np.arange(start, stop), (count, stop - start))], axis=1)
            best_scores, best_rows = _top_k(scores, rows, k)
        return DenseHits(scores=best_scores, rows=best_rows)

    def rows_scorer(self, mentions: FeatureTable) -> ScoreBlock:
        """A ScoreBlock (mention rows, start, stop) -> scores over `mentions`, for the evaluation protocols."""
        mention_matrix = mentions.text_global_matrix()   # [M, D]

        def score_rows(mention_rows: np.ndarray, start: int, stop: int) -> np.ndarray:
            return self.score_block(np.asarray(mention_matrix[mention_rows]), start, stop)

        return score_rows


def _checked_unit_rows(vectors: np.ndarray, name: str) -> np.ndarray:
    if vectors.ndim != 2:
        raise UsageError(f"{name} must be a [rows, width] matrix, got shape {vectors.shape}")
    return unit_rows(vectors)


def _top_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `scores` [b, m], the k largest (ties: lower entity row first) with their entity rows."""
    keep = min(k, scores.shape[1])
    if keep < scores.shape[1]:
        candidates = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]    # [b, keep], unordered
        _settle_boundary_ties(scores, rows, candidates)
    else:
        candidates = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    picked_scores = np.take_along_axis(scores, candidates, axis=1)
    picked_rows = np.take_along_axis(rows, candidates, axis=1)
    order = np.lexsort((picked_rows, -picked_scores), axis=1)                # score desc, then row asc
    return np.take_along_axis(picked_scores, order, axis=1), np.take_along_axis(picked_rows, order, axis=1)


def _settle_boundary_ties(scores: np.ndarray, rows: np.ndarray, candidates: np.ndarray) -> None:
    """Where entities tie at the k-th score, argpartition picks arbitrarily: re-pick those rows exactly."""
    keep = candidates.shape[1]
    kth = np.take_along_axis(scores, candidates, axis=1).min(axis=1, keepdims=True)   # [b, 1]
    ambiguous = np.nonzero((scores >= kth).sum(axis=1) > keep)[0]
    for i in ambiguous:
        candidates[i] = np.lexsort((rows[i], -scores[i]))[:keep]


__all__ = ["DenseHits", "DenseScorer"]
