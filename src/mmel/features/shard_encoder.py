"""The feature store's unit of work: encode one shard of texts or images and write it into the cache.

`build_features` decides what the cache lacks and cuts it into shards; an engine
(`mmel.core.engine`) runs a `ShardEncoder` worker over them, in this process or on Ray workers.
Each worker writes its shards itself, as the cache's own content-addressed shard directories
(atomically, `shards.ShardCache.write_shard`), and reports what it wrote; the view that makes
them visible to readers is written once, by the caller, after every shard is done. A worker
killed mid-shard leaves only a temporary directory (removed by the next write of that shard);
the finished shards are cache hits for the rerun.

A worker decodes its own images (from the dataset directory, which must be the same path on
every worker), decoding the next few while the backbone encodes the current ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from mmel.backbones.base import Backbone, ImageFeatures, TextFeatures
from mmel.core.crashpoints import crash_point
from mmel.core.images import ImageReport, decode_image_bytes, read_image_bytes
from mmel.features.encoding import encode_image_batches, encode_text_batches
from mmel.features.shards import ShardCache

TEXT_FIELDS = ("global", "tokens", "mask")
IMAGE_FIELDS = ("global", "patches")
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}
DECODE_AHEAD_IMAGES = 16   # images decoded in a background thread ahead of the encoder (at least a batch)

ShardKind = Literal["text", "image"]


@dataclass(frozen=True)
class EncodeShard:
    """One shard to encode: content keys and, at the same positions, texts or image paths (dataset-relative)."""

    kind: ShardKind
    keys: list[str]
    items: list[str]


@dataclass
class EncodedShard:
    """What a worker did with one shard."""

    kind: ShardKind
    entries: int                       # entries written (images that do not decode are left out)
    seconds: float                     # the worker's time on this shard: decoding, encoding, writing
    undecodable: list[str] = field(default_factory=list)   # image paths that could not be decoded
    image_report: ImageReport = field(default_factory=ImageReport)


@dataclass(frozen=True)
class ShardEncoder:
    """Worker factory for `Engine.map_shards`: a worker that encodes `EncodeShard`s into the caches.

    Picklable (the backbone travels with it), so a cluster engine can build one worker per process.
    """

    backbone: Backbone
    text_dir: Path            # <namespace>/text-L<max_text_length>
    image_dir: Path           # <namespace>/image
    images_root: Path         # the dataset directory image paths are relative to
    max_text_length: int
    dtype: str                # a key of STORAGE_DTYPES
    batch_size: int
    image_batch_size: int
    num_threads: int | None = None   # torch threads in the worker; None keeps the process's setting

    def __call__(self) -> Callable[[EncodeShard], EncodedShard]:
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        text_cache = ShardCache(self.text_dir, TEXT_FIELDS)
        image_cache = ShardCache(self.image_dir, IMAGE_FIELDS)

        def encode(shard: EncodeShard) -> EncodedShard:
            started = time.perf_counter()
            with torch.inference_mode():
                if shard.kind == "text":
                    result = self._encode_texts(text_cache, shard)
                else:
                    result = self._encode_images(image_cache, shard)
            result.seconds = time.perf_counter() - started
            return result

        return encode

    def _encode_texts(self, cache: ShardCache, shard: EncodeShard) -> EncodedShard:
        batches = (text_arrays(features, self.dtype)
                   for features in encode_text_batches(self.backbone, shard.items, self.max_text_length,
                                                       self.batch_size))
        _write_shard(cache, shard.keys, batches, "text")
        return EncodedShard("text", len(shard.keys), 0.0)

    def _encode_images(self, cache: ShardCache, shard: EncodeShard) -> EncodedShard:
        report = ImageReport()
        key_of = dict(zip(shard.items, shard.keys, strict=True))
        group_size = max(DECODE_AHEAD_IMAGES, self.image_batch_size)
        groups = [shard.items[start:start + group_size] for start in range(0, len(shard.items), group_size)]
        decoded: dict[str, Image.Image] = {}
        arrays: list[dict[str, np.ndarray]] = []
        with ThreadPoolExecutor(max_workers=1) as decoder:
            for paths, images in _prefetched(groups, lambda paths: self._decode(paths, report), decoder):
                usable = [(path, image) for path, image in zip(paths, images, strict=True) if image is not None]
                decoded.update(usable)
                arrays.extend(image_arrays(features, self.dtype)
                              for features in encode_image_batches(self.backbone, [image for _, image in usable],
                                                                   self.image_batch_size))
        undecodable = [path for path in shard.items if path not in decoded]
        if decoded:
            _write_shard(cache, [key_of[path] for path in decoded], iter(arrays), "image")
        return EncodedShard("image", len(decoded), 0.0, undecodable=undecodable, image_report=report)

    def _decode(self, paths: list[str], report: ImageReport) -> list[Image.Image | None]:
        """Decode `paths` (in the prefetch thread, while the previous group is encoded)."""
        images = []
        for path in paths:
            data = read_image_bytes(self.images_root, path, report)
            images.append(None if data is None else decode_image_bytes(data, path, report))
        return images


def text_arrays(features: TextFeatures, dtype: str) -> dict[str, np.ndarray]:
    storage = STORAGE_DTYPES[dtype]
    return {"global": features.global_.float().cpu().numpy().astype(storage),   # [b, Dt]
            "tokens": features.tokens.float().cpu().numpy().astype(storage),    # [b, L, Dt]
            "mask": features.mask.cpu().numpy()}                                 # [b, L]


def image_arrays(features: ImageFeatures, dtype: str) -> dict[str, np.ndarray]:
    storage = STORAGE_DTYPES[dtype]
    return {"global": features.global_.float().cpu().numpy().astype(storage),   # [b, Dg]
            "patches": features.patches.float().cpu().numpy().astype(storage)}  # [b, P, Dp]


def _write_shard(cache: ShardCache, keys: list[str], batches: Iterator[dict[str, np.ndarray]], kind: str) -> None:
    parts: dict[str, list[np.ndarray]] = {name: [] for name in cache.fields}
    for arrays in batches:
        for name in cache.fields:
            parts[name].append(arrays[name])
    cache.write_shard(keys, {name: np.concatenate(chunks) for name, chunks in parts.items()})
    crash_point(f"features.{kind}_shard_written")


def _prefetched(groups: list[list[str]], load: Callable[[list[str]], list[Image.Image | None]],
                executor: ThreadPoolExecutor) -> Iterator[tuple[list[str], list[Image.Image | None]]]:
    """Yield (group, load(group)) in order, loading the next group while the caller works on this one."""
    pending: tuple[list[str], Future[list[Image.Image | None]]] | None = None
    for group in groups:
        future = executor.submit(load, group)
        if pending is not None:
            yield pending[0], pending[1].result()
        pending = (group, future)
    if pending is not None:
        yield pending[0], pending[1].result()


__all__ = ["IMAGE_FIELDS", "STORAGE_DTYPES", "TEXT_FIELDS", "EncodeShard", "EncodedShard", "ShardEncoder",
           "image_arrays", "text_arrays"]
