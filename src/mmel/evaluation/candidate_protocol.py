"""DIM's candidate-limited protocol (models.md §4.7), kept apart from the full-KB numbers of MIMIC and M3EL.

For each mention the scorer sees {gold} ∪ its candidate rows (for WikiMEL / RichpediaMEL the
top-100 entity names by fuzzy similarity to the mention, `mmel.lexical.fuzzy`):

    rank    = 1 + #{candidates scoring STRICTLY higher than the gold}     (a tie goes to the gold)
    Top-k   = #{mentions with rank <= k} / #mentions,   k in 1, 5, 10, 20

as DIM's evaluation computes them. These numbers are NOT comparable with whole-KB Hits@k: the
gold is always among at most 101 entities, and ties favour it (`protocols.rank_candidates` with
the against-gold tie policy is mmel's stricter view of the same candidate sets). Every result
carries `label`, which says so.

Mentions that cannot be ranked (NIL, or a gold entity missing from the KB) stay in the
denominator as misses and are counted in the result: DIM's data has none (its loaders drop
them), and mmel never drops mentions silently. Duplicate candidate rows are scored once.
Scoring goes through a `PairScorer` callback; nothing here imports a model.

Letters: M mentions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmel.evaluation.protocols import PairScorer, RankingResult, rank_candidates

DIM_TOP_K: tuple[int, ...] = (1, 5, 10, 20)      # DIM's reported cut-offs (§4.7)
DIM_NUM_CANDIDATES = 100                         # search_top100 (§4.7)


def dim_protocol_label(num_candidates: int = DIM_NUM_CANDIDATES) -> str:
    """The label every DIM-protocol number is reported under."""
    return f"candidate-limited (DIM protocol: gold + top-{num_candidates} fuzzy name candidates)"


@dataclass
class DIMCandidateResult:
    """DIM ranks of M mentions.

    ranking:        the per-mention counts (num_greater, num_tied, gold_added...) behind the ranks
    num_candidates: the candidate list length the protocol used (for the label)
    """

    ranking: RankingResult
    num_candidates: int = DIM_NUM_CANDIDATES

    @property
    def label(self) -> str:
        return dim_protocol_label(self.num_candidates)

    @property
    def ranks(self) -> np.ndarray:
        """[M] int64: 1 + #candidates strictly above the gold; 0 for mentions without a rank (NIL, missing gold)."""
        return np.where(self.ranking.evaluated, self.ranking.num_greater + 1, 0)

    def metrics(self, top_k: tuple[int, ...] = DIM_TOP_K) -> dict[str, float]:
        """`top@k` = #{ranked mentions with rank <= k} / M for each k; NaN when there are no mentions."""
        ranks, total = self.ranks, len(self.ranking.gold_rows)
        return {f"top@{k}": float(((ranks >= 1) & (ranks <= k)).sum() / total) if total else float("nan")
                for k in top_k}

    def summary(self, top_k: tuple[int, ...] = DIM_TOP_K) -> dict[str, object]:
        """What a report needs: the label, the counts behind the denominator, and the metrics."""
        return {"protocol": self.label, "mentions": len(self.ranking.gold_rows),
                "ranked": self.ranking.mention_count, "excluded_nil": self.ranking.excluded_nil,
                "excluded_missing_gold": self.ranking.excluded_missing_gold,
                "gold_added": self.ranking.gold_added, "metrics": self.metrics(top_k)}


def rank_dim_candidates(score_pairs: PairScorer, candidates: Sequence[np.ndarray], gold_rows: np.ndarray, *,
                        num_candidates: int = DIM_NUM_CANDIDATES, num_entities: int | None = None,
                        mention_batch_size: int = 256, progress: bool = False) -> DIMCandidateResult:
    """Rank each mention's gold inside {gold} ∪ `candidates[i]` (entity rows) with DIM's strictly-higher rule.

    `score_pairs(mention_rows [P], entity_rows [P]) -> scores [P]` scores (mention, entity) pairs;
    `gold_rows` [M] are KB rows, or NIL_ROW / MISSING_GOLD_ROW. `num_candidates` only names the
    protocol in the label (the candidate lists are used as given).
    """
    ranking = rank_candidates(score_pairs, candidates, gold_rows, num_entities=num_entities,
                              mention_batch_size=mention_batch_size, progress=progress)
    return DIMCandidateResult(ranking=ranking, num_candidates=num_candidates)


__all__ = ["DIM_NUM_CANDIDATES", "DIM_TOP_K", "DIMCandidateResult", "dim_protocol_label", "rank_dim_candidates"]
