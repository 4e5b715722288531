"""The index's entity side encoded shard by shard: any shard size and any finishing order give the same index."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pytest

from mmel.core.engine import LocalEngine, WorkerFactory
from mmel.models import load_model
from mmel.retrieval import entity_encoding
from mmel.retrieval.entity_cache import CacheLayout, EntityCacheStore
from mmel.retrieval.index_build import CACHE_DIR, IndexBuildConfig, ModelSpec, build_index
from mmel.retrieval.linker import Linker


class LastShardFirst(LocalEngine):
    """Runs the shards in reverse: a cluster engine hands results back in whatever order shards finish."""

    name = "reversed"

    def map_shards(self, make_worker: WorkerFactory, shards: Sequence, *, ordered: bool = False) -> Iterator:
        worker = make_worker()
        for position in reversed(range(len(shards))):
            yield position, worker(shards[position])


def cache_arrays(index_dir, checkpoint, qids):
    spec = ModelSpec.read(checkpoint)
    layout = CacheLayout.for_model(load_model(checkpoint), spec.max_text_length, spec.image_tokens)
    cache = EntityCacheStore.open(index_dir / CACHE_DIR, layout, qids).gather(qids)
    return {name: getattr(cache, name).numpy() for name in layout.fields}


@pytest.mark.slow
def test_small_shards_in_any_order_build_the_same_index(tiny_index, linker_backbone, tmp_path, monkeypatch):
    config = IndexBuildConfig(first_stage="dense")
    build_index(tiny_index.dataset, tiny_index.checkpoint, tmp_path / "whole", config=config,
                backbone=linker_backbone, progress=False)
    monkeypatch.setattr(entity_encoding, "SHARD_ROWS", 3)            # 8 entities: shards of 3, 3 and 2
    sharded = build_index(tiny_index.dataset, tiny_index.checkpoint, tmp_path / "sharded", config=config,
                          backbone=linker_backbone, progress=False, engine=LastShardFirst())
    assert sharded.entities == 8 and sharded.with_image == 2
    qids = tiny_index.dataset.kb.qids
    whole = cache_arrays(tmp_path / "whole", tiny_index.checkpoint, qids)
    for name, values in cache_arrays(tmp_path / "sharded", tiny_index.checkpoint, qids).items():
        np.testing.assert_allclose(values, whole[name], atol=1e-5)
    sentence, surface, _ = tiny_index.queries[0]
    results = []
    for name in ("whole", "sharded"):
        with Linker.load(tmp_path / name, backbone=linker_backbone) as linker:
            results.append(linker.link(sentence, mention=surface, top_k=8))
    assert [c.qid for c in results[0].candidates] == [c.qid for c in results[1].candidates]
    np.testing.assert_allclose([c.score for c in results[0].candidates], [c.score for c in results[1].candidates],
                               atol=1e-4)
