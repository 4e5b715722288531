"""Model-agnostic evaluation: metrics with a stated tie policy, chunked ranking protocols, reports.

Nothing here imports a model: protocols call a scoring function, so BM25, the dense baseline and
the published models are all scored by the same code.
"""

from mmel.evaluation.metrics import (
    DEFAULT_TIE_POLICY,
    HITS_AT,
    TIE_POLICIES,
    TiePolicy,
    ranking_metrics,
    ranks_from_counts,
)
from mmel.evaluation.protocols import (
    FULL_KB,
    MISSING_GOLD_ROW,
    NIL_ROW,
    PairScorer,
    RankingResult,
    ScoreBlock,
    candidates_protocol_name,
    gold_rows_for,
    rank_candidates,
    rank_full_kb,
    top_k_per_row,
)
from mmel.evaluation.report import EvalReport, build_report, read_report, render_comparison_table, write_report

__all__ = [
    "DEFAULT_TIE_POLICY",
    "FULL_KB",
    "HITS_AT",
    "MISSING_GOLD_ROW",
    "NIL_ROW",
    "TIE_POLICIES",
    "EvalReport",
    "PairScorer",
    "RankingResult",
    "ScoreBlock",
    "TiePolicy",
    "build_report",
    "candidates_protocol_name",
    "gold_rows_for",
    "rank_candidates",
    "rank_full_kb",
    "ranking_metrics",
    "ranks_from_counts",
    "read_report",
    "render_comparison_table",
    "top_k_per_row",
    "write_report",
]
