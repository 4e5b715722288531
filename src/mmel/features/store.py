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

One writer per store at a time; readers may open views while a build runs elsewhere. The shards
live in `shards.py`, the backbone calls in `encoding.py`, and reclaiming space in `prune.py`.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from mmel.core.features import FeatureBatch, PooledView
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
from mmel.features.templates import TextTemplate, get_template, text_view

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
ENTITY_TABLE = "entities"
MANIFEST_FILE = "manifest.json"
IMAGES_PER_TEXT_SHARD = 8   # image entries are ~30x larger than text entries: shards hold 1/8 as many
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


# --- reading ------------------------------------------------------------------------------------

class StoredFeatureTable:
    """A FeatureTable over one view table: references into memory-mapped shards."""

    def __init__(self, name: str, view_dir: Path, text_cache: ShardCache, image_cache: ShardCache,
                 text_shards: list[str], image_shards: list[str], blank: dict[str, np.ndarray],
                 extra_views: Sequence[str] = ()):
        self.name = name
        self._extra = {view: (np.load(view_dir / f"{name}.view-{view}.global.npy", mmap_mode="r"),     # [N, Dt]
                              np.load(view_dir / f"{name}.view-{view}.present.npy", mmap_mode="r"))    # [N]
                       for view in extra_views}
        self.text_refs = np.load(view_dir / f"{name}.text_refs.npy", mmap_mode="r")    # [N, 2]
        self.image_refs = np.load(view_dir / f"{name}.image_refs.npy", mmap_mode="r")  # [N, 2]
        self._text_global = np.load(view_dir / f"{name}.text_global.npy", mmap_mode="r")  # [N, Dt]
        self._text_cache = text_cache
        self._image_cache = image_cache
        self._text_shards = text_shards
        self._image_shards = image_shards
        self._blank = blank

    def __len__(self) -> int:
        return len(self.text_refs)

    @property
    def has_image(self) -> np.ndarray:
        """[N] bool: which items have a real image."""
        return np.asarray(self.image_refs[:, 0] >= 0)

    def text_global_matrix(self) -> np.ndarray:
        """[N, Dt] global text vectors in item order, memory-mapped in the storage dtype."""
        return self._text_global

    def gather(self, rows: Sequence[int] | np.ndarray) -> FeatureBatch:
        """Float32 CPU features of the items at `rows`."""
        index = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(index) and (index.min() < -len(self) or index.max() >= len(self)):
            raise IndexError(f"rows out of range for table {self.name!r} of {len(self)} items "
                             f"(got min {index.min()}, max {index.max()})")
        text_refs = np.asarray(self.text_refs[index])
        image_refs = np.asarray(self.image_refs[index])
        count = len(index)
        first_shard = self._text_cache.arrays(self._text_shards[0])
        tokens = np.empty((count, *first_shard["tokens"].shape[1:]), dtype=np.float32)    # [B, L, Dt]
        mask = np.empty((count, *first_shard["mask"].shape[1:]), dtype=bool)              # [B, L]
        self._text_cache.gather(self._text_shards, text_refs, "tokens", tokens)
        self._text_cache.gather(self._text_shards, text_refs, "mask", mask)
        image_global = np.repeat(self._blank["global"].astype(np.float32), count, axis=0)    # [B, Dg]
        image_patches = np.repeat(self._blank["patches"].astype(np.float32), count, axis=0)  # [B, P, Dp]
        self._image_cache.gather(self._image_shards, image_refs, "global", image_global)
        self._image_cache.gather(self._image_shards, image_refs, "patches", image_patches)
        return FeatureBatch(
            text_global=torch.from_numpy(np.asarray(self._text_global[index], dtype=np.float32)),
            text_tokens=torch.from_numpy(tokens), text_mask=torch.from_numpy(mask),
            image_global=torch.from_numpy(image_global), image_patches=torch.from_numpy(image_patches),
            has_image=torch.from_numpy(image_refs[:, 0] >= 0),
            views={view: PooledView(torch.from_numpy(np.asarray(vectors[index], dtype=np.float32)),
                                    torch.from_numpy(np.asarray(present[index], dtype=bool)))
                   for view, (vectors, present) in self._extra.items()})

    @property
    def extra_views(self) -> list[str]:
        """The further named text views this table holds."""
        return list(self._extra)


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


@dataclass
class DatasetFeatures:
    """The features of one dataset under one (backbone, template, max length, dtype) view."""

    view_dir: Path
    manifest: dict[str, Any]
    entities: StoredFeatureTable
    mentions: dict[str, StoredFeatureTable]
    report: BuildReport | None = field(default=None, compare=False)

    @property
    def view_id(self) -> str:
        return self.view_dir.name

    @property
    def backbone_fingerprint(self) -> str:
        return self.manifest["backbone"]["fingerprint"]

    @property
    def max_text_length(self) -> int:
        return self.manifest["max_text_length"]

    @property
    def template(self) -> TextTemplate:
        spec = self.manifest["template"]
        return TextTemplate(spec["name"], spec["mention_format"], spec["entity_format"], spec["entity_field"])

    def check_dataset(self, dataset: Dataset) -> None:
        """Raise MismatchError unless `dataset` has the items (texts, image paths, order) these features describe."""
        expected = self.manifest["tables"]
        extras = _extra_view_tables(dataset, self.extra_views, list(self.mentions))
        for table, items in _dataset_tables(dataset, self.template, list(self.mentions)).items():
            checksums = {view: _texts_checksum(texts) for view, texts in extras[table].items()}
            if (_table_checksum(items) != expected[table]["checksum"]
                    or checksums != expected[table].get("extra_checksums", {})):
                raise MismatchError(f"{self.view_dir}: table {table!r} was built from different items than dataset "
                                    f"{dataset.name!r} has now; rebuild with `mmel features build`")

    @property
    def extra_views(self) -> list[str]:
        """The further named text views of this view (e.g. DIM's `mention`, `caption`)."""
        return list(self.manifest.get("extra_views", []))


# --- building -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Item:
    text: str
    image: str | None   # path relative to the dataset root


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
    tables = _dataset_tables(dataset, text_template, split_names)
    extras = _extra_view_tables(dataset, view_names, split_names)
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
        "tables": {name: {"rows": len(items), "checksum": _table_checksum(items),
                          "with_image": sum(image_keys.get(item.image) is not None for item in items),
                          "extra_checksums": {view: _texts_checksum(texts) for view, texts in extras[name].items()}}
                   for name, items in tables.items()},
    }
    _write_view(view_dir, manifest, tables, extras, text_cache, text_keys, image_cache, image_keys)
    features = _open_view(Path(store_dir), view_dir, text_cache=text_cache, image_cache=image_cache, blank=blank)
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


def _extra_view_tables(dataset: Dataset, view_names: Sequence[str],
                       splits: Sequence[str]) -> dict[str, dict[str, list[str | None]]]:
    """table -> further view -> each item's text in it (None where absent), for the views of the table's side."""
    views = [text_view(name) for name in view_names]
    tables = {ENTITY_TABLE: {v.name: [v.render(e) for e in dataset.kb] for v in views if v.side == "entity"}}
    for split in splits:
        mentions = dataset.split(split)
        tables[f"mentions-{split}"] = {v.name: [v.render(m) for m in mentions] for v in views if v.side == "mention"}
    return tables


def _all_texts(tables: dict[str, list[_Item]], extras: dict[str, dict[str, list[str | None]]]) -> list[str]:
    """Every text the view needs encoded: primary texts, then the present texts of further views."""
    texts = [item.text for items in tables.values() for item in items]
    return texts + [text for views in extras.values() for column in views.values() for text in column if text]


def _texts_checksum(texts: Sequence[str | None]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(b"\x02" if text is None else text.encode("utf-8") + b"\x01")
    return digest.hexdigest()


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


def _dataset_tables(dataset: Dataset, template: TextTemplate, splits: Sequence[str]) -> dict[str, list[_Item]]:
    tables = {ENTITY_TABLE: [_Item(template.entity_text(e), e.images[0] if e.images else None) for e in dataset.kb]}
    for split in splits:
        tables[f"mentions-{split}"] = [_Item(template.mention_text(m), m.image) for m in dataset.split(split)]
    return tables


def _table_checksum(items: Sequence[_Item]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.text.encode("utf-8") + b"\x00" + (item.image or "").encode("utf-8") + b"\x01")
    return digest.hexdigest()


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


def _hash_image_files(tables: dict[str, list[_Item]], root: Path, report: ImageReport,
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
    return {"name": backbone.name, "fingerprint": backbone.fingerprint, "text_dim": backbone.text_dim,
            "image_global_dim": backbone.image_global_dim, "image_patch_dim": backbone.image_patch_dim,
            "num_patches": backbone.num_patches, "image_size": backbone.image_size}


def _write_backbone_info(namespace: Path, backbone: Backbone) -> None:
    path = namespace / "backbone.json"
    if not path.is_file():
        atomic_write_json(path, _backbone_info(backbone))


def _write_view(view_dir: Path, manifest: dict[str, Any], tables: dict[str, list[_Item]],
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


# --- opening and describing ---------------------------------------------------------------------

def open_features(store_dir: Path, dataset_name: str, *, view_id: str | None = None,
                  backbone_fingerprint: str | None = None) -> DatasetFeatures:
    """Open a dataset's features; with several views, pick one by `view_id` or `backbone_fingerprint`."""
    dataset_dir = Path(store_dir) / "views" / dataset_name
    views = sorted(p.name for p in dataset_dir.iterdir() if (p / MANIFEST_FILE).is_file()) \
        if dataset_dir.is_dir() else []
    if view_id is not None:
        views = [v for v in views if v == view_id]
    if backbone_fingerprint is not None:
        views = [v for v in views if v.startswith(backbone_fingerprint + "-")]
    if len(views) != 1:
        available = ", ".join(list_views(store_dir).get(dataset_name, [])) or "none"
        problem = "no" if not views else "more than one"
        raise MismatchError(f"{store_dir}: {problem} feature view matches dataset {dataset_name!r} "
                            f"(view_id={view_id!r}, backbone_fingerprint={backbone_fingerprint!r}); "
                            f"available: {available}. Build one with `mmel features build`")
    return _open_view(Path(store_dir), dataset_dir / views[0])


def list_views(store_dir: Path) -> dict[str, list[str]]:
    """dataset name -> view ids present in the store."""
    views_dir = Path(store_dir) / "views"
    if not views_dir.is_dir():
        return {}
    return {d.name: sorted(v.name for v in d.iterdir() if (v / MANIFEST_FILE).is_file())
            for d in sorted(views_dir.iterdir()) if d.is_dir() and not d.name.startswith(".")}


def _open_view(store_dir: Path, view_dir: Path, *, text_cache: ShardCache | None = None,
               image_cache: ShardCache | None = None, blank: dict[str, np.ndarray] | None = None) -> DatasetFeatures:
    manifest = read_json(view_dir / MANIFEST_FILE)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise MismatchError(f"{view_dir}: feature view format {manifest.get('format_version')!r} is not "
                            f"{FORMAT_VERSION}; rebuild with `mmel features build`")
    namespace = store_dir / manifest["cache"]
    text_cache = text_cache or ShardCache(namespace / f"text-L{manifest['max_text_length']}", TEXT_FIELDS)
    image_cache = image_cache or ShardCache(namespace / "image", IMAGE_FIELDS)
    if blank is None:
        blank_dir = namespace / "image-blank"
        if not blank_dir.is_dir():
            raise DataError("blank-image features are missing; rebuild the features", path=blank_dir)
        blank = {name: np.load(blank_dir / f"{name}.npy") for name in IMAGE_FIELDS}
    tables = {name: StoredFeatureTable(name, view_dir, text_cache, image_cache, manifest["text_shards"],
                                       manifest["image_shards"], blank,
                                       list(manifest["tables"][name].get("extra_checksums", {})))
              for name in manifest["tables"]}
    mentions = {name.removeprefix("mentions-"): table for name, table in tables.items() if name != ENTITY_TABLE}
    return DatasetFeatures(view_dir=view_dir, manifest=manifest, entities=tables[ENTITY_TABLE], mentions=mentions)


def directory_bytes(directory: Path) -> int:
    """Total size of the regular files under `directory`."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def describe_store(store_dir: Path) -> dict[str, Any]:
    """A summary of a store: its views (with their manifests' key facts) and its cache namespaces."""
    store_dir = Path(store_dir)
    if not store_dir.is_dir():
        raise DataError("feature store directory not found", path=store_dir)
    views = []
    for dataset_name, view_ids in list_views(store_dir).items():
        for view_id in view_ids:
            manifest = read_json(store_dir / "views" / dataset_name / view_id / MANIFEST_FILE)
            views.append({"dataset": dataset_name, "view_id": view_id, "backbone": manifest["backbone"]["name"],
                          "template": manifest["template"]["name"], "max_text_length": manifest["max_text_length"],
                          "dtype": manifest["dtype"], "created": manifest["created"],
                          "tables": {name: {k: v for k, v in table.items() if k != "checksum"}
                                     for name, table in manifest["tables"].items()}})
    caches = []
    cache_root = store_dir / "cache"
    for namespace in sorted(cache_root.glob("*/*")) if cache_root.is_dir() else []:
        entries = {sub.name: len(ShardCache(sub, ()))
                   for sub in sorted(namespace.iterdir()) if sub.is_dir() and sub.name != "image-blank"}
        caches.append({"namespace": str(namespace.relative_to(store_dir)), "entries": entries,
                       "bytes": directory_bytes(namespace)})
    return {"store": str(store_dir), "views": views, "caches": caches, "total_bytes": directory_bytes(store_dir)}


__all__ = ["BuildReport", "DatasetFeatures", "StoredFeatureTable", "build_features", "describe_store", "list_views",
           "open_features"]
