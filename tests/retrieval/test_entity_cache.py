"""EntityCacheStore: segments round-trip, newest row wins, and its guards fire."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from mmel.core.errors import DataError, MismatchError
from mmel.core.npy import NpyRowWriter, create_npy, open_npy_random_access
from mmel.models.base import RowCache, cache_field
from mmel.retrieval.entity_cache import CacheLayout, EntityCacheStore


@dataclass
class ToyCache(RowCache):
    vector: torch.Tensor = cache_field("D")           # [N, 3]
    tokens: torch.Tensor = cache_field("L", "W")      # [N, 2, 4]
    flag: torch.Tensor = cache_field(kind="bool")     # [N]


TOY_LAYOUT = CacheLayout(ToyCache, ToyCache.layout({"D": 3, "L": 2, "W": 4}))


def toy(values: list[float]) -> ToyCache:
    count = len(values)
    base = torch.tensor(values).view(count, 1)
    return ToyCache(vector=base.repeat(1, 3), tokens=base.view(count, 1, 1).repeat(1, 2, 4),
                    flag=torch.tensor([v > 1 for v in values]))


def test_segments_round_trip_and_newest_row_wins(tmp_path):
    layout = TOY_LAYOUT
    store = EntityCacheStore.create(tmp_path / "cache", layout, "float32")
    store.write_segment(["a", "b"], [toy([1.0]), toy([2.0])], metadata={"images_root": "/one"})
    store.write_segment(["b", "c"], [toy([5.0, 6.0])], metadata={"images_root": "/two"})
    gathered = store.gather(["c", "a", "b"])
    assert gathered.vector[:, 0].tolist() == [6.0, 1.0, 5.0]
    assert gathered.tokens.shape == (3, 2, 4) and gathered.flag.tolist() == [True, False, True]
    assert store.segment_metadata("b") == {"images_root": "/two"}
    reopened = EntityCacheStore.open(tmp_path / "cache", layout, live_qids=["a", "c"])
    assert len(reopened) == 2 and "b" not in reopened and reopened.stored_rows() == 4
    assert reopened.gather(["a"]).vector[0, 0] == 1.0


def test_compaction_keeps_live_rows_and_their_segment_metadata(tmp_path):
    layout = TOY_LAYOUT
    store = EntityCacheStore.create(tmp_path / "cache", layout, "float16")
    store.write_segment(["a", "b", "c"], [toy([1.0, 2.0, 3.0])], metadata={"images_root": "/one"})
    store.write_segment(["b", "d"], [toy([5.0, 6.0])], metadata={"images_root": "/two"})
    store.write_segment(["e"], [toy([7.0])], metadata={"images_root": "/one"})
    store.forget(["c"])
    report = store.compact(chunk_rows=1)
    assert (report.rows_before, report.rows_after, report.segments_before, report.segments_after) == (6, 4, 3, 2)
    reopened = EntityCacheStore.open(tmp_path / "cache", layout, live_qids=["a", "b", "d", "e"])
    assert reopened.gather(["a", "b", "d", "e"]).vector[:, 0].tolist() == [1.0, 5.0, 6.0, 7.0]
    assert [reopened.segment_metadata(q)["images_root"] for q in "abde"] == ["/one", "/two", "/two", "/one"]
    segments = sorted(path.name for path in (tmp_path / "cache").iterdir() if path.is_dir())
    assert segments == ["segment-000003", "segment-000004"]       # old ones deleted, names never reused
    reopened.write_segment(["f"], [toy([8.0])])
    assert reopened.gather(["f"]).vector[0, 0] == 8.0 and reopened.num_segments == 3


def test_float16_storage_rounds(tmp_path):
    store = EntityCacheStore.create(tmp_path / "cache", TOY_LAYOUT, "float16")
    store.write_segment(["a"], [toy([1.0001])])
    assert store.gather(["a"]).vector.dtype == torch.float32
    assert store.gather(["a"]).vector[0, 0].item() == pytest.approx(1.0, abs=1e-3)


def test_guards(tmp_path):
    with pytest.raises(KeyError, match="shape letter"):
        ToyCache.layout({"D": 3})

    @dataclass
    class Undeclared(RowCache):
        vector: torch.Tensor

    with pytest.raises(TypeError, match="cache_field"):
        Undeclared.layout({})
    layout = TOY_LAYOUT
    store = EntityCacheStore.create(tmp_path / "cache", layout, "float32")
    with pytest.raises(ValueError, match="2 QIDs but 1 cached rows"):
        store.write_segment(["a", "b"], [toy([1.0])])
    store.write_segment(["a"], [toy([1.0])])
    with pytest.raises(MismatchError, match="no cached rows"):
        EntityCacheStore.open(tmp_path / "cache", layout, live_qids=["a", "z"])
    other = CacheLayout(ToyCache, ToyCache.layout({"D": 5, "L": 2, "W": 4}))
    with pytest.raises(MismatchError, match="does not fit"):
        EntityCacheStore.open(tmp_path / "cache", other, live_qids=["a"])
    with pytest.raises(KeyError, match="no cached rows"):
        store.gather(["nope"])
    with pytest.raises(ValueError, match="storage dtype"):
        EntityCacheStore.create(tmp_path / "other", layout, "int4")


def random_toy(count: int, seed: int) -> ToyCache:
    generator = torch.Generator().manual_seed(seed)
    return ToyCache(vector=torch.randn(count, 3, generator=generator),
                    tokens=torch.randn(count, 2, 4, generator=generator) * 10,
                    flag=torch.rand(count, generator=generator) > 0.5)


def test_int8_storage_round_trips_within_its_quantization_step_and_compacts(tmp_path):
    original = random_toy(50, seed=1)
    original.tokens[3] = 0.0                                   # a zero vector decodes to zeros
    store = EntityCacheStore.create(tmp_path / "cache", TOY_LAYOUT, "int8")
    qids = [f"Q{row}" for row in range(50)]
    store.write_segment(qids, [original.select(slice(0, 20)), original.select(slice(20, 50))])
    reopened = EntityCacheStore.open(tmp_path / "cache", TOY_LAYOUT, live_qids=qids)
    gathered = reopened.gather(qids[::-1])
    for name in ("vector", "tokens"):
        exact = getattr(original, name).flip(0)
        step = exact.abs().amax(dim=-1, keepdim=True) / 127      # one quantization step per stored vector
        assert (getattr(gathered, name) - exact).abs().le(step / 2 + 1e-6).all()
    assert torch.equal(gathered.flag, original.flag.flip(0)) and gathered.tokens[-4].eq(0).all()
    files = sorted(path.name for path in (tmp_path / "cache" / "segment-000000").iterdir())
    assert files == ["flag.npy", "qids.json", "tokens.npy", "tokens.scale.npy", "vector.npy", "vector.scale.npy"]
    assert np.load(tmp_path / "cache" / "segment-000000" / "tokens.npy").dtype == np.int8
    reopened.forget(qids[:10])
    reopened.compact()
    torch.testing.assert_close(reopened.gather(qids[10:]).tokens, gathered.tokens.flip(0)[10:])


def test_rows_written_at_offsets_make_a_plain_npy_read_back_randomly(tmp_path):
    rows = np.arange(24, dtype=np.float16).reshape(6, 2, 2)
    create_npy(tmp_path / "a.npy", rows.shape, rows.dtype)
    with NpyRowWriter(tmp_path / "a.npy") as writer:
        writer.write(4, rows[4:])        # any order: disjoint rows may come from different workers
        writer.write(0, rows[:4])
        with pytest.raises(ValueError, match="do not fit at row 5"):
            writer.write(5, rows[:2])
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), rows)
    mapped = open_npy_random_access(tmp_path / "a.npy")
    np.testing.assert_array_equal(mapped[[5, 0]], rows[[5, 0]])
    assert not mapped.flags.writeable
    (tmp_path / "c.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:-8])
    with pytest.raises(DataError, match="truncated"):
        open_npy_random_access(tmp_path / "c.npy")
    np.save(tmp_path / "d.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="object"):
        open_npy_random_access(tmp_path / "d.npy")
