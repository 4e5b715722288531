import math

import numpy as np
import pytest

from mmel.evaluation.metrics import ranking_metrics, ranks_from_counts


def test_ties_count_against_the_gold_entity_by_default():
    # gold tied with 2 other entities, nothing above it -> rank 3
    assert ranks_from_counts(np.array([0]), np.array([2])).tolist() == [3.0]
    # 4 above and 1 tie -> rank 6
    assert ranks_from_counts(np.array([4]), np.array([1])).tolist() == [6.0]


def test_expected_tie_policy_takes_the_mean_position():
    assert ranks_from_counts(np.array([0, 4]), np.array([2, 1]), "expected").tolist() == [2.0, 5.5]


def test_all_equal_scores_never_give_rank_one_unless_single_entity():
    num_entities = 50
    scores = np.zeros(num_entities)
    gold_score = scores[7]
    greater = np.array([(scores > gold_score).sum()])
    tied = np.array([(scores == gold_score).sum() - 1])
    assert ranks_from_counts(greater, tied).tolist() == [50.0]
    assert ranks_from_counts(np.array([0]), np.array([0])).tolist() == [1.0]


def test_hits_mrr_mr_on_hand_computed_ranks():
    metrics = ranking_metrics(np.array([1, 2, 4, 25]))
    assert metrics["hits@1"] == 0.25
    assert metrics["hits@3"] == 0.5
    assert metrics["hits@5"] == 0.75
    assert metrics["hits@10"] == 0.75
    assert metrics["hits@20"] == 0.75
    assert metrics["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 25) / 4)
    assert metrics["mr"] == pytest.approx(8.0)


def test_empty_ranks_give_nan_not_a_score():
    metrics = ranking_metrics(np.array([]))
    assert all(math.isnan(value) for value in metrics.values())


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="tie policy"):
        ranks_from_counts(np.array([0]), np.array([0]), "optimistic")
    with pytest.raises(ValueError, match="1-based"):
        ranking_metrics(np.array([0, 1]))
    with pytest.raises(ValueError, match="same shape"):
        ranks_from_counts(np.array([0, 1]), np.array([0]))
