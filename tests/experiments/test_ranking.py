"""Exhaustive model ranking: the cached scorer equals the published (naive) cost model, and the
per-mention candidate path equals the matching columns of the full score matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmel.core.features import FeatureBatch, InMemoryFeatureTable
from mmel.evaluation.protocols import rank_full_kb
from mmel.experiments.ranking import ModelScorer, NaiveModelScorer
from mmel.models.mimic import MIMICConfig, MIMICModel

NUM_ENTITIES, NUM_MENTIONS, TEXT, IMAGE, TOKENS, PATCHES = 57, 23, 16, 12, 6, 5


def random_features(count: int, generator: torch.Generator) -> FeatureBatch:
    return FeatureBatch(text_global=torch.randn(count, TEXT, generator=generator),
                        text_tokens=torch.randn(count, TOKENS, TEXT, generator=generator),
                        text_mask=torch.ones(count, TOKENS, dtype=torch.bool),
                        image_global=torch.randn(count, IMAGE, generator=generator),
                        image_patches=torch.randn(count, PATCHES, IMAGE, generator=generator),
                        has_image=torch.rand(count, generator=generator) > 0.5)


@pytest.fixture(scope="module")
def setting():
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = MIMICModel(MIMICConfig(text_dim=TEXT, image_global_dim=IMAGE, image_patch_dim=IMAGE)).eval()
    entities = InMemoryFeatureTable(random_features(NUM_ENTITIES, generator))
    mentions = InMemoryFeatureTable(random_features(NUM_MENTIONS, generator))
    gold = np.random.default_rng(3).integers(0, NUM_ENTITIES, NUM_MENTIONS)
    return model, entities, mentions, gold


def test_cached_scorer_gives_the_scores_of_the_published_cost_model(setting):
    model, entities, mentions, _ = setting
    rows = np.arange(NUM_MENTIONS)
    cached = ModelScorer(model, entities, mentions, encode_batch_size=10, progress=False).score_block(rows, 5, 40)
    naive = NaiveModelScorer(model, entities, mentions).score_block(rows, 5, 40)
    torch.testing.assert_close(cached, naive, rtol=1e-5, atol=1e-5)


def test_exhaustive_ranks_match_with_either_scorer(setting):
    model, entities, mentions, gold = setting
    cached = rank_full_kb(ModelScorer(model, entities, mentions, progress=False).score_block, gold, NUM_ENTITIES,
                          mention_batch_size=7, entity_chunk_size=13, progress=False)
    naive = rank_full_kb(NaiveModelScorer(model, entities, mentions).score_block, gold, NUM_ENTITIES,
                         mention_batch_size=7, entity_chunk_size=13, progress=False)
    np.testing.assert_array_equal(cached.ranks(), naive.ranks())


def test_rerank_scores_each_mention_against_its_own_candidates(setting):
    model, entities, mentions, _ = setting
    scorer = ModelScorer(model, entities, mentions, progress=False)
    rows = np.array([2, 9])
    candidates = np.array([[4, 0, 33], [56, 4, 1]])
    full = scorer.score_block(rows, 0, NUM_ENTITIES)
    expected = torch.stack([full[0, candidates[0]], full[1, candidates[1]]])
    with torch.inference_mode():
        reranked = model.match_candidates(scorer.encoded_mentions(rows), scorer.entity_cache,
                                          torch.as_tensor(candidates)).scores
    torch.testing.assert_close(reranked, expected, rtol=1e-5, atol=1e-5)
