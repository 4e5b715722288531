"""Model ranking: the cached scorer equals the published (naive) cost model, and two-stage ranking
equals exhaustive ranking wherever the first stage keeps the gold entity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmel.core.features import FeatureBatch, InMemoryFeatureTable
from mmel.evaluation.protocols import rank_full_kb
from mmel.models.mimic import MIMICConfig, MIMICModel
from mmel.retrieval.evaluate import _ranks_desc
from mmel.retrieval.ranking import ModelScorer, NaiveModelScorer, rank_two_stage

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
    torch.testing.assert_close(scorer.rerank(rows, candidates), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_candidates", [1, 8, NUM_ENTITIES])
def test_two_stage_equals_exhaustive_where_the_first_stage_keeps_the_gold(setting, num_candidates):
    model, entities, mentions, gold = setting
    scorer = ModelScorer(model, entities, mentions, progress=False)
    first_scores = np.random.default_rng(5).normal(size=(NUM_MENTIONS, NUM_ENTITIES))
    first_scores[np.arange(NUM_MENTIONS)[::2], gold[::2]] += 3.0   # half the mentions: gold retrieved on top

    def first_stage(rows: np.ndarray, start: int, stop: int) -> np.ndarray:
        return first_scores[rows, start:stop]

    exhaustive = rank_full_kb(scorer.score_block, gold, NUM_ENTITIES, progress=False).ranks()
    first = rank_full_kb(first_stage, gold, NUM_ENTITIES, progress=False).ranks()
    two_stage = rank_two_stage(first_stage, scorer.rerank, gold, NUM_ENTITIES, num_candidates=num_candidates,
                               mention_batch_size=5, progress=False)
    ranks = two_stage.ranks()
    kept = first <= num_candidates
    if num_candidates == NUM_ENTITIES:
        np.testing.assert_array_equal(ranks, exhaustive)
    # a kept gold is ranked by the model among the K candidates: never worse than exhaustively
    assert (ranks[kept] <= exhaustive[kept]).all()
    assert (ranks[kept] <= num_candidates).all()
    # a missed gold keeps its first-stage rank, beyond K
    np.testing.assert_array_equal(ranks[~kept], first[~kept])
    assert two_stage.topk_rows.shape == (NUM_MENTIONS, num_candidates)


def test_ranks_desc_orders_best_first_with_ties_to_the_lower_column():
    scores = np.array([[0.1, 0.9, 0.5, 0.9]])
    np.testing.assert_array_equal(_ranks_desc(scores), [[3, 0, 2, 1]])
