"""A feature-store view: its on-disk format, what identifies its items, and reading it memory-mapped.

`store.py` builds views (encoding what the cache lacks); this module is everything a reader
needs: the view's tables (`StoredFeatureTable`, a FeatureTable over memory-mapped shards), the
item lists and checksums that say which dataset a view describes, and opening, listing and
describing the views of a store. The layout is in `store.py`'s docstring.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmel.core.errors import DataError, MismatchError
from mmel.core.features import FeatureBatch, PooledView
from mmel.core.paths import read_json
from mmel.core.types import Dataset
from mmel.features.shard_encoder import IMAGE_FIELDS, TEXT_FIELDS
from mmel.features.shards import ShardCache
from mmel.features.templates import TextTemplate, text_view

if TYPE_CHECKING:
    from mmel.features.store import BuildReport

FORMAT_VERSION = 1
ENTITY_TABLE = "entities"
MANIFEST_FILE = "manifest.json"


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
        extras = extra_view_texts_by_table(dataset, self.extra_views, list(self.mentions))
        for table, items in dataset_items(dataset, self.template, list(self.mentions)).items():
            checksums = {view: texts_checksum(texts) for view, texts in extras[table].items()}
            if (items_checksum(items) != expected[table]["checksum"]
                    or checksums != expected[table].get("extra_checksums", {})):
                raise MismatchError(f"{self.view_dir}: table {table!r} was built from different items than dataset "
                                    f"{dataset.name!r} has now; rebuild with `mmel features build`")

    @property
    def extra_views(self) -> list[str]:
        """The further named text views of this view (e.g. DIM's `mention`, `caption`)."""
        return list(self.manifest.get("extra_views", []))



# --- what identifies a view's items ------------------------------------------------------------

@dataclass(frozen=True)
class ViewItem:
    text: str
    image: str | None   # path relative to the dataset root


def extra_view_texts_by_table(dataset: Dataset, view_names: Sequence[str],
                       splits: Sequence[str]) -> dict[str, dict[str, list[str | None]]]:
    """table -> further view -> each item's text in it (None where absent), for the views of the table's side."""
    views = [text_view(name) for name in view_names]
    tables = {ENTITY_TABLE: {v.name: [v.render(e) for e in dataset.kb] for v in views if v.side == "entity"}}
    for split in splits:
        mentions = dataset.split(split)
        tables[f"mentions-{split}"] = {v.name: [v.render(m) for m in mentions] for v in views if v.side == "mention"}
    return tables


def texts_checksum(texts: Sequence[str | None]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(b"\x02" if text is None else text.encode("utf-8") + b"\x01")
    return digest.hexdigest()


def dataset_items(dataset: Dataset, template: TextTemplate, splits: Sequence[str]) -> dict[str, list[ViewItem]]:
    tables = {ENTITY_TABLE: [ViewItem(template.entity_text(e), e.images[0] if e.images else None) for e in dataset.kb]}
    for split in splits:
        tables[f"mentions-{split}"] = [ViewItem(template.mention_text(m), m.image) for m in dataset.split(split)]
    return tables


def items_checksum(items: Sequence[ViewItem]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.text.encode("utf-8") + b"\x00" + (item.image or "").encode("utf-8") + b"\x01")
    return digest.hexdigest()


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
    return open_view(Path(store_dir), dataset_dir / views[0])


def list_views(store_dir: Path) -> dict[str, list[str]]:
    """dataset name -> view ids present in the store."""
    views_dir = Path(store_dir) / "views"
    if not views_dir.is_dir():
        return {}
    return {d.name: sorted(v.name for v in d.iterdir() if (v / MANIFEST_FILE).is_file())
            for d in sorted(views_dir.iterdir()) if d.is_dir() and not d.name.startswith(".")}


def open_view(store_dir: Path, view_dir: Path, *, text_cache: ShardCache | None = None,
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


__all__ = ["ENTITY_TABLE", "FORMAT_VERSION", "MANIFEST_FILE", "DatasetFeatures", "StoredFeatureTable", "ViewItem",
           "dataset_items", "describe_store", "directory_bytes", "extra_view_texts_by_table", "items_checksum",
           "list_views", "open_features", "open_view", "texts_checksum"]
