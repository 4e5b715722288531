"""`mmel index build --engine ray`: Ray workers encode the entity side, and the index equals the local one."""

from __future__ import annotations

import numpy as np
import pytest

from mmel.core.paths import read_json
from mmel.retrieval import entity_encoding
from mmel.retrieval.index import VectorIndex
from mmel.retrieval.index_build import IndexBuildConfig, build_index
from mmel.retrieval.linker import Linker

pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray"), pytest.mark.slow]


def test_ray_workers_build_the_index_the_local_engine_builds(tiny_index, linker_backbone, ray_engine, tmp_path,
                                                             monkeypatch):
    monkeypatch.setattr(entity_encoding, "SHARD_ROWS", 3)   # 8 entities: three shards over the two workers
    config = IndexBuildConfig(first_stage="dense")
    store = tiny_index.root.parent / "features"   # workers read the features the store holds (no backbone load)
    local = build_index(tiny_index.dataset, tiny_index.checkpoint, tmp_path / "local", config=config,
                        features_store=store, backbone=linker_backbone, progress=False)
    on_ray = build_index(tiny_index.dataset, tiny_index.checkpoint, tmp_path / "ray", config=config,
                         features_store=store, backbone=linker_backbone, progress=False, engine=ray_engine)
    assert (on_ray.entities, on_ray.with_image) == (local.entities, local.with_image) == (8, 2)
    for part in ("entity_cache/segment-000000/qids.json", "vectors/id_map.json"):
        assert read_json(tmp_path / "ray" / part) == read_json(tmp_path / "local" / part)
    for name in sorted(path.name for path in (tmp_path / "local" / "entity_cache" / "segment-000000").glob("*.npy")):
        np.testing.assert_allclose(np.load(tmp_path / "ray" / "entity_cache" / "segment-000000" / name),
                                   np.load(tmp_path / "local" / "entity_cache" / "segment-000000" / name), atol=1e-5)
    queries = np.random.default_rng(0).standard_normal((4, 384)).astype(np.float32)
    assert (VectorIndex.load(tmp_path / "ray" / "vectors").search(queries, 8).qids
            == VectorIndex.load(tmp_path / "local" / "vectors").search(queries, 8).qids)
    sentence, surface, gold = tiny_index.queries[0]
    with Linker.load(tmp_path / "ray", backbone=linker_backbone) as linker:
        assert linker.link(sentence, mention=surface, top_k=3).best.qid == gold
