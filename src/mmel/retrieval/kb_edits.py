"""Changing an index's KB in place: add, update and remove entities, compact the cache (the Linker's edits).

Order on disk for an add: cache segment, metadata, vectors, BM25, manifest. New cache rows go into
a new segment, vectors into FAISS, metadata into SQLite, and the entities are linkable as soon as
the call returns. Linking and changes are serialised by the Linker's lock.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mmel.backbones.base import Backbone
from mmel.core.errors import DataError, NotFoundError
from mmel.core.images import ImageReport
from mmel.core.types import Entity, KnowledgeBase
from mmel.lexical.bm25 import BM25Index
from mmel.models.base import MelModel
from mmel.retrieval.entity_cache import CompactionReport, EntityCacheStore
from mmel.retrieval.index import VectorIndex
from mmel.retrieval.index_build import (
    BM25_DIR,
    VECTORS_DIR,
    ModelSpec,
    encode_cache_and_vectors,
    encode_entity_batches,
    record_change,
    write_manifest,
)
from mmel.retrieval.kb_store import EntityStore

logger = logging.getLogger(__name__)


@dataclass
class ChangeReport:
    """What `add_entities` / `remove_entities` changed."""

    added: int = 0
    updated: int = 0
    removed: int = 0
    image_report: ImageReport = field(default_factory=ImageReport)

    def summary(self) -> str:
        return (f"{self.added} added, {self.updated} updated, {self.removed} removed; "
                f"{self.image_report.summary()}")



class KBEdits:
    """The KB-changing half of `Linker` (a mixin over the index parts the Linker opens)."""

    directory: Path
    manifest: dict[str, Any]
    model: MelModel
    backbone: Backbone
    spec: ModelSpec
    _vectors: VectorIndex
    _store: EntityStore
    _cache: EntityCacheStore
    _bm25: BM25Index | None
    _lock: threading.RLock

    def add_entities(self, entities: Sequence[Entity], images_root: Path | str, *, batch_size: int = 64,
                     progress: bool = False) -> ChangeReport:
        """Add new entities and replace existing ones (same QID); linkable when this returns, saved on disk.

        Order on disk: cache segment, metadata, vectors, BM25, manifest. A crash in between leaves
        rows that nothing links to yet; re-running the same add completes it.
        """
        entities = list(entities)
        _check_new_entities(entities)
        images_root = Path(images_root).resolve()
        report = ChangeReport()
        with self._lock, torch.inference_mode():
            vectors, caches = [], []
            batches = encode_entity_batches(self.backbone, entities, images_root, self.spec, batch_size,
                                            report.image_report)
            for batch in tqdm(batches, desc="encoding entities", unit="batch", disable=not progress):
                cache, batch_vectors = encode_cache_and_vectors(self.model, batch, self.manifest.get("vectors",
                                                                                                   "backbone"))
                caches.append(cache)
                vectors.append(batch_vectors)
            qids = [entity.qid for entity in entities]
            self._cache.write_segment(qids, caches, metadata={"images_root": str(images_root)})
            upserted = self._store.upsert(entities)
            self._upsert_vectors(qids, np.concatenate(vectors))
            self._refresh_bm25()
            report.added, report.updated = len(upserted.added), len(upserted.updated)
            record_change(self.manifest, added=report.added, updated=report.updated, removed=0)
            write_manifest(self.directory, self.manifest)
        return report

    def remove_entities(self, qids: Iterable[str]) -> ChangeReport:
        """Delete entities; unknown QIDs raise KeyError and nothing is removed."""
        qids = list(dict.fromkeys(qids))
        with self._lock:
            unknown = [qid for qid in qids if qid not in self._vectors]
            if unknown:
                raise NotFoundError(f"{len(unknown)} QID(s) are not in the index, e.g. {unknown[:5]}; nothing removed")
            self._vectors.remove(qids)
            self._vectors.save(self.directory / VECTORS_DIR)
            self._store.delete(qids)
            self._cache.forget(qids)
            self._refresh_bm25()
            record_change(self.manifest, added=0, updated=0, removed=len(qids))
            write_manifest(self.directory, self.manifest)
        return ChangeReport(removed=len(qids))

    def compact(self) -> CompactionReport:
        """Reclaim the disk space of removed and replaced entities' cache rows (see `EntityCacheStore.compact`)."""
        with self._lock:
            return self._cache.compact()

    def _upsert_vectors(self, qids: list[str], vectors: np.ndarray) -> None:
        present = np.array([qid in self._vectors for qid in qids], dtype=bool)
        if present.any():
            self._vectors.update([q for q, p in zip(qids, present, strict=True) if p], vectors[present])
        if (~present).any():
            self._vectors.add(vectors[~present], [q for q, p in zip(qids, present, strict=True) if not p])
        self._vectors.save(self.directory / VECTORS_DIR)

    def _refresh_bm25(self) -> None:
        """BM25 has no incremental update: rebuild it from the stored entities (seconds per 100K names)."""
        if self._bm25 is None:
            return
        self._bm25 = BM25Index.build(KnowledgeBase(self._store), self._bm25.settings.fields)
        self._bm25.save(self.directory / BM25_DIR)

    def _warn_if_interrupted(self) -> None:
        stored = self._store.count()
        if stored != len(self._vectors):
            logger.warning("%s: %d entities in the metadata store but %d linkable; an add or remove was "
                           "interrupted: run it again", self.directory, stored, len(self._vectors))


def _check_new_entities(entities: list[Entity]) -> None:
    if not entities:
        raise DataError("no entities to add")
    qids = [entity.qid for entity in entities]
    bad = [qid for qid in qids if not isinstance(qid, str) or not qid]
    if bad:
        raise DataError(f"entity QIDs must be non-empty strings, got {bad[:5]}")
    duplicates = sorted(qid for qid, count in Counter(qids).items() if count > 1)
    if duplicates:
        raise DataError(f"duplicate QIDs among the entities to add: {duplicates[:5]}")



__all__ = ["ChangeReport", "KBEdits"]
