"""The feature store: build, reuse, invalidation, resume, memory-mapped reads, images that cannot be used."""

from __future__ import annotations

import dataclasses
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from mmel.core.errors import DataError, MismatchError, PathEscapeError
from mmel.core.features import FeatureBatch
from mmel.core.types import Dataset, Entity, KnowledgeBase, Mention
from mmel.features import build_features, describe_store, encode_items, get_template, list_views, open_features
from mmel.features.encoding import resolve_image_batch_size
from mmel.features.prune import prune_store


def _build(dataset, backbone, store, **options):
    options.setdefault("dtype", "float32")
    options.setdefault("batch_size", 8)
    options.setdefault("progress", False)
    options.setdefault("num_threads", 1)   # tiny model: one thread avoids OpenMP stalls on a busy machine
    return build_features(dataset, backbone, store, **options)


def _assert_batches_equal(left: FeatureBatch, right: FeatureBatch, atol: float = 0.0) -> None:
    for field in dataclasses.fields(FeatureBatch):
        torch.testing.assert_close(getattr(left, field.name), getattr(right, field.name), rtol=0 if not atol else 1e-4,
                                   atol=atol, msg=lambda m, name=field.name: f"{name}: {m}")


def test_build_gives_tables_with_the_right_shapes(tiny_clip, dataset, tmp_path):
    features = _build(dataset, tiny_clip, tmp_path / "store")
    assert len(features.entities) == 24 and set(features.mentions) == {"train", "test"}
    batch = features.mentions["train"].gather([0, 1, 4])
    assert batch.text_global.shape == (3, 32) and batch.text_tokens.shape == (3, 40, 32)
    assert batch.image_global.shape == (3, 32) and batch.image_patches.shape == (3, 50, 48)
    assert batch.has_image.tolist() == [True, False, True]
    assert batch.text_tokens.dtype == torch.float32
    assert features.entities.has_image.sum() == 8
    report = features.report
    assert report.unique_texts == 24 + 16 and report.texts_encoded == 40
    assert report.unique_images == 3 and report.images_encoded == 3   # two entities share one file


def test_store_path_equals_on_the_fly_encoding(tiny_clip, dataset, tmp_path):
    """A frozen-backbone model reading the store and a fine-tuning one encoding on the fly see the same features."""
    features = _build(dataset, tiny_clip, tmp_path / "store")
    template = get_template("mimic")
    rows = [0, 3, 5, 6]
    texts = [template.entity_text(dataset.kb[row]) for row in rows]
    images = [Image.open(dataset.root / dataset.kb[row].images[0]) if dataset.kb[row].images else None
              for row in rows]
    with torch.inference_mode():
        on_the_fly = encode_items(tiny_clip, texts, images, max_text_length=40, batch_size=8)
    _assert_batches_equal(features.entities.gather(rows), on_the_fly, atol=1e-5)


def test_rerun_is_a_cache_hit(tiny_clip, dataset, tmp_path):
    first = _build(dataset, tiny_clip, tmp_path / "store")
    second = _build(dataset, tiny_clip, tmp_path / "store")
    assert second.report.texts_encoded == 0 and second.report.images_encoded == 0
    assert second.view_id == first.view_id
    _assert_batches_equal(first.entities.gather(range(24)), second.entities.gather(range(24)))


def test_template_change_re_encodes_only_changed_texts(tiny_clip, dataset, tmp_path):
    _build(dataset, tiny_clip, tmp_path / "store")
    m3el = _build(dataset, tiny_clip, tmp_path / "store", template="m3el")
    changed = sum(1 for e in dataset.kb if e.description)   # entities without a description fall back to attributes
    assert m3el.report.texts_encoded == changed == 12
    assert m3el.report.images_encoded == 0
    assert len(list_views(tmp_path / "store")["toy"]) == 2


def test_max_length_change_re_encodes_texts_not_images(tiny_clip, dataset, tmp_path):
    _build(dataset, tiny_clip, tmp_path / "store")
    short = _build(dataset, tiny_clip, tmp_path / "store", max_text_length=16)
    assert short.report.texts_encoded == 40 and short.report.images_encoded == 0
    assert short.entities.gather([0]).text_tokens.shape == (1, 16, 32)


def test_changed_image_content_re_encodes_that_image_only(tiny_clip, dataset, tmp_path, image_writer):
    before = _build(dataset, tiny_clip, tmp_path / "store")
    image_writer(dataset.root / "kb" / "own.jpg", (250, 250, 0))
    after = _build(dataset, tiny_clip, tmp_path / "store")
    assert after.report.images_encoded == 1 and after.report.texts_encoded == 0
    own_row, shared_row = 3, 0
    changed = after.entities.gather([own_row]).image_global
    assert not torch.allclose(before.entities.gather([own_row]).image_global, changed)
    torch.testing.assert_close(before.entities.gather([shared_row]).image_global,
                               after.entities.gather([shared_row]).image_global)


def test_interrupted_build_resumes_from_finished_shards(tiny_clip, dataset, tmp_path):
    shards_written = []

    def stop_after_two(kind: str, entries: int) -> None:
        shards_written.append(entries)
        if len(shards_written) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _build(dataset, tiny_clip, tmp_path / "store", shard_size=8, on_shard=stop_after_two)
    assert list_views(tmp_path / "store") == {}           # no half-written view
    resumed = _build(dataset, tiny_clip, tmp_path / "store", shard_size=8)
    assert resumed.report.texts_encoded == 40 - 16
    uninterrupted = _build(dataset, tiny_clip, tmp_path / "fresh", shard_size=8)
    _assert_batches_equal(resumed.entities.gather(range(24)), uninterrupted.entities.gather(range(24)))


def test_reopened_store_reads_memory_mapped_arrays(tiny_clip, dataset, tmp_path):
    built = _build(dataset, tiny_clip, tmp_path / "store", dtype="float16")
    reopened = open_features(tmp_path / "store", "toy")
    matrix = reopened.entities.text_global_matrix()
    assert isinstance(matrix, np.memmap) and matrix.dtype == np.float16 and matrix.shape == (24, 32)
    gathered = reopened.entities.gather(np.arange(24))
    assert gathered.text_global.dtype == torch.float32
    torch.testing.assert_close(gathered.text_global, torch.from_numpy(matrix.astype(np.float32)))
    _assert_batches_equal(built.mentions["test"].gather([2, 0]), reopened.mentions["test"].gather([2, 0]))


def test_float16_store_is_smaller_and_close_to_float32(tiny_clip, dataset, tmp_path):
    half = _build(dataset, tiny_clip, tmp_path / "half", dtype="float16")
    full = _build(dataset, tiny_clip, tmp_path / "full", dtype="float32")
    assert half.report.store_bytes < 0.6 * full.report.store_bytes
    _assert_batches_equal(half.entities.gather(range(24)), full.entities.gather(range(24)), atol=1e-2)


def test_imageless_items_share_one_blank_entry(tiny_clip, dataset, tmp_path):
    features = _build(dataset, tiny_clip, tmp_path / "store")
    summary = describe_store(tmp_path / "store")
    assert summary["caches"][0]["entries"]["image"] == 3
    blank_rows = features.entities.gather([1, 2])
    assert not blank_rows.has_image.any()
    with torch.inference_mode():
        blank = tiny_clip.encode_blank_images(1)
    torch.testing.assert_close(blank_rows.image_patches[1], blank.patches[0], rtol=1e-5, atol=1e-5)


def _bomb_png() -> bytes:
    """A valid 1x1 PNG whose header claims 20000 x 20000 pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\x00")) \
        + chunk(b"IEND", b"")


def test_unusable_images_become_no_image_with_counted_reasons(tiny_clip, tmp_path, image_writer):
    root = tmp_path / "data"
    image_writer(root / "good.jpg", (10, 120, 200), size=(400, 300))
    good = (root / "good.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    (root / "bomb.png").write_bytes(_bomb_png())
    names = ["good.jpg", "truncated.jpg", "corrupt.jpg", "bomb.png", "missing.jpg", None]
    mentions = [Mention(id=f"m{i}", sentence="s", surface=f"x{i}", image=name) for i, name in enumerate(names)]
    dataset = Dataset("images", KnowledgeBase([Entity("Q1", "one")]), {"test": mentions}, root)
    features = _build(dataset, tiny_clip, tmp_path / "store")
    assert features.mentions["test"].has_image.tolist() == [True, False, False, False, False, False]
    report = features.report.image_report
    assert report.loaded == 1 and report.failed == 4
    assert report.problems["missing"] == 1
    assert sum(count for reason, count in report.problems.items() if "truncated" in reason) >= 1
    assert any("too large" in reason or "pixels" in reason for reason in report.problems)
    assert features.manifest["tables"]["mentions-test"]["with_image"] == 1


def test_image_path_escaping_the_root_is_an_error(tiny_clip, tmp_path):
    mention = Mention(id="m0", sentence="s", surface="x", image="../outside.jpg")
    dataset = Dataset("escape", KnowledgeBase([Entity("Q1", "one")]), {"test": [mention]}, tmp_path / "data")
    with pytest.raises(PathEscapeError):
        _build(dataset, tiny_clip, tmp_path / "store")


def test_open_features_refuses_ambiguous_or_missing_views(tiny_clip, dataset, tmp_path):
    with pytest.raises(MismatchError, match="no feature view"):
        open_features(tmp_path / "store", "toy")
    first = _build(dataset, tiny_clip, tmp_path / "store")
    _build(dataset, tiny_clip, tmp_path / "store", max_text_length=16)
    with pytest.raises(MismatchError, match="more than one"):
        open_features(tmp_path / "store", "toy")
    assert open_features(tmp_path / "store", "toy", view_id=first.view_id).max_text_length == 40


def test_check_dataset_detects_changed_items(tiny_clip, dataset, dataset_factory, tmp_path):
    features = _build(dataset, tiny_clip, tmp_path / "store")
    features.check_dataset(dataset)
    changed = dataset_factory(dataset.root, entities=25)
    with pytest.raises(MismatchError, match="entities"):
        features.check_dataset(changed)


def test_selected_splits_only(tiny_clip, dataset, tmp_path):
    features = _build(dataset, tiny_clip, tmp_path / "store", splits=["test"])
    assert set(features.mentions) == {"test"}


def test_a_later_build_for_fewer_splits_keeps_the_others(tiny_clip, dataset, tmp_path):
    """`mmel index build --features` builds the KB side only (splits=[]): the splits built before stay."""
    full = _build(dataset, tiny_clip, tmp_path / "store")
    before = {name: table.gather(range(len(table))).text_tokens for name, table in full.mentions.items()}
    kb_only = _build(dataset, tiny_clip, tmp_path / "store", splits=[])
    assert set(kb_only.mentions) == set(dataset.splits)
    for name, tokens in before.items():
        table = kb_only.mentions[name]
        torch.testing.assert_close(table.gather(range(len(table))).text_tokens, tokens)
    assert kb_only.report.texts_encoded == 0


def test_bad_options_are_refused(tiny_clip, dataset, tmp_path):
    with pytest.raises(ValueError, match="storage dtype"):
        _build(dataset, tiny_clip, tmp_path / "store", dtype="int8")
    with pytest.raises(KeyError, match="available: dim, m3el, mimic, name_only"):
        _build(dataset, tiny_clip, tmp_path / "store", template="nope")
    with pytest.raises(IndexError, match="out of range"):
        _build(dataset, tiny_clip, tmp_path / "store").entities.gather([24])


def test_image_batch_size_defaults_to_one_on_cpu(tiny_clip):
    assert resolve_image_batch_size(tiny_clip, None, 64) == 1
    assert resolve_image_batch_size(tiny_clip, 16, 64) == 16


def test_prune_drops_a_view_and_only_the_shards_no_other_view_lists(tiny_clip, dataset, tmp_path):
    store = tmp_path / "store"
    long = _build(dataset, tiny_clip, store)
    short = _build(dataset, tiny_clip, store, max_text_length=16)
    before = long.entities.gather(np.arange(len(dataset.kb)))
    (store / "cache" / long.manifest["cache"].split("/", 1)[1] / "image" / ".shard-leftover.tmp").mkdir()
    dry = prune_store(store, drop_views=[f"toy/{short.view_id}"], dry_run=True)
    assert dry.dry_run and dry.shards_removed and (store / "views" / "toy" / short.view_id).is_dir()
    report = prune_store(store, drop_views=[f"toy/{short.view_id}"])
    assert report.shards_removed == dry.shards_removed and report.bytes_freed > 0
    assert all("text-L16" in shard or "leftover" in shard for shard in report.shards_removed)
    assert list_views(store) == {"toy": [long.view_id]}
    _assert_batches_equal(open_features(store, "toy").entities.gather(np.arange(len(dataset.kb))), before)
    assert prune_store(store).shards_removed == []
    with pytest.raises(DataError, match="no such views"):
        prune_store(store, drop_views=["toy/nope"])


def _with_captions(dataset: Dataset) -> Dataset:
    """Every third mention gets a caption; the others have none (absent, not empty)."""
    splits = {name: [dataclasses.replace(m, caption=f"a person holding sign {i}" if i % 3 == 0 else None)
                     for i, m in enumerate(mentions)] for name, mentions in dataset.splits.items()}
    return dataclasses.replace(dataset, splits=splits)


def test_further_views_are_stored_pooled_with_presence_and_equal_on_the_fly_encoding(tiny_clip, dataset, tmp_path):
    captioned = _with_captions(dataset)
    features = _build(captioned, tiny_clip, tmp_path / "store", extra_views=("mention", "caption", "desc"))
    assert features.extra_views == ["caption", "desc", "mention"]
    train = features.mentions["train"].gather(range(8))
    assert set(train.views) == {"caption", "mention"}          # entity views stay on the entity side
    assert train.views["caption"].present.tolist() == [i % 3 == 0 for i in range(8)]
    assert not train.views["caption"].global_[~train.views["caption"].present].any()   # absent rows are zero
    assert train.views["mention"].present.all()
    entities = features.entities.gather(range(24))
    assert set(entities.views) == {"desc"}
    mentions = captioned.split("train")
    with torch.inference_mode():
        on_the_fly = encode_items(tiny_clip, [get_template("mimic").mention_text(m) for m in mentions],
                                  [None] * len(mentions), max_text_length=40,
                                  extra_texts={"mention": [m.surface for m in mentions],
                                               "caption": [m.caption for m in mentions]})
    for name in ("mention", "caption"):
        torch.testing.assert_close(train.views[name].global_, on_the_fly.views[name].global_, atol=1e-5, rtol=1e-4)
        assert train.views[name].present.tolist() == on_the_fly.views[name].present.tolist()


def test_a_rebuild_keeps_further_views_and_a_changed_caption_is_detected(tiny_clip, dataset, tmp_path):
    captioned = _with_captions(dataset)
    _build(captioned, tiny_clip, tmp_path / "store", extra_views=("caption",))
    again = _build(captioned, tiny_clip, tmp_path / "store")
    assert again.extra_views == ["caption"] and again.report.texts_encoded == 0
    again.check_dataset(captioned)
    changed = dataclasses.replace(captioned, splits={**captioned.splits, "train": [
        dataclasses.replace(captioned.split("train")[0], caption="another caption"), *captioned.split("train")[1:]]})
    with pytest.raises(MismatchError, match="different items"):
        again.check_dataset(changed)
