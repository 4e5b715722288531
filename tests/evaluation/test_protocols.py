import numpy as np
import pytest
import torch

from mmel.core.types import Entity, KnowledgeBase, Mention
from mmel.evaluation.protocols import (
    MISSING_GOLD_ROW,
    NIL_ROW,
    gold_rows_for,
    rank_candidates,
    rank_full_kb,
    top_k_per_row,
)


def brute_force_counts(scores: np.ndarray, gold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gold_scores = scores[np.arange(len(gold)), gold][:, None]
    return (scores > gold_scores).sum(1), (scores == gold_scores).sum(1) - 1


def brute_force_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    columns = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    return np.lexsort((columns, -scores), axis=-1)[:, :k]


def slicer(scores):
    return lambda rows, start, stop: scores[rows, start:stop]


@pytest.mark.parametrize("chunk", [1, 7, 64, 100, 101, 1000])
@pytest.mark.parametrize("batch", [1, 6, 200])
def test_chunked_full_kb_ranking_equals_brute_force(chunk, batch):
    rng = np.random.default_rng(chunk * 1000 + batch)
    scores = rng.integers(0, 12, size=(23, 101)).astype(np.float32)  # many ties on purpose
    gold = rng.integers(0, 101, size=23)
    result = rank_full_kb(slicer(scores), gold, 101, mention_batch_size=batch, entity_chunk_size=chunk, top_k=9,
                          progress=False)
    greater, tied = brute_force_counts(scores, gold)
    np.testing.assert_array_equal(result.num_greater, greater)
    np.testing.assert_array_equal(result.num_tied, tied)
    np.testing.assert_array_equal(result.ranks(), 1 + greater + tied)
    np.testing.assert_array_equal(result.gold_scores, scores[np.arange(23), gold])
    expected_rows = brute_force_top_k(scores, 9)
    np.testing.assert_array_equal(result.topk_rows, expected_rows)
    np.testing.assert_array_equal(result.topk_scores, np.take_along_axis(scores, expected_rows, 1))


def test_full_kb_with_continuous_scores_and_torch_blocks():
    rng = np.random.default_rng(0)
    scores = torch.from_numpy(rng.normal(size=(40, 333)))
    gold = rng.integers(0, 333, size=40)
    result = rank_full_kb(lambda rows, a, b: scores[torch.from_numpy(rows), a:b], gold, 333,
                          mention_batch_size=16, entity_chunk_size=50, top_k=400, progress=False)
    greater, _ = brute_force_counts(scores.numpy(), gold)
    np.testing.assert_array_equal(result.ranks(), 1 + greater)
    assert result.topk_rows.shape == (40, 333)  # top_k is capped at the KB size
    np.testing.assert_array_equal(result.topk_rows, brute_force_top_k(scores.numpy(), 333))


def test_each_pair_is_scored_once():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(30, 250))
    seen = np.zeros_like(scores, dtype=np.int64)

    def counting(rows, start, stop):
        seen[rows, start:stop] += 1
        return scores[rows, start:stop]

    rank_full_kb(counting, rng.integers(0, 250, 30), 250, mention_batch_size=8, entity_chunk_size=64,
                 progress=False)
    assert (seen == 1).all()


def test_all_tied_scores_rank_the_gold_last():
    result = rank_full_kb(lambda rows, a, b: np.zeros((len(rows), b - a)), np.array([0, 5, 9]), 10,
                          entity_chunk_size=3, progress=False)
    assert result.ranks().tolist() == [10.0, 10.0, 10.0]
    assert result.ranks("expected").tolist() == [5.5, 5.5, 5.5]


def test_excluded_mentions_are_counted_not_ranked():
    scores = np.arange(20, dtype=np.float64)[None, :].repeat(5, 0)
    gold = np.array([19, NIL_ROW, 0, MISSING_GOLD_ROW, NIL_ROW])
    result = rank_full_kb(slicer(scores), gold, 20, entity_chunk_size=6, top_k=2, progress=False)
    assert result.excluded_nil == 2
    assert result.excluded_missing_gold == 1
    assert result.mention_count == 2
    assert result.ranks().tolist() == [1.0, 20.0]
    assert result.metrics()["hits@1"] == 0.5
    # excluded mentions still get their top-k entities (a linker needs them to decide NIL)
    assert result.topk_rows.tolist() == [[19, 18]] * 5
    assert np.isnan(result.gold_scores[1])


def test_without_top_k_excluded_mentions_are_not_scored():
    scored = []

    def recording(rows, start, stop):
        scored.extend(rows.tolist())
        return np.zeros((len(rows), stop - start))

    rank_full_kb(recording, np.array([NIL_ROW, 3, MISSING_GOLD_ROW]), 8, progress=False)
    assert set(scored) == {1}


def test_scorer_errors_are_reported():
    gold = np.array([1, 2])
    with pytest.raises(ValueError, match="shape"):
        rank_full_kb(lambda rows, a, b: np.zeros((len(rows), 1)), gold, 5, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        rank_full_kb(lambda rows, a, b: np.full((len(rows), b - a), np.nan), gold, 5, progress=False)
    with pytest.raises(ValueError, match="gold row 7"):
        rank_full_kb(lambda rows, a, b: np.zeros((len(rows), b - a)), np.array([7]), 5, progress=False)


def test_gold_rows_for_marks_nil_and_missing():
    kb = KnowledgeBase([Entity(qid="Q1", name="a"), Entity(qid="Q2", name="b")])
    mentions = [Mention(id="m1", sentence="s", surface="x", gold_qid="Q2"),
                Mention(id="m2", sentence="s", surface="x", gold_qid=None),
                Mention(id="m3", sentence="s", surface="x", gold_qid="Q9")]
    assert gold_rows_for(mentions, kb).tolist() == [1, NIL_ROW, MISSING_GOLD_ROW]


def test_top_k_per_row_prefers_lower_columns_among_ties():
    rows, scores = top_k_per_row(np.array([[1.0, 3.0, 3.0, 2.0, 3.0]]), 2)
    assert rows.tolist() == [[1, 2]]
    assert scores.tolist() == [[3.0, 3.0]]


def pair_scorer(matrix):
    return lambda mentions, entities: matrix[mentions, entities]


def test_candidate_protocol_adds_gold_and_counts_ties_against_it():
    matrix = np.array([[0.9, 0.5, 0.5, 0.1, 0.7],
                       [0.2, 0.2, 0.2, 0.2, 0.2],
                       [0.1, 0.3, 0.6, 0.8, 0.0]])
    candidates = [np.array([1, 2, 3]), np.array([0, 1, 2, 2]), np.array([], dtype=np.int64)]
    gold = np.array([2, 1, 4])
    result = rank_candidates(pair_scorer(matrix), candidates, gold, num_entities=5, top_k=3, progress=False)
    # mention 0: {1, 2, 3}; gold 2 ties with 1 -> rank 2. Entity 0 (0.9) is not a candidate.
    # mention 1: {0, 1, 2}, duplicates scored once, all tied -> rank 3.
    # mention 2: empty list, gold added -> alone -> rank 1.
    assert result.ranks().tolist() == [2.0, 3.0, 1.0]
    assert result.gold_added == 1
    assert result.topk_rows.tolist() == [[1, 2, 3], [0, 1, 2], [4, -1, -1]]
    assert result.topk_scores[2, 1] == -np.inf


def test_candidate_protocol_counts_excluded_and_checks_rows():
    matrix = np.ones((2, 3))
    result = rank_candidates(pair_scorer(matrix), [np.array([0]), np.array([1])], np.array([NIL_ROW, 2]),
                             progress=False)
    assert result.excluded_nil == 1 and result.mention_count == 1
    with pytest.raises(ValueError, match="candidate rows"):
        rank_candidates(pair_scorer(matrix), [np.array([5])], np.array([0]), num_entities=3, progress=False)
