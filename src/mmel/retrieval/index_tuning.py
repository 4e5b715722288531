"""Recall by design: choose an approximate index's search setting from recall measured at build time.

An IVF index scanning too few lists, or an HNSW graph walked with too short a candidate list,
silently loses the gold entity before the reranker ever sees it (docs/RESULTS.md: 16 IVF probes
found the gold for 70% of queries at 1M entities). So the build measures instead of guessing, as
autofaiss does for its parameter choice: held-out queries whose right answer is known are searched
exactly (a brute-force scan, the ceiling any index can reach) and through the index at a ladder of
settings, cheapest first; the first setting whose recall of the exactly-found golds reaches the
target is kept, with its measured recall and single-query search time, in the index manifest.

Held-out queries are real mentions with their gold entities where the caller has them (a dev
split), else noisy copies of indexed vectors at a given cosine to their source (0.8 by default:
about how close the benchmark's planted golds are to their mentions).

Shapes: N indexed vectors, Q tuning queries, D vector width, K hits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mmel.core.errors import UsageError

EXACT_BLOCK_ROWS = 65_536     # indexed vectors scored per step of the exact scan (bounds its memory)
LATENCY_QUERIES = 64          # single-query searches timed at the chosen setting


@dataclass(frozen=True)
class TuningQueries:
    """Queries [Q, D] (unit rows) and, per query, the row of the indexed vector it should find."""

    vectors: np.ndarray   # [Q, D] float32
    gold_rows: np.ndarray  # [Q] int64
    source: str           # what they are, for the manifest

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or len(self.vectors) != len(self.gold_rows) or len(self.gold_rows) == 0:
            raise UsageError(f"tuning queries need [Q, D] vectors and Q >= 1 gold rows, got {self.vectors.shape} "
                             f"and {self.gold_rows.shape}")


def noisy_copies(vectors: np.ndarray, count: int, *, cosine: float, seed: int) -> TuningQueries:
    """`count` queries, each a distinct indexed row plus Gaussian noise, at about `cosine` to that row.

    For a unit row v and a random unit direction n (nearly orthogonal to v in D dimensions),
    v + s * n has cosine 1 / sqrt(1 + s^2) to v, so s = sqrt(1 / cosine^2 - 1).
    """
    if not 0.0 < cosine <= 1.0:
        raise UsageError(f"the tuning queries' cosine must be in (0, 1], got {cosine}")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(vectors), size=min(count, len(vectors)), replace=False))
    sources = _unit(np.asarray(vectors[rows], dtype=np.float32))                              # [Q, D]
    directions = _unit(rng.standard_normal(sources.shape, dtype=np.float32))                 # [Q, D]
    spread = np.sqrt(1.0 / cosine**2 - 1.0)
    return TuningQueries(vectors=_unit(sources + spread * directions), gold_rows=rows.astype(np.int64),
                         source=f"noisy copies of {len(rows)} indexed vectors at cosine {cosine}")


def exact_gold_in_top_k(vectors: np.ndarray, queries: TuningQueries, k: int) -> np.ndarray:
    """[Q] bool: whether a brute-force scan of `vectors` [N, D] ranks each query's gold in its top `k`.

    A gold is in the top k when fewer than k rows score strictly higher (ties count for the gold,
    as FAISS may return either).
    """
    gold = _unit(np.asarray(vectors[queries.gold_rows], dtype=np.float32))                    # [Q, D]
    gold_scores = np.einsum("qd,qd->q", queries.vectors, gold)                                # [Q]
    higher = np.zeros(len(gold_scores), dtype=np.int64)
    for start in range(0, len(vectors), EXACT_BLOCK_ROWS):
        block = _unit(np.asarray(vectors[start:start + EXACT_BLOCK_ROWS], dtype=np.float32))  # [n, D]
        higher += (queries.vectors @ block.T > gold_scores[:, None]).sum(axis=1)
    return higher < k


@dataclass
class TuningResult:
    """What the tuning measured and chose; stored in the vector index's manifest as a dict."""

    parameter: str                 # 'nprobe' (IVF) or 'efSearch' (HNSW)
    value: int                     # the chosen setting
    target: float                  # wanted recall of the exactly-found golds at k
    recall: float                  # measured at `value`: share of exactly-found golds the index finds
    recall_of_all: float           # share of all tuning queries whose gold the index finds (exact search: `ceiling`)
    ceiling: float                 # share of tuning queries whose gold a brute-force scan puts in its top k
    reached: bool                  # False: even the last setting tried fell short of the target
    k: int
    queries: int
    query_source: str
    search_ms_per_query: float     # median single-query search time at `value`, one thread as measured
    ladder: list[dict[str, float]] = field(default_factory=list)   # every setting tried: value, recall

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)



def tune_search_setting(search: Callable[[np.ndarray, int, int], np.ndarray], ladder: Sequence[int], *,
                        parameter: str, vectors: np.ndarray, queries: TuningQueries, k: int,
                        target: float) -> TuningResult:
    """The cheapest setting of `ladder` (ascending) whose recall reaches `target`, else the last one.

    `search(query_vectors [Q, D], k, setting)` returns the hit rows [Q, k] (-1 where none).
    """
    if not ladder:
        raise UsageError("the tuning ladder is empty")
    exact = exact_gold_in_top_k(vectors, queries, k)                                           # [Q]
    denominator = max(int(exact.sum()), 1)
    tried: list[dict[str, float]] = []
    chosen, found = ladder[-1], np.zeros(len(exact), dtype=bool)
    for setting in ladder:
        hits = search(queries.vectors, k, setting)                                             # [Q, k]
        found = (hits == queries.gold_rows[:, None]).any(axis=1)                               # [Q]
        recall = float((found & exact).sum() / denominator)
        tried.append({"value": setting, "recall": recall})
        if recall >= target:
            chosen = setting
            break
    return TuningResult(parameter=parameter, value=int(chosen), target=target, recall=tried[-1]["recall"],
                        recall_of_all=float(found.mean()), ceiling=float(exact.mean()), reached=tried[-1]["recall"]
                        >= target, k=k, queries=len(exact), query_source=queries.source,
                        search_ms_per_query=_median_single_query_ms(search, queries.vectors, k, int(chosen)),
                        ladder=tried)


def describe_tuning(tuning: dict[str, Any]) -> str:
    """One line for a stored `TuningResult.to_dict()`: the setting, its recall against the target, its cost."""
    verdict = "reached" if tuning["reached"] else "NOT reached"
    return (f"{tuning['parameter']}={tuning['value']}: recall@{tuning['k']} {tuning['recall']:.4f} of the golds an "
            f"exact search finds (target {tuning['target']} {verdict}; exact search finds {tuning['ceiling']:.4f} "
            f"of {tuning['queries']} {tuning['query_source']}), {tuning['search_ms_per_query']:.2f} ms per query")


def geometric_ladder(first: int, last: int) -> list[int]:
    """first, then about x1.41 each step (1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, ...), up to and including `last`.

    Half-octave steps: a doubling ladder overshoots by up to 2x when the target falls just past a
    step (at 1M entities 128 probes found 99.4% and 256 were taken, twice the search cost).
    """
    ladder, value = [], float(max(1, first))
    while round(value) < last:
        if not ladder or round(value) > ladder[-1]:
            ladder.append(round(value))
        value *= 2 ** 0.5
    return [*ladder, last]


def _median_single_query_ms(search: Callable[[np.ndarray, int, int], np.ndarray], queries: np.ndarray, k: int,
                            setting: int) -> float:
    seconds = []
    for row in range(min(LATENCY_QUERIES, len(queries))):
        started = time.perf_counter()
        search(queries[row:row + 1], k, setting)
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds) * 1000)


def _unit(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms == 0, 1.0, norms)


__all__ = ["TuningQueries", "TuningResult", "describe_tuning", "exact_gold_in_top_k", "geometric_ladder",
           "noisy_copies", "tune_search_setting"]
