"""build_index from a caller's FeatureTable (`entity_features`): no backbone, the model's cache and the
first-stage vectors come from those features, and the build reports where its time went."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch

from mmel.core.errors import MismatchError
from mmel.core.features import FeatureBatch, InMemoryFeatureTable
from mmel.core.types import Dataset, Entity, KnowledgeBase
from mmel.models.mimic import MIMICConfig, MIMICModel
from mmel.retrieval.entity_cache import CacheLayout, EntityCacheStore
from mmel.retrieval.index import VectorIndex
from mmel.retrieval.index_build import IndexBuildConfig, build_index

ENTITIES = 12
SHAPES = {"text_global": (8,), "text_tokens": (5, 8), "image_global": (6,), "image_patches": (3, 7)}


def random_features(count: int, seed: int = 0) -> FeatureBatch:
    generator = torch.Generator().manual_seed(seed)
    values = {name: torch.randn(count, *shape, generator=generator) for name, shape in SHAPES.items()}
    return FeatureBatch(**values, text_mask=torch.ones(count, 5, dtype=torch.bool),
                        has_image=torch.arange(count) % 3 != 0)


@pytest.fixture
def small_model(tmp_path):
    torch.manual_seed(0)
    model = MIMICModel(MIMICConfig(text_dim=8, image_global_dim=6, image_patch_dim=7, hidden_dim=4)).eval()
    model.save_pretrained(tmp_path / "model", metadata={"preprocess": {"max_text_length": 5},
                                                        "backbone": {"name": "minilm_effnet", "num_patches": 3}})
    return model, tmp_path / "model"


def small_dataset(tmp_path) -> Dataset:
    kb = KnowledgeBase([Entity(f"Q{row}", f"Entity {row}", f"Number {row}.") for row in range(ENTITIES)])
    return Dataset(name="table", kb=kb, splits={}, root=tmp_path)


def test_index_from_a_feature_table_holds_the_models_cache_and_vectors(tmp_path, small_model):
    model, checkpoint = small_model
    features = random_features(ENTITIES)
    config = IndexBuildConfig(first_stage="dense", encode_batch_size=5)
    report = build_index(small_dataset(tmp_path), checkpoint, tmp_path / "index", config=config,
                         entity_features=InMemoryFeatureTable(features), progress=False)
    assert report.entities == ENTITIES and report.with_image == int(features.has_image.sum())
    assert set(report.stage_seconds) == {"load_model", "entity_cache", "vectors", "entity_store", "model_and_manifest"}
    assert all(seconds >= 0 for seconds in report.stage_seconds.values())

    qids = [f"Q{row}" for row in range(ENTITIES)]
    with torch.inference_mode():
        expected = model.encode_entities(features)
    layout = CacheLayout.for_model(model, 5, features.image_patches.shape[1])
    cache = EntityCacheStore.open(tmp_path / "index" / "entity_cache", layout, qids)
    stored = cache.gather(qids[::-1])
    for item in fields(expected):
        torch.testing.assert_close(getattr(stored, item.name), getattr(expected, item.name).flip(0))

    vectors = VectorIndex.load(tmp_path / "index" / "vectors")
    unit = torch.nn.functional.normalize(features.text_global, dim=-1).numpy()
    found = vectors.search(unit, 1)
    assert [hits[0] for hits in found.qids] == qids
    np.testing.assert_allclose(found.scores[:, 0], 1.0, rtol=1e-5)


def test_feature_table_must_match_the_kb_and_exclude_a_store(tmp_path, small_model):
    _, checkpoint = small_model
    dataset = small_dataset(tmp_path)
    with pytest.raises(MismatchError, match="11 rows but the knowledge base has 12"):
        build_index(dataset, checkpoint, tmp_path / "short", entity_features=InMemoryFeatureTable(
            random_features(ENTITIES - 1)), progress=False)
    with pytest.raises(ValueError, match="not both"):
        build_index(dataset, checkpoint, tmp_path / "both", features_store=tmp_path / "store",
                    entity_features=InMemoryFeatureTable(random_features(ENTITIES)), progress=False)
    assert not (tmp_path / "short").exists() and not (tmp_path / "both").exists()
