"""DIM's candidate-limited protocol (models.md §4.7) on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from mmel.evaluation.candidate_protocol import DIM_TOP_K, dim_protocol_label, rank_dim_candidates
from mmel.evaluation.protocols import MISSING_GOLD_ROW, NIL_ROW

# scores[mention, entity] of a scorer over 5 entities
SCORES = np.array([
    [0.1, 0.9, 0.5, 0.5, 0.0],   # m0: gold 2 (not a candidate); 1 is higher, 3 ties -> rank 2
    [0.2, 0.1, 5.0, 0.1, 0.7],   # m1: gold 4 among its candidates [4, 0]; 2 scores higher but is no candidate -> 1
    [0.1, 0.8, 0.6, 0.0, 0.0],   # m2: gold 0 outside candidates [1, 2], both higher -> rank 3
    [0.3, 0.3, 0.3, 0.3, 0.3],   # m3: every candidate ties the gold -> rank 1 (ties go to the gold)
    [0.0, 0.0, 0.0, 0.0, 0.0],   # m4: NIL -> no rank, a miss
    [0.0, 0.0, 0.0, 0.4, 9.0],   # m5: gold 3, no candidates -> rank 1
    [0.5, 0.5, 0.5, 0.5, 0.5],   # m6: gold missing from the KB -> no rank, a miss
])
CANDIDATES = [np.array([0, 1, 3]), np.array([4, 0]), np.array([1, 2]), np.array([0, 2, 3, 4]),
              np.array([0, 1]), np.array([], dtype=np.int64), np.array([2, 3])]
GOLD = np.array([2, 4, 0, 1, NIL_ROW, 3, MISSING_GOLD_ROW])


def test_ranks_and_top_k_equal_the_hand_computed_values() -> None:
    scored_pairs: list[tuple[int, int]] = []

    def score_pairs(mention_rows: np.ndarray, entity_rows: np.ndarray) -> np.ndarray:
        scored_pairs.extend(zip(mention_rows.tolist(), entity_rows.tolist(), strict=True))
        return SCORES[mention_rows, entity_rows]

    result = rank_dim_candidates(score_pairs, CANDIDATES, GOLD, num_entities=5, mention_batch_size=3)
    assert result.ranks.tolist() == [2, 1, 3, 1, 0, 1, 0]
    assert result.metrics() == {"top@1": 3 / 7, "top@5": 5 / 7, "top@10": 5 / 7, "top@20": 5 / 7}
    assert tuple(int(key.split("@")[1]) for key in result.metrics()) == DIM_TOP_K
    assert result.ranking.gold_added == 4                       # m0, m2, m3, m5: the gold was scored anyway
    assert (1, 2) not in scored_pairs and (5, 4) not in scored_pairs   # only {gold} ∪ candidates are scored
    assert {(0, 2), (2, 0), (5, 3)} <= set(scored_pairs)
    # mmel's stricter view of the same sets counts ties against the gold
    assert result.ranking.ranks().tolist() == [3.0, 1.0, 3.0, 5.0, 1.0]


def test_the_report_label_says_candidate_limited_never_full_kb() -> None:
    result = rank_dim_candidates(lambda m, e: SCORES[m, e], CANDIDATES, GOLD)
    assert result.label == "candidate-limited (DIM protocol: gold + top-100 fuzzy name candidates)"
    assert dim_protocol_label(80) == "candidate-limited (DIM protocol: gold + top-80 fuzzy name candidates)"
    summary = result.summary()
    assert summary["protocol"] == result.label and "full" not in str(summary["protocol"]).lower()
    assert (summary["mentions"], summary["ranked"], summary["excluded_nil"], summary["excluded_missing_gold"]) == \
        (7, 5, 1, 1)


def test_empty_input_gives_nan_and_bad_input_is_refused() -> None:
    empty = rank_dim_candidates(lambda m, e: SCORES[m, e], [], np.array([], dtype=np.int64))
    assert all(np.isnan(value) for value in empty.metrics().values())
    with pytest.raises(ValueError, match="one candidate array per mention"):
        rank_dim_candidates(lambda m, e: SCORES[m, e], CANDIDATES[:2], GOLD)
    with pytest.raises(ValueError, match="NaN"):
        rank_dim_candidates(lambda m, e: np.full(len(m), np.nan), CANDIDATES, GOLD)
