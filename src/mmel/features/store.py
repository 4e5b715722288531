"""The feature store: encode a dataset's KB and mentions once, then read features memory-mapped.

Entries are content-addressed, so nothing is encoded twice and a change re-encodes exactly what
changed. A text entry is keyed by its rendered string inside a namespace for (backbone
fingerprint, storage dtype, max text length); an image entry by the bytes of its file inside a
namespace for (backbone fingerprint, storage dtype). Changing the template re-encodes only the
strings whose rendering changed; changing a picture re-encodes only that picture.

    <store>/cache/<fingerprint>/<dtype>/
        backbone.json                     name, fingerprint and widths of the backbone
        text-L<max_length>/shard-<hash>/  keys [n] | global [n, Dt] | tokens [n, L, Dt] | mask [n, L]
        image/shard-<hash>/               keys [n] | global [n, Dg] | patches [n, P, Dp]
        image-blank/                      global [1, Dg] | patches [1, P, Dp]  (the "no image" features)
    <store>/views/<dataset>/<view id>/
        manifest.json                     backbone, template, max length, dtype, tables, checksums
        <table>.text_refs.npy             [N, 2] (shard, row) of each item's text entry
        <table>.image_refs.npy            [N, 2] (shard, row), or (-1, -1) for an item with no image
        <table>.text_global.npy           [N, Dt] text vectors in item order, for dense retrieval
        <table>.view-<name>.global.npy    [N, Dt] a further named text view (pooled; zero where absent)
        <table>.view-<name>.present.npy   [N] bool, False where the item has no such text (no caption...)

Shards are written atomically (a temporary directory renamed into place), so an interrupted
build leaves only whole shards and a re-run skips their keys. All arrays are `.npy` files opened
with `mmap_mode="r"`: a store for a million entities need not fit in RAM. Items without an image
are stored as references to the single blank-image entry, never as copies of it. Tables are
`entities` (KB row order) and `mentions-<split>` (file order); entities use their first image
(models.md §1.1: the image used for KB encoding and evaluation).

Further named text views (`extra_views`, e.g. DIM's `mention` and `caption`) go through the same
text cache; a build keeps the further views and the splits a view already held.

One writer per store at a time; readers may open views while a build runs elsewhere. This module
builds views; reading them is `views.py`, the shards live in `shards.py`, the backbone calls in
`encoding.py` and `shard_encoder.py`, and reclaiming space in `prune.py`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mmel.backbones.base import Backbone
from mmel.core.engine import Engine, LocalEngine, split_into_shards
from mmel.core.errors import DataError, MismatchError, UsageError
from mmel.core.images import ImageReport, read_image_bytes
from mmel.core.paths import atomic_directory, atomic_write_json, read_json
from mmel.core.types import Dataset
from mmel.features.encoding import resolve_image_batch_size
from mmel.features.shard_encoder import (
    IMAGE_FIELDS,
    STORAGE_DTYPES,
    TEXT_FIELDS,
    EncodedShard,
    EncodeShard,
    ShardEncoder,
    image_arrays,
)
from mmel.features.shards import ShardCache, content_key
from mmel.features.templates import get_template, text_view
from mmel.features.views import (
    ENTITY_TABLE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    DatasetFeatures,
    ViewItem,
    dataset_items,
    directory_bytes,
    extra_view_texts_by_table,
    items_checksum,
    open_view,
    texts_checksum,
)

logger = logging.getLogger(__name__)

IMAGES_PER_TEXT_SHARD = 8   # image entries are ~30x larger than text entries: shards hold 1/8 as many
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass
class BuildReport:
    """What one `build_features` call did and how fast.

    `text_seconds` and `image_seconds` are worker time summed over the shards, so the rates are
    those of one worker; `wall_seconds` is the whole build (with N workers, down to about 1/N).
    """

    dataset: str
    view_id: str
    rows: dict[str, int]
    unique_texts: int
    texts_encoded: int
    unique_images: int
    images_encoded: int
    image_report: ImageReport
    text_seconds: float = 0.0
    image_seconds: float = 0.0
    wall_seconds: float = 0.0
    store_bytes: int = 0
    engine: str = "local"
    workers: int = 1

    @property
    def texts_per_second(self) -> float:
        return self.texts_encoded / self.text_seconds if self.text_seconds > 0 else 0.0

    @property
    def images_per_second(self) -> float:
        return self.images_encoded / self.image_seconds if self.image_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "view_id": self.view_id, "rows": self.rows,
                "unique_texts": self.unique_texts, "texts_encoded": self.texts_encoded,
                "unique_images": self.unique_images, "images_encoded": self.images_encoded,
                "image_problems": dict(self.image_report.problems), "text_seconds": round(self.text_seconds, 3),
                "image_seconds": round(self.image_seconds, 3), "wall_seconds": round(self.wall_seconds, 3),
                "texts_per_second": round(self.texts_per_second, 1),
                "images_per_second": round(self.images_per_second, 1), "store_bytes": self.store_bytes,
                "engine": self.engine, "workers": self.workers}

    def summary(self) -> str:
        return (f"{self.dataset}: {sum(self.rows.values())} items in {len(self.rows)} tables; "
                f"texts {self.texts_encoded} encoded / {self.unique_texts} unique "
                f"({self.texts_per_second:.1f} texts/s); images {self.images_encoded} encoded / "
                f"{self.unique_images} usable ({self.images_per_second:.1f} images/s); {self.image_report.summary()}; "
                f"wall {self.wall_seconds:.1f} s on {self.workers} {self.engine} worker(s); "
                f"store {self.store_bytes / 2**20:.1f} MiB")


# --- building -------------------------------------------------------------------------------------

ShardCallback = Callable[[str, int], None]


def build_features(dataset: Dataset, backbone: Backbone, store_dir: Path, *, template: str = "mimic",
                   entity_field: str | None = None, max_text_length: int = 40, dtype: str = "float16",
                   batch_size: int = 64, image_batch_size: int | None = None, num_threads: int | None = None,
                   splits: Sequence[str] | None = None, shard_size: int = 2048, progress: bool = True,
                   on_shard: ShardCallback | None = None, extra_views: Sequence[str] = (),
                   engine: Engine | None = None) -> DatasetFeatures:
    """Encode what the store lacks for `dataset`, write its view, and open it.

    `extra_views` names further text views (`mmel.features.templates.TEXT_VIEWS`) to store as pooled
    vectors, for the tables of their side; views the existing view already holds are kept.

    `engine` runs the encoding: by default this process (`LocalEngine`); a cluster engine's workers
    encode and write disjoint shards in parallel (the dataset and store directories must be the same
    paths on every worker). Either way the same shards are written, and the view that makes them
    visible is written here, once, after the last one. `on_shard(kind, entries)` is called after
    each shard ("text" or "image") is safely on disk. `image_batch_size=None` picks one image per
    call on CPU and `batch_size` on an accelerator. `num_threads` sets torch's threads here and in
    every worker.
    """
    started = time.perf_counter()
    engine = engine or LocalEngine()
    image_batch_size = resolve_image_batch_size(backbone, image_batch_size, batch_size)
    _check_build_options(dataset.name, dtype, batch_size, image_batch_size, shard_size, max_text_length)
    text_template = get_template(template, entity_field)
    view_id = f"{backbone.fingerprint}-{text_template.key}-L{max_text_length}-{dtype}"
    view_dir = Path(store_dir) / "views" / dataset.name / view_id
    split_names = list(dataset.splits) if splits is None else list(splits)
    split_names += [name for name in _splits_in_view(view_dir) if name in dataset.splits and name not in split_names]
    view_names = sorted({text_view(name).name for name in extra_views} | set(_extra_views_in_view(view_dir)))
    if len(dataset.kb) == 0:
        raise DataError(f"dataset {dataset.name!r} has an empty knowledge base: nothing to encode", path=dataset.root)
    tables = dataset_items(dataset, text_template, split_names)
    extras = extra_view_texts_by_table(dataset, view_names, split_names)
    namespace = Path(store_dir) / "cache" / backbone.fingerprint / dtype
    _write_backbone_info(namespace, backbone)
    text_dir, image_dir = namespace / f"text-L{max_text_length}", namespace / "image"
    image_report = ImageReport()
    text_keys = _text_keys(_all_texts(tables, extras))
    path_keys = _hash_image_files(tables, dataset.root, image_report, progress)
    shards = (_missing_text_shards(text_dir, text_keys, shard_size)
              + _missing_image_shards(image_dir, path_keys, max(1, shard_size // IMAGES_PER_TEXT_SHARD), image_report))
    encoder = ShardEncoder(backbone, text_dir, image_dir, dataset.root, max_text_length, dtype, batch_size,
                           image_batch_size, num_threads)
    with _torch_threads(num_threads), torch.inference_mode():
        totals = _encode_shards(engine, encoder, shards, image_report, progress, on_shard)
        blank = _blank_image_entry(namespace, backbone, dtype)
    text_cache, image_cache = ShardCache(text_dir, TEXT_FIELDS), ShardCache(image_dir, IMAGE_FIELDS)
    bad_keys = {path_keys[path] for path in totals.undecodable}
    image_keys: dict[str | None, str | None] = {None: None, **{path: None if key in bad_keys else key
                                                                for path, key in path_keys.items()}}
    manifest = {
        "format_version": FORMAT_VERSION, "dataset": dataset.name, "view_id": view_id,
        "backbone": _backbone_info(backbone), "template": text_template.to_dict(),
        "max_text_length": max_text_length, "dtype": dtype, "extra_views": view_names,
        "cache": str(namespace.relative_to(Path(store_dir))),
        "text_shards": text_cache.shard_names, "image_shards": image_cache.shard_names,
        "image_problems": dict(image_report.problems), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tables": {name: {"rows": len(items), "checksum": items_checksum(items),
                          "with_image": sum(image_keys.get(item.image) is not None for item in items),
                          "extra_checksums": {view: texts_checksum(texts) for view, texts in extras[name].items()}}
                   for name, items in tables.items()},
    }
    _write_view(view_dir, manifest, tables, extras, text_cache, text_keys, image_cache, image_keys)
    features = open_view(Path(store_dir), view_dir, text_cache=text_cache, image_cache=image_cache, blank=blank)
    features.report = BuildReport(
        dataset=dataset.name, view_id=view_id, rows={name: len(items) for name, items in tables.items()},
        unique_texts=len(text_keys), texts_encoded=totals.entries["text"],
        unique_images=len({key for key in path_keys.values() if key is not None} - bad_keys),
        images_encoded=totals.entries["image"], image_report=image_report, text_seconds=totals.seconds["text"],
        image_seconds=totals.seconds["image"], wall_seconds=time.perf_counter() - started,
        store_bytes=directory_bytes(Path(store_dir)), engine=engine.name, workers=engine.num_workers)
    logger.info("%s", features.report.summary())
    return features


@dataclass
class _ShardTotals:
    """What the workers did, summed over shards: entries written and worker seconds, by kind."""

    entries: dict[str, int] = field(default_factory=lambda: {"text": 0, "image": 0})
    seconds: dict[str, float] = field(default_factory=lambda: {"text": 0.0, "image": 0.0})
    undecodable: list[str] = field(default_factory=list)


def _encode_shards(engine: Engine, encoder: ShardEncoder, shards: list[EncodeShard], image_report: ImageReport,
                   progress: bool, on_shard: ShardCallback | None) -> _ShardTotals:
    """Run `encoder` over `shards` on `engine`; tally each shard as its worker reports it written."""
    totals = _ShardTotals()
    bars = {kind: tqdm(total=sum(len(shard.items) for shard in shards if shard.kind == kind), desc=f"{kind}s",
                       unit=kind, disable=not progress or not any(shard.kind == kind for shard in shards))
            for kind in ("text", "image")}
    try:
        for position, done in engine.map_shards(encoder, shards):
            _tally(totals, done, image_report)
            bars[done.kind].update(len(shards[position].items))
            if on_shard is not None and done.entries:
                on_shard(done.kind, done.entries)
    finally:
        for bar in bars.values():
            bar.close()
    return totals


def _tally(totals: _ShardTotals, done: EncodedShard, image_report: ImageReport) -> None:
    totals.entries[done.kind] += done.entries
    totals.seconds[done.kind] += done.seconds
    totals.undecodable.extend(done.undecodable)
    image_report.merge(done.image_report)


def _splits_in_view(view_dir: Path) -> list[str]:
    """Splits an existing view holds: a build for other splits (or none) keeps them, from the cache."""
    manifest_path = view_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        return []
    tables = read_json(manifest_path).get("tables", {})
    return [name.removeprefix("mentions-") for name in tables if name != ENTITY_TABLE]


def _extra_views_in_view(view_dir: Path) -> list[str]:
    manifest_path = view_dir / MANIFEST_FILE
    return list(read_json(manifest_path).get("extra_views", [])) if manifest_path.is_file() else []


def _all_texts(tables: dict[str, list[ViewItem]], extras: dict[str, dict[str, list[str | None]]]) -> list[str]:
    """Every text the view needs encoded: primary texts, then the present texts of further views."""
    texts = [item.text for items in tables.values() for item in items]
    return texts + [text for views in extras.values() for column in views.values() for text in column if text]


def _check_build_options(dataset_name: str, dtype: str, batch_size: int, image_batch_size: int, shard_size: int,
                         max_text_length: int) -> None:
    if not _SAFE_NAME.match(dataset_name):
        raise UsageError(f"dataset name {dataset_name!r} cannot name a store directory; use letters, digits, . _ + -")
    if dtype not in STORAGE_DTYPES:
        raise UsageError(f"unknown storage dtype {dtype!r}; use one of {', '.join(STORAGE_DTYPES)}")
    for name, value in (("batch_size", batch_size), ("image_batch_size", image_batch_size),
                        ("shard_size", shard_size), ("max_text_length", max_text_length)):
        if value < 1:
            raise UsageError(f"{name} must be positive, got {value}")


def _text_keys(all_texts: Sequence[str]) -> dict[str, str]:
    """Distinct text -> its content key, in first-seen order."""
    return {text: content_key(text.encode("utf-8")) for text in dict.fromkeys(all_texts)}


def _missing_text_shards(directory: Path, keys: dict[str, str], shard_size: int) -> list[EncodeShard]:
    """The texts the cache lacks, in order, cut into shards of `shard_size`."""
    refs = ShardCache(directory, TEXT_FIELDS).lookup(list(keys.values()))
    missing = [text for text, ref in zip(keys, refs, strict=True) if ref[0] < 0]
    return [EncodeShard("text", [keys[text] for text in chunk], list(chunk))
            for chunk in split_into_shards(missing, shard_size)]


def _missing_image_shards(directory: Path, path_keys: dict[str, str | None], shard_size: int,
                          report: ImageReport) -> list[EncodeShard]:
    """The distinct image contents the cache lacks (one path each), cut into shards; cached ones count as loaded."""
    first_path: dict[str, str] = {}
    for path, key in path_keys.items():
        if key is not None:
            first_path.setdefault(key, path)
    refs = ShardCache(directory, IMAGE_FIELDS).lookup(list(first_path))
    missing = [path for path, ref in zip(first_path.values(), refs, strict=True) if ref[0] < 0]
    report.loaded += len(first_path) - len(missing)
    return [EncodeShard("image", [path_keys[path] or "" for path in chunk], list(chunk))
            for chunk in split_into_shards(missing, shard_size)]


def _hash_image_files(tables: dict[str, list[ViewItem]], root: Path, report: ImageReport,
                      progress: bool) -> dict[str, str | None]:
    """Distinct image path -> content key of its bytes, or None (missing/unreadable, counted in `report`).

    Files are hashed here (cheap) and decoded by the workers only when their content is not cached yet.
    """
    paths = list(dict.fromkeys(item.image for items in tables.values() for item in items if item.image))
    keys: dict[str, str | None] = {}
    for path in tqdm(paths, desc="hashing images", unit="image", disable=not progress or not paths):
        data = read_image_bytes(root, path, report)
        keys[path] = None if data is None else content_key(data)
    return keys


def _blank_image_entry(namespace: Path, backbone: Backbone, dtype: str) -> dict[str, np.ndarray]:
    directory = namespace / "image-blank"
    if not directory.is_dir():
        with atomic_directory(directory) as tmp:
            for name, array in image_arrays(backbone.encode_blank_images(1), dtype).items():
                np.save(tmp / f"{name}.npy", array)
    return {name: np.load(directory / f"{name}.npy") for name in IMAGE_FIELDS}


def _backbone_info(backbone: Backbone) -> dict[str, Any]:
    """The backbone block of a view; `text_layer` is set for lower-layer token states (`LowerTextLayers`)."""
    return {"name": backbone.name, "fingerprint": backbone.fingerprint, "text_dim": backbone.text_dim,
            "image_global_dim": backbone.image_global_dim, "image_patch_dim": backbone.image_patch_dim,
            "num_patches": backbone.num_patches, "image_size": backbone.image_size,
            "text_layer": getattr(backbone, "text_layer", None)}


def _write_backbone_info(namespace: Path, backbone: Backbone) -> None:
    path = namespace / "backbone.json"
    if not path.is_file():
        atomic_write_json(path, _backbone_info(backbone))


def _write_view(view_dir: Path, manifest: dict[str, Any], tables: dict[str, list[ViewItem]],
                extras: dict[str, dict[str, list[str | None]]], text_cache: ShardCache, text_keys: dict[str, str],
                image_cache: ShardCache, image_keys: dict[str | None, str | None]) -> None:
    with atomic_directory(view_dir) as tmp:
        for name, items in tables.items():
            text_refs = _text_refs(text_cache, [text_keys[item.text] for item in items])      # [N, 2]
            image_refs = image_cache.lookup([image_keys.get(item.image) or "" for item in items])  # [N, 2]
            np.save(tmp / f"{name}.text_refs.npy", text_refs)
            np.save(tmp / f"{name}.image_refs.npy", image_refs)
            np.save(tmp / f"{name}.text_global.npy", _gather_globals(text_cache, text_refs))
            for view, texts in extras[name].items():
                present = np.array([text is not None for text in texts], dtype=bool)         # [N]
                vectors = _gather_globals(text_cache, np.full((len(texts), 2), -1, dtype=np.int32))
                refs = _text_refs(text_cache, [text_keys[text] for text in texts if text is not None])
                vectors[present] = _gather_globals(text_cache, refs)
                np.save(tmp / f"{name}.view-{view}.global.npy", vectors)
                np.save(tmp / f"{name}.view-{view}.present.npy", present)
        atomic_write_json(tmp / MANIFEST_FILE, manifest)


def _text_refs(text_cache: ShardCache, keys: list[str]) -> np.ndarray:
    refs = text_cache.lookup(keys)                                                         # [N, 2]
    if (refs[:, 0] < 0).any():
        raise MismatchError(f"{text_cache.directory}: text entries vanished during the build; rebuild")
    return refs


def _gather_globals(text_cache: ShardCache, refs: np.ndarray) -> np.ndarray:
    """[N, Dt] global vectors at `refs` in the storage dtype; zero rows where a ref is (-1, -1)."""
    first = text_cache.arrays(text_cache.shard_names[0])["global"]
    vectors = np.zeros((len(refs), first.shape[1]), dtype=first.dtype)
    text_cache.gather(text_cache.shard_names, refs, "global", vectors)
    return vectors


@contextlib.contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if num_threads is not None:
        if num_threads < 1:
            raise UsageError(f"num_threads must be positive, got {num_threads}")
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


__all__ = ["BuildReport", "build_features"]
