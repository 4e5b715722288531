"""`mmel features build --engine ray`: workers write the store's own shards; the result equals the local build."""

from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pytest
import torch
from killing import KillingEngine

from mmel.backbones.clip import CLIPBackbone, create_random_clip
from mmel.core.engine import WorkerLostError
from mmel.core.types import Dataset
from mmel.data.synthetic import generate_dataset
from mmel.features.store import build_features
from mmel.features.templates import get_template
from mmel.features.views import DatasetFeatures, describe_store, list_views, open_features

pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray")]

SHARD_SIZE = 16   # texts per shard (images: 2): many shards for two workers


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> CLIPBackbone:
    return CLIPBackbone.load(create_random_clip(tmp_path_factory.mktemp("tiny-clip"), seed=0))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Dataset:
    """48 entities and 24 mentions with rendered images, one image file that does not decode."""
    dataset = generate_dataset(48, mentions_per_split={"train": 12, "test": 12}, seed=3,
                               out_dir=tmp_path_factory.mktemp("synthetic") / "data", image_size=32)
    broken = next(entity.images[0] for entity in dataset.kb if entity.images)
    (dataset.root / broken).write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    return dataset


def build(dataset: Dataset, backbone: CLIPBackbone, store: Path, engine=None):
    return build_features(dataset, backbone, store, dtype="float32", batch_size=8, shard_size=SHARD_SIZE,
                          num_threads=1, progress=False, engine=engine)


def same_tree(left: Path, right: Path) -> list[str]:
    """Paths (relative) whose presence or bytes differ between two directory trees."""
    names = {p.relative_to(left) for p in left.rglob("*") if p.is_file()} | \
            {p.relative_to(right) for p in right.rglob("*") if p.is_file()}
    return sorted(str(name) for name in names
                  if not ((left / name).is_file() and (right / name).is_file()
                          and filecmp.cmp(left / name, right / name, shallow=False)))


def test_ray_build_writes_the_same_store_as_the_local_build(ray_engine, synthetic, tiny_clip, tmp_path) -> None:
    local = build(synthetic, tiny_clip, tmp_path / "local")
    remote = build(synthetic, tiny_clip, tmp_path / "ray", engine=ray_engine)
    assert same_tree(tmp_path / "local" / "cache", tmp_path / "ray" / "cache") == []
    assert len(list((tmp_path / "ray" / "cache").rglob("shard-*"))) > 2 * ray_engine.num_workers
    differing_view_files = same_tree(local.view_dir, remote.view_dir)
    assert differing_view_files == ["manifest.json"]       # its build time, nothing else
    assert {k: v for k, v in local.manifest.items() if k != "created"} == \
           {k: v for k, v in remote.manifest.items() if k != "created"}
    assert remote.report.image_report.problems == local.report.image_report.problems
    assert sum(local.report.image_report.problems.values()) == 1          # the broken file, found by a worker
    assert (remote.report.texts_encoded, remote.report.images_encoded) == \
           (local.report.texts_encoded, local.report.images_encoded)
    assert (remote.report.engine, remote.report.workers) == ("ray", 2)
    rows = np.arange(len(synthetic.kb))
    reopened = open_features(tmp_path / "ray", synthetic.name)
    np.testing.assert_array_equal(reopened.entities.gather(rows).image_patches.numpy(),
                                  local.entities.gather(rows).image_patches.numpy())


def test_a_killed_worker_loses_only_its_shard_and_the_rerun_finishes(ray_engine, synthetic, tiny_clip,
                                                                     tmp_path) -> None:
    victim_text = get_template("mimic").entity_text(synthetic.kb[40])   # in the third text shard
    killer = KillingEngine(ray_engine, lambda shard: shard.kind == "text" and victim_text in shard.items)
    with pytest.raises(WorkerLostError, match="rerun the command"):
        build(synthetic, tiny_clip, tmp_path / "store", engine=killer)
    assert list_views(tmp_path / "store") == {}                                   # nothing visible yet
    resumed = build(synthetic, tiny_clip, tmp_path / "store", engine=ray_engine)
    assert 0 < resumed.report.texts_encoded < resumed.report.unique_texts         # kept what finished
    assert not list((tmp_path / "store").rglob(".shard-*"))                       # no half-written shard left
    fresh = build(synthetic, tiny_clip, tmp_path / "fresh")
    assert_same_features(resumed, fresh)   # the shards are cut differently after a resume; their contents agree
    assert [cache["entries"] for cache in describe_store(tmp_path / "store")["caches"]] == \
           [cache["entries"] for cache in describe_store(tmp_path / "fresh")["caches"]]


def assert_same_features(left: DatasetFeatures, right: DatasetFeatures) -> None:
    """Every table of two views holds exactly the same features, row for row."""
    assert left.manifest["tables"] == right.manifest["tables"]
    for name, table in [("entities", left.entities), *left.mentions.items()]:
        other = right.entities if name == "entities" else right.mentions[name]
        rows = np.arange(len(table))
        for field, value in vars(table.gather(rows)).items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, getattr(other.gather(rows), field)), f"{name}.{field}"
