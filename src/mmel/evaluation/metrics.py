"""Ranking metrics (Hits@k, MRR, MR) from gold ranks, with an explicit tie policy.

The published full-KB code ranks with `argsort`, so ties are broken by sort order, which nobody
documents (benchmarks.md, "Ties"). mmel states its policy instead:

- `against-gold` (default, always reported): rank = 1 + #{score > gold} + #{score == gold, other
  entity}. A model can never win by ties: if every entity gets the same score, the gold entity
  ranks last, not first.
- `expected`: rank = 1 + #{score > gold} + #{score == gold, other entity} / 2, the mean rank under
  a uniformly random tie break. Hits@k and MRR are then computed on that (fractional) rank.
- `gold-wins`: rank = 1 + #{score > gold}, DIM's rule (models.md §4.7), used only for its
  candidate-limited protocol and labelled as such: ties favour the gold.

Ranks are 1-based. A mention that has no rank (NIL, or gold entity missing from the KB) is not
passed to these functions: the protocols count those separately (`RankingResult.excluded_*`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from mmel.core.errors import UsageError

TiePolicy = Literal["against-gold", "expected", "gold-wins"]
TIE_POLICIES: tuple[TiePolicy, ...] = ("against-gold", "expected", "gold-wins")
DEFAULT_TIE_POLICY: TiePolicy = "against-gold"
HITS_AT: tuple[int, ...] = (1, 3, 5, 10, 20)  # the cut-offs of MIMIC / M3EL (models.md §0.4)


def check_tie_policy(tie_policy: str) -> TiePolicy:
    """Return `tie_policy` if it is known, else raise naming the valid ones."""
    if tie_policy not in TIE_POLICIES:
        raise UsageError(f"unknown tie policy {tie_policy!r}; use one of: {', '.join(TIE_POLICIES)}")
    return tie_policy  # type: ignore[return-value]


def ranks_from_counts(num_greater: np.ndarray, num_tied: np.ndarray,
                      tie_policy: TiePolicy = DEFAULT_TIE_POLICY) -> np.ndarray:
    """1-based gold ranks [M] (float64) from the counts of entities scoring above and equal to the gold.

    `num_tied` counts OTHER entities whose score equals the gold score (the gold itself excluded).
    """
    check_tie_policy(tie_policy)
    greater = np.asarray(num_greater, dtype=np.float64)
    tied = np.asarray(num_tied, dtype=np.float64)
    if greater.shape != tied.shape:
        raise UsageError(f"num_greater {greater.shape} and num_tied {tied.shape} must have the same shape")
    if (greater < 0).any() or (tied < 0).any():
        raise UsageError("counts of greater and tied scores must be non-negative")
    tie_weight = {"against-gold": 1.0, "expected": 0.5, "gold-wins": 0.0}[tie_policy]
    return 1.0 + greater + tie_weight * tied


def ranking_metrics(ranks: np.ndarray, hits_at: tuple[int, ...] = HITS_AT) -> dict[str, float]:
    """Hits@k (share of ranks <= k), MRR (mean 1/rank) and MR (mean rank) as fractions / plain means.

    Returns keys `hits@<k>` for each k, `mrr` and `mr`. With no ranks at all the metrics are NaN,
    never 0 or 1, so an empty split cannot pass for a result.
    """
    values = np.asarray(ranks, dtype=np.float64)
    if values.ndim != 1:
        raise UsageError(f"ranks must be a 1-D array, got shape {values.shape}")
    if values.size and (not np.isfinite(values).all() or values.min() < 1):
        raise UsageError("ranks must be finite and >= 1 (they are 1-based)")
    metrics: dict[str, float] = {}
    for k in hits_at:
        metrics[f"hits@{k}"] = float(np.mean(values <= k)) if values.size else float("nan")
    metrics["mrr"] = float(np.mean(1.0 / values)) if values.size else float("nan")
    metrics["mr"] = float(np.mean(values)) if values.size else float("nan")
    return metrics


__all__ = ["DEFAULT_TIE_POLICY", "HITS_AT", "TIE_POLICIES", "TiePolicy", "check_tie_policy", "ranking_metrics",
           "ranks_from_counts"]
