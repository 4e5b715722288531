"""Reciprocal-rank fusion of ranked lists (the hybrid first stage's fusion of dense and BM25 hits).

score(entity) = sum over the lists that hold it of 1 / (60 + rank), rank 1-based.
"""

from __future__ import annotations

RRF_CONSTANT = 60

RankedList = list[tuple[str, float]]
"""(key, score) pairs, best first."""


def reciprocal_rank_fusion(lists: list[RankedList], k: int) -> RankedList:
    """The top `k` keys of `lists` fused by 1 / (60 + rank); ties keep the order of first appearance."""
    fused: dict[str, float] = {}
    for hits in lists:
        for rank, (key, _) in enumerate(hits):
            fused[key] = fused.get(key, 0.0) + 1.0 / (RRF_CONSTANT + rank + 1)
    return sorted(fused.items(), key=lambda item: -item[1])[:k]


__all__ = ["RRF_CONSTANT", "RankedList", "reciprocal_rank_fusion"]
