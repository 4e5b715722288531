"""First-stage retrieval: the K entities each mention's reranking starts from (the one implementation).

Three kinds, chosen when an index is built (`IndexBuildConfig.first_stage`):

- `dense`: FAISS inner product over the backbone's unit-length global text vectors (the cosine);
- `bm25`: BM25 over entity names, the query being the surface form and the sentence;
- `hybrid` (default): reciprocal-rank fusion of the two top-K lists, score = sum over the lists
  that hold the entity of 1 / (60 + rank). BM25 hits that share no word with the query are left
  out of the fusion: they are ranked by nothing but the tie order of a zero score.

The served linker and `mmel evaluate --first-stage` both call `FirstStage.retrieve`, so a number in
docs/RESULTS.md is, by construction, what a user of the index gets.

Shapes: B mentions, K candidates, Dt text width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmel.core.errors import UsageError
from mmel.core.types import Mention
from mmel.lexical.bm25 import BM25Index, query_text
from mmel.lexical.fusion import reciprocal_rank_fusion
from mmel.retrieval import FIRST_STAGES
from mmel.retrieval.index import VectorIndex

Shortlist = list[tuple[str, float]]
"""(QID, first-stage score) pairs of one mention, best first."""


@dataclass
class FirstStage:
    """The index's first stage: its kind and the dense and/or lexical indexes it reads."""

    kind: str
    vectors: VectorIndex | None
    bm25: BM25Index | None

    def __post_init__(self) -> None:
        if self.kind not in FIRST_STAGES:
            raise UsageError(f"unknown first stage {self.kind!r}; available: {', '.join(FIRST_STAGES)}")
        if self.kind != "bm25" and self.vectors is None:
            raise UsageError(f"the {self.kind} first stage needs the dense vector index")
        if self.kind != "dense" and self.bm25 is None:
            raise UsageError(f"the {self.kind} first stage needs the BM25 index")

    def retrieve(self, mentions: list[Mention], query_vectors: np.ndarray, k: int) -> list[Shortlist]:
        """Up to `k` candidates per mention, best first; `query_vectors` [B, Dt]: the mentions' global text vectors."""
        dense = self._dense_hits(query_vectors, k) if self.kind != "bm25" else None
        lexical = self._bm25_hits(mentions, k) if self.kind != "dense" else None
        if dense is not None and lexical is not None:
            return [reciprocal_rank_fusion([d, b], k) for d, b in zip(dense, lexical, strict=True)]
        return dense if dense is not None else lexical  # type: ignore[return-value]

    def _dense_hits(self, query_vectors: np.ndarray, k: int) -> list[Shortlist]:
        found = self.vectors.search(np.asarray(query_vectors, dtype=np.float32), k)     # scores [B, k]
        return [list(zip(qids, found.scores[row, :len(qids)].tolist(), strict=True))
                for row, qids in enumerate(found.qids)]

    def _bm25_hits(self, mentions: list[Mention], k: int) -> list[Shortlist]:
        drop_zero = self.kind == "hybrid"
        hits = self.bm25.search([query_text(mention) for mention in mentions], min(k, len(self.bm25)))
        return [[(self.bm25.qids[row], float(score)) for row, score in zip(rows, scores, strict=True)
                 if not (drop_zero and score <= 0)]
                for rows, scores in zip(hits.rows, hits.scores, strict=True)]


__all__ = ["FIRST_STAGES", "FirstStage", "Shortlist"]
