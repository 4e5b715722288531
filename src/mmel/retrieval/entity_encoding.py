"""An index's entity side, shard by shard: features -> the model's cache rows + first-stage vectors.

The KB is cut into shards of consecutive rows. A worker (this process with the default
`LocalEngine`, or a Ray actor with `--engine ray`) loads the model and opens the features once,
then per shard reads the rows' features, runs `MelModel.encode_entities`, writes the cache rows
straight into the segment's files at their row offsets (`SegmentFiles`), and returns only the
shard's first-stage vectors. So the driver never holds the cache (gigabytes at a million
entities), only the [N, D] vectors that FAISS needs anyway, and workers can run side by side.

Features come from one of three sources, each plain data that a worker process can be handed:
an in-memory table (benchmarks, tests), the feature store (opened read-only by each worker), or
the backbone encoding entities on the fly.

Shapes: N entities, n in a shard, D first-stage vector width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mmel.backbones.base import Backbone
from mmel.core.engine import Engine, LocalEngine
from mmel.core.errors import UsageError
from mmel.core.features import FeatureBatch, FeatureTable
from mmel.core.images import ImageReport, load_image
from mmel.core.types import Entity
from mmel.features.encoding import encode_items
from mmel.features.templates import extra_view_texts
from mmel.features.views import open_features
from mmel.models import load_model
from mmel.models.base import MelModel
from mmel.retrieval.entity_cache import SegmentFiles

if TYPE_CHECKING:
    from mmel.retrieval.index_build import ModelSpec

SHARD_ROWS = 8192   # entities per shard: a worker's unit of work, and what a killed worker loses


# --- what one batch of entities becomes ------------------------------------------------------------

def encode_cache_and_vectors(model: MelModel, batch: FeatureBatch,
                             source: str = "backbone") -> tuple[Any, np.ndarray]:
    """The model's entity cache and the first-stage vectors of one feature batch.

    `source` 'backbone': the unit-length global text vectors [B, Dt]; 'model': the model's own
    retrieval vectors [B, D] (`MelModel.retrieval_vectors`).
    """
    cache = model.encode_entities(batch)
    if source == "model":
        return cache, model_retrieval_vectors(model, cache)
    return cache, torch.nn.functional.normalize(batch.text_global.float(), dim=-1).cpu().numpy()   # [B, Dt]


def model_retrieval_vectors(model: MelModel, cache: Any) -> np.ndarray:
    """[N, D] float32 retrieval vectors of an entity cache; a clear error for a model that has none."""
    vectors = model.retrieval_vectors(cache)
    if vectors is None:
        raise UsageError(f"{type(model).__name__} scores pairs with more than one inner product, so an index cannot "
                         "search its scores with FAISS; build it with vectors 'backbone' (the default)")
    return vectors.float().cpu().numpy()


def encode_entity_batches(backbone: Backbone, entities: Sequence[Entity], images_root: Path, spec: ModelSpec,
                          batch_size: int, report: ImageReport) -> Iterator[FeatureBatch]:
    """Features of `entities` (first image each, as at evaluation), `batch_size` at a time, on the fly."""
    for start in range(0, len(entities), batch_size):
        chunk = entities[start:start + batch_size]
        texts = [spec.template.entity_text(entity) for entity in chunk]
        images = [load_image(images_root, entity.images[0], report) if entity.images else None for entity in chunk]
        yield encode_items(backbone, texts, images, max_text_length=spec.max_text_length, batch_size=batch_size,
                           extra_texts=extra_view_texts(spec.views, "entity", chunk))


# --- feature sources (plain data: a worker opens them itself) --------------------------------------

RowsReader = Callable[[range, ImageReport], Iterator[FeatureBatch]]
"""Yields the features of a shard's rows, in order, in batches (filling the report with image problems)."""


@dataclass(frozen=True)
class TableFeatures:
    """Entity features already computed, in KB row order (benchmarks' synthetic KBs, tests)."""

    table: FeatureTable
    batch_size: int

    def open(self) -> RowsReader:
        def read(rows: range, report: ImageReport) -> Iterator[FeatureBatch]:
            for start in range(rows.start, rows.stop, self.batch_size):
                yield self.table.gather(np.arange(start, min(start + self.batch_size, rows.stop)))
        return read


@dataclass(frozen=True)
class StoredFeatures:
    """The entity table of a feature-store view (built beforehand), opened read-only by each worker."""

    store_dir: Path
    dataset_name: str
    view_id: str
    batch_size: int

    def open(self) -> RowsReader:
        table = open_features(self.store_dir, self.dataset_name, view_id=self.view_id).entities
        return TableFeatures(table, self.batch_size).open()


@dataclass(frozen=True)
class EncodedFeatures:
    """Features encoded on the fly by the model's backbone (given here, or loaded by name in each worker)."""

    entities: Sequence[Entity]
    images_root: Path
    spec: ModelSpec
    batch_size: int
    backbone: Backbone | None = field(default=None, compare=False)

    def open(self) -> RowsReader:
        from mmel.retrieval.index_build import load_checked_backbone

        backbone = load_checked_backbone(self.spec, self.backbone)

        def read(rows: range, report: ImageReport) -> Iterator[FeatureBatch]:
            return encode_entity_batches(backbone, self.entities[rows.start:rows.stop], self.images_root, self.spec,
                                         self.batch_size, report)
        return read

    def without_loaded_parts(self) -> EncodedFeatures:
        """A copy that loads its backbone by name in the worker (for an engine that pickles the source)."""
        return replace(self, backbone=None)


FeatureSource = TableFeatures | StoredFeatures | EncodedFeatures


# --- the worker and the driver ---------------------------------------------------------------------

@dataclass
class ShardResult:
    """What a worker sends back for one shard: its vectors [n, D], images seen, image problems."""

    start: int
    vectors: np.ndarray
    with_image: int
    image_report: ImageReport


@dataclass(frozen=True)
class EntityShardEncoder:
    """Builds the worker that encodes shards (a `WorkerFactory`: plain data, picklable without `model`)."""

    checkpoint_dir: Path
    source: FeatureSource
    segment: SegmentFiles
    vectors: str                              # 'backbone' or 'model' (see encode_cache_and_vectors)
    model: MelModel | None = field(default=None, compare=False)   # the driver's, for the local engine

    def __call__(self) -> Callable[[range], ShardResult]:
        model = self.model if self.model is not None else load_model(self.checkpoint_dir)
        read = self.source.open()

        def encode_shard(rows: range) -> ShardResult:
            report = ImageReport()
            parts, with_image, start = [], 0, rows.start
            with torch.inference_mode(), self.segment.writer() as write:
                for batch in read(rows, report):
                    cache, vectors = encode_cache_and_vectors(model, batch, self.vectors)
                    write(start, cache)
                    parts.append(vectors)
                    with_image += int(batch.has_image.sum())
                    start += len(batch)
            if start != rows.stop:
                raise UsageError(f"the features gave {start - rows.start} rows for shard {rows}")
            return ShardResult(rows.start, np.concatenate(parts), with_image, report)

        return encode_shard


def encode_entity_side(encoder: EntityShardEncoder, num_entities: int, *, engine: Engine | None = None,
                       progress: bool = True) -> tuple[np.ndarray, int, ImageReport]:
    """Run `encoder` over every shard of the KB; return the vectors [N, D], the image count, image problems.

    The cache rows land in `encoder.segment`; the caller makes the segment visible afterwards.
    """
    engine = engine or LocalEngine()
    if engine.name != "local":
        encoder = replace(encoder, model=None, source=_portable(encoder.source))
    shards = [range(start, min(start + SHARD_ROWS, num_entities)) for start in range(0, num_entities, SHARD_ROWS)]
    vectors: np.ndarray | None = None
    with_image, report = 0, ImageReport()
    with tqdm(total=num_entities, desc=f"encoding entities ({engine.name})", unit="entity",
              disable=not progress) as bar:
        for _, shard in engine.map_shards(encoder, shards):
            if vectors is None:
                vectors = np.empty((num_entities, shard.vectors.shape[1]), dtype=np.float32)   # [N, D]
            vectors[shard.start:shard.start + len(shard.vectors)] = shard.vectors
            with_image += shard.with_image
            report.merge(shard.image_report)
            bar.update(len(shard.vectors))
    if vectors is None:
        raise UsageError("no entities to encode")
    return vectors, with_image, report


def _portable(source: FeatureSource) -> FeatureSource:
    return source.without_loaded_parts() if isinstance(source, EncodedFeatures) else source


__all__ = ["SHARD_ROWS", "EncodedFeatures", "EntityShardEncoder", "FeatureSource", "ShardResult", "StoredFeatures",
           "TableFeatures", "encode_cache_and_vectors", "encode_entity_batches", "encode_entity_side",
           "model_retrieval_vectors"]
