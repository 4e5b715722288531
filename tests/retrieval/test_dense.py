"""The zero-shot dense baseline: cosine of global text vectors, exact top-k, block-wise over the KB."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmel.core.features import FeatureBatch, InMemoryFeatureTable
from mmel.evaluation.protocols import rank_full_kb
from mmel.retrieval.dense import DenseScorer


def _table(text_global: np.ndarray) -> InMemoryFeatureTable:
    count, width = text_global.shape
    return InMemoryFeatureTable(FeatureBatch(
        text_global=torch.from_numpy(text_global.astype(np.float32)), text_tokens=torch.zeros(count, 2, width),
        text_mask=torch.ones(count, 2, dtype=torch.bool), image_global=torch.zeros(count, 3),
        image_patches=torch.zeros(count, 1, 3), has_image=torch.zeros(count, dtype=torch.bool)))


@pytest.fixture
def vectors():
    generator = np.random.default_rng(0)
    return generator.normal(size=(200, 16)).astype(np.float32), generator.normal(size=(7, 16)).astype(np.float32)


def test_scores_are_cosines(vectors):
    entities, mentions = vectors
    scorer = DenseScorer(_table(entities * 3.0))   # scale must not matter
    expected = (mentions / np.linalg.norm(mentions, axis=1, keepdims=True)) @ \
        (entities / np.linalg.norm(entities, axis=1, keepdims=True)).T
    np.testing.assert_allclose(scorer.score_block(mentions, 10, 50), expected[:, 10:50], rtol=1e-5, atol=1e-6)


def test_blockwise_search_equals_brute_force(vectors):
    entities, mentions = vectors
    full = DenseScorer(_table(entities)).search(mentions, k=10)
    blocked = DenseScorer(_table(entities), block_size=33).search(mentions, k=10)
    brute = DenseScorer(_table(entities)).score_block(mentions, 0, 200)
    np.testing.assert_array_equal(full.rows, np.argsort(-brute, axis=1, kind="stable")[:, :10])
    np.testing.assert_array_equal(blocked.rows, full.rows)
    np.testing.assert_allclose(blocked.scores, full.scores, rtol=1e-6)
    assert (np.diff(full.scores, axis=1) <= 0).all()


def test_ties_go_to_the_lower_row():
    entities = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [5.0, 0.0]], dtype=np.float32)
    hits = DenseScorer(_table(entities), block_size=2).search(np.array([[1.0, 0.0]], dtype=np.float32), k=2)
    assert hits.rows.tolist() == [[1, 2]]
    hits = DenseScorer(_table(entities), block_size=4).search(np.array([[1.0, 0.0]], dtype=np.float32), k=4)
    assert hits.rows.tolist() == [[1, 2, 3, 5]]


def test_k_larger_than_the_kb_returns_everything(vectors):
    entities, mentions = vectors
    hits = DenseScorer(_table(entities[:5])).search(mentions, k=50)
    assert hits.rows.shape == (7, 5)


def test_rows_scorer_plugs_into_full_kb_ranking(vectors):
    entities, _ = vectors
    mentions = entities[[4, 150, 99]] + 0.01
    scorer = DenseScorer(_table(entities), block_size=64)
    result = rank_full_kb(scorer.rows_scorer(_table(mentions)), np.array([4, 150, 99]), len(entities),
                          entity_chunk_size=64, progress=False)
    assert result.ranks().tolist() == [1, 1, 1]


def test_bad_inputs_are_refused(vectors):
    entities, mentions = vectors
    scorer = DenseScorer(_table(entities))
    with pytest.raises(ValueError, match="different backbones"):
        scorer.score_block(mentions[:, :8], 0, 10)
    with pytest.raises(ValueError, match="outside"):
        scorer.score_block(mentions, 0, 201)
    with pytest.raises(ValueError, match="k must be positive"):
        scorer.search(mentions, k=0)
