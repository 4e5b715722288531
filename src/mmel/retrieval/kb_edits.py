"""Changing an index's KB in place: add, update and remove entities, compact the cache (the Linker's edits).

Every edit is journaled (`edit_journal.py`), so a kill at any point is finished or undone by the
next command that opens the index (`recover_interrupted_edit`, run first by `Linker.load`):

    add      encode; stage entities + vectors; journal; cache segment (commit point); entity store;
             vectors; BM25; manifest; clear the journal
    remove   journal (commit point); vectors; entity store; BM25; manifest; clear the journal
    compact  journal; rewrite the cache segments, switching the listing in one write (commit point);
             delete the old segments; clear the journal

Before its commit point an interrupted edit is undone: nothing but staged files and unlisted
segments changed, and they are deleted. After it, recovery redoes the parts that lack the edit's
revision: the entity store records the revision in the edit's own transaction, the vectors in
their metadata, the manifest in its `revision`; BM25 is rebuilt from the store. So recovery is
idempotent and a kill during recovery is recovered the same way. A rerun of the interrupted
command in the process that recovered it returns the journaled report instead of applying the
edit twice ("3 added", not "0 added, 3 updated").

Linking and changes are serialised by the Linker's lock, and edits of one index by several
processes by a lock on the index directory.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mmel.backbones.base import Backbone
from mmel.core.crashpoints import crash_point
from mmel.core.errors import DataError, MismatchError, NotFoundError, UsageError
from mmel.core.images import ImageReport
from mmel.core.paths import read_json, remove_stale_temporaries, restore_interrupted_swap
from mmel.core.types import Entity, KnowledgeBase
from mmel.lexical.bm25 import BM25Index
from mmel.models.base import MelModel
from mmel.retrieval.edit_journal import (
    JOURNAL_FILE,
    STAGED_DIR,
    EditJournal,
    clear_journal,
    index_lock,
    read_staged_entities,
    stage_added_entities,
)
from mmel.retrieval.entity_cache import SEGMENT_NAME, SEGMENTS_FILE, CompactionReport, EntityCacheStore
from mmel.retrieval.entity_encoding import encode_cache_and_vectors, encode_entity_batches
from mmel.retrieval.index import VectorIndex
from mmel.retrieval.index_build import (
    BM25_DIR,
    CACHE_DIR,
    ENTITIES_FILE,
    VECTORS_DIR,
    ModelSpec,
    read_manifest,
    record_change,
    write_manifest,
)
from mmel.retrieval.kb_store import EntityStore, kb_checksum

logger = logging.getLogger(__name__)

REVISION_KEY = "edit_revision"   # vector index metadata: the index revision its vectors belong to


@dataclass
class ChangeReport:
    """What `add_entities` / `remove_entities` changed."""

    added: int = 0
    updated: int = 0
    removed: int = 0
    image_report: ImageReport = field(default_factory=ImageReport)
    recovered: bool = False   # finished by recovery after the command that started it was killed

    def summary(self) -> str:
        note = " (finished after the earlier run of this command was interrupted)" if self.recovered else ""
        return (f"{self.added} added, {self.updated} updated, {self.removed} removed{note}; "
                f"{self.image_report.summary()}")

    def to_journal(self) -> dict[str, Any]:
        images = self.image_report
        return {"added": self.added, "updated": self.updated, "removed": self.removed,
                "images": {"loaded": images.loaded, "problems": dict(images.problems), "examples": images.examples}}

    @classmethod
    def from_journal(cls, saved: dict[str, Any]) -> ChangeReport:
        images = saved.get("images", {})
        image_report = ImageReport(loaded=images.get("loaded", 0), problems=Counter(images.get("problems", {})),
                                   examples=images.get("examples", {}))
        return cls(added=saved["added"], updated=saved["updated"], removed=saved["removed"],
                   image_report=image_report, recovered=True)


@dataclass
class RecoveryReport:
    """What `recover_interrupted_edit` found and did."""

    directory: Path
    operation: str | None = None      # the interrupted edit, None when only leftovers were found
    finished: bool = False            # True: the edit was completed; False: it was undone (or there was none)
    request: str = ""
    report: ChangeReport | CompactionReport | None = None
    restored: list[str] = field(default_factory=list)    # parts put back after a swap was cut short
    removed: list[str] = field(default_factory=list)     # leftovers deleted

    def summary(self) -> str:
        parts = []
        if self.operation is not None:
            done = "finished" if self.finished else "undone (it had not reached its commit point)"
            parts.append(f"an interrupted {self.operation} was {done}")
        if self.restored:
            parts.append(f"restored {', '.join(self.restored)}")
        if self.removed:
            parts.append(f"removed leftovers {', '.join(self.removed)}")
        return f"{self.directory}: " + "; ".join(parts)


@dataclass
class _Parts:
    """The parts of an index directory an edit changes, open: the Linker's own, or recovery's."""

    directory: Path
    manifest: dict[str, Any]
    store: EntityStore
    vectors: VectorIndex
    bm25: BM25Index | None


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
    _recovered: RecoveryReport | None = None   # set by Linker.load
    _segments_seen: list[str]                  # the cache listing as this process last left it

    def add_entities(self, entities: Sequence[Entity], images_root: Path | str, *, batch_size: int = 64,
                     progress: bool = False) -> ChangeReport:
        """Add new entities and replace existing ones (same QID); linkable when this returns, saved on disk.

        Journaled: a kill at any point is finished or undone when the index is next opened.
        """
        entities = list(entities)
        _check_new_entities(entities)
        images_root = Path(images_root).resolve()
        request = _request_digest("add", str(images_root), kb_checksum(entities))
        with self._lock:
            finished = self._finished_by_recovery("add", request)
            if isinstance(finished, ChangeReport):
                return finished
            report = ChangeReport()
            caches, vectors = self._encode(entities, images_root, batch_size, progress, report.image_report)
            qids = [entity.qid for entity in entities]
            with index_lock(self.directory):
                self._check_unchanged_on_disk()
                report.updated = sum(entity is not None for entity in self._store.get_many(qids))
                report.added = len(qids) - report.updated
                journal = EditJournal("add", self._next_revision(), request, qids, report.to_journal(),
                                      _listed_segments(self.directory))
                stage_added_entities(self.directory, entities, vectors)
                crash_point("index_add.staged")
                journal.write(self.directory)
                crash_point("index_add.journaled")
                self._cache.write_segment(qids, caches, metadata={"images_root": str(images_root)})
                crash_point("index_add.cache_written")
                self._segments_seen = _listed_segments(self.directory)
                self._apply(lambda parts: _apply_add(parts, journal, entities, vectors))
                clear_journal(self.directory)
        return report

    def remove_entities(self, qids: Iterable[str]) -> ChangeReport:
        """Delete entities; unknown QIDs raise KeyError and nothing is removed. Journaled like an add."""
        qids = list(dict.fromkeys(qids))
        request = _request_digest("remove", *qids)
        with self._lock:
            finished = self._finished_by_recovery("remove", request)
            if isinstance(finished, ChangeReport):
                return finished
            unknown = [qid for qid in qids if qid not in self._vectors]
            if unknown:
                raise NotFoundError(f"{len(unknown)} QID(s) are not in the index, e.g. {unknown[:5]}; nothing removed")
            report = ChangeReport(removed=len(qids))
            with index_lock(self.directory):
                self._check_unchanged_on_disk()
                journal = EditJournal("remove", self._next_revision(), request, qids, report.to_journal())
                journal.write(self.directory)
                crash_point("index_remove.journaled")
                self._apply(lambda parts: _apply_remove(parts, journal))
                self._cache.forget(qids)
                clear_journal(self.directory)
        return report

    def compact(self) -> CompactionReport:
        """Reclaim the disk space of removed and replaced entities' cache rows (see `EntityCacheStore.compact`)."""
        with self._lock:
            finished = self._finished_by_recovery("compact", _request_digest("compact"))
            if isinstance(finished, CompactionReport):
                return finished
            with index_lock(self.directory):
                self._check_unchanged_on_disk()
                before = {"rows_before": self._cache.stored_rows(), "segments_before": self._cache.num_segments}
                journal = EditJournal("compact", self.manifest.get("revision", 0), _request_digest("compact"), [],
                                      before, _listed_segments(self.directory))
                journal.write(self.directory)
                crash_point("index_compact.journaled")
                report = self._cache.compact()
                self._segments_seen = _listed_segments(self.directory)
                crash_point("index_compact.compacted")
                clear_journal(self.directory)
        return report

    # --- internals --------------------------------------------------------------------------
    def _encode(self, entities: list[Entity], images_root: Path, batch_size: int, progress: bool,
                image_report: ImageReport) -> tuple[list[Any], np.ndarray]:
        """The model's cache of each batch of `entities`, and their first-stage vectors [N, D]."""
        caches, vectors = [], []
        source = self.manifest.get("vectors", "backbone")
        with torch.inference_mode():
            batches = encode_entity_batches(self.backbone, entities, images_root, self.spec, batch_size, image_report)
            for batch in tqdm(batches, desc="encoding entities", unit="batch", disable=not progress):
                cache, batch_vectors = encode_cache_and_vectors(self.model, batch, source)
                caches.append(cache)
                vectors.append(batch_vectors)
        return caches, np.concatenate(vectors)

    def _apply(self, apply: Callable[[_Parts], None]) -> None:
        """Run one edit's steps on this Linker's own parts (BM25 and the manifest are replaced)."""
        parts = _Parts(self.directory, self.manifest, self._store, self._vectors, self._bm25)
        apply(parts)
        self._bm25, self.manifest = parts.bm25, parts.manifest

    def _next_revision(self) -> int:
        return int(self.manifest.get("revision", 0)) + 1

    def _check_unchanged_on_disk(self) -> None:
        """Refuse to edit from a stale view (another process changed the index since this one opened it), or
        over an edit that failed (an exception, not a kill) and is still journaled: reopening finishes it."""
        if self._vectors.read_only:
            raise UsageError(f"{self.directory} was opened read-only (Linker.load(read_only=True)); open it "
                             "without read_only to change its entities")
        if (self.directory / JOURNAL_FILE).is_file():
            raise MismatchError(f"{self.directory}: an earlier edit did not finish; open the index again, which "
                                "finishes it, then retry")
        revision = read_manifest(self.directory).get("revision", 0)
        if revision != self.manifest.get("revision", 0) or _listed_segments(self.directory) != self._segments_seen:
            raise MismatchError(f"{self.directory} was changed by another process since this one opened it (now at "
                                f"revision {revision}); open the index again")

    def _finished_by_recovery(self, operation: str, request: str) -> ChangeReport | CompactionReport | None:
        """The report of this very edit if recovery finished it on opening (a rerun after a kill), once."""
        recovered = self._recovered
        if recovered is None or not recovered.finished:
            return None
        if (recovered.operation, recovered.request) != (operation, request):
            return None
        self._recovered = None
        return recovered.report

    def _note_recovery(self, recovered: RecoveryReport | None) -> None:
        """Keep what recovery did (see `_finished_by_recovery`); warn about damage no journal explains."""
        self._recovered = recovered
        self._segments_seen = _listed_segments(self.directory)
        stored = self._store.count()
        if stored != len(self._vectors):
            logger.warning("%s: %d entities in the metadata store but %d linkable, left by an edit from before "
                           "edits were journaled; rebuild the index with `mmel index build`", self.directory, stored,
                           len(self._vectors))


# --- the steps of an edit, shared by the Linker and by recovery -----------------------------------

def _apply_add(parts: _Parts, journal: EditJournal, entities: list[Entity], vectors: np.ndarray) -> None:
    """After the cache segment: entity store, vectors, BM25, manifest; each skipped if it holds the edit already."""
    if parts.store.revision() != journal.revision:
        parts.store.upsert(entities, revision=journal.revision)
    crash_point("index_add.entities_stored")
    if parts.vectors.metadata.get(REVISION_KEY) != journal.revision:
        _upsert_vectors(parts.vectors, journal.qids, vectors)
        _save_vectors(parts, journal.revision)
    crash_point("index_add.vectors_saved")
    _finish(parts, journal)


def _apply_remove(parts: _Parts, journal: EditJournal) -> None:
    """Vectors, entity store, BM25, manifest; each skipped if it holds the edit already."""
    if parts.vectors.metadata.get(REVISION_KEY) != journal.revision:
        parts.vectors.remove([qid for qid in journal.qids if qid in parts.vectors])
        _save_vectors(parts, journal.revision)
    crash_point("index_remove.vectors_saved")
    if parts.store.revision() != journal.revision:
        stored = [entity.qid for entity in parts.store.get_many(journal.qids) if entity is not None]
        parts.store.delete(stored, revision=journal.revision)
    crash_point("index_remove.entities_deleted")
    _finish(parts, journal)


def _finish(parts: _Parts, journal: EditJournal) -> None:
    """BM25 (rebuilt from the store: it has no incremental update, seconds per 100K names), then the manifest."""
    if parts.bm25 is not None:
        parts.bm25 = BM25Index.build(KnowledgeBase(parts.store), parts.bm25.settings.fields)
        parts.bm25.save(parts.directory / BM25_DIR)
    crash_point(f"index_{journal.operation}.bm25_saved")
    if parts.manifest.get("revision", 0) != journal.revision:
        record_change(parts.manifest, added=journal.report["added"], updated=journal.report["updated"],
                      removed=journal.report["removed"])
        write_manifest(parts.directory, parts.manifest)
    crash_point(f"index_{journal.operation}.manifest_written")


def _upsert_vectors(vectors: VectorIndex, qids: list[str], rows: np.ndarray) -> None:
    present = np.array([qid in vectors for qid in qids], dtype=bool)
    if present.any():
        vectors.update([q for q, p in zip(qids, present, strict=True) if p], rows[present])
    if (~present).any():
        vectors.add(rows[~present], [q for q, p in zip(qids, present, strict=True) if not p])


def _save_vectors(parts: _Parts, revision: int) -> None:
    parts.vectors.metadata[REVISION_KEY] = revision
    parts.vectors.save(parts.directory / VECTORS_DIR)


# --- recovery -------------------------------------------------------------------------------------

def recover_interrupted_edit(index_dir: Path) -> RecoveryReport | None:
    """Finish or undo an edit of `index_dir` that was killed, and delete what killed writes left behind.

    Runs under the index's edit lock, before anything of the index is opened, and needs neither
    the model nor the backbone. Returns None when there was nothing to do; else the report, which
    is also logged as a warning.
    """
    directory = Path(index_dir)
    read_manifest(directory)   # touch nothing in a directory that is not an index
    with index_lock(directory):
        recovery = RecoveryReport(directory)
        recovery.restored = [name for name in (VECTORS_DIR, BM25_DIR) if restore_interrupted_swap(directory / name)]
        journal = EditJournal.read(directory)
        if journal is not None:
            _recover_journaled(directory, journal, recovery)
            clear_journal(directory)
        recovery.removed = _remove_leftovers(directory)
    if recovery.operation is None and not recovery.restored and not recovery.removed:
        return None
    logger.warning("%s", recovery.summary())
    return recovery


def _recover_journaled(directory: Path, journal: EditJournal, recovery: RecoveryReport) -> None:
    recovery.operation, recovery.request = journal.operation, journal.request
    segments_now = _listed_segments(directory)
    if journal.operation == "compact":
        recovery.finished = segments_now != journal.segments_before
        if recovery.finished:
            with EntityStore.open(directory / ENTITIES_FILE) as store:
                recovery.report = CompactionReport(rows_after=store.count(), segments_after=len(segments_now),
                                                   **journal.report)
        return
    if journal.operation == "add" and segments_now == journal.segments_before:
        return    # killed before its cache segment was listed: nothing else changed; undone
    manifest = read_manifest(directory)
    bm25 = BM25Index.load(directory / BM25_DIR) if manifest["first_stage"] != "dense" else None
    with EntityStore.open(directory / ENTITIES_FILE) as store:
        parts = _Parts(directory, manifest, store, VectorIndex.load(directory / VECTORS_DIR), bm25)
        if journal.operation == "add":
            entities, vectors = read_staged_entities(directory)
            _apply_add(parts, journal, entities, vectors)
        else:
            _apply_remove(parts, journal)
    recovery.finished = True
    recovery.report = ChangeReport.from_journal(journal.report)


def _remove_leftovers(directory: Path) -> list[str]:
    """Temporary files and folders of killed writes, an unjournaled staging folder, unlisted cache segments."""
    removed = remove_stale_temporaries(directory)
    staged = directory / STAGED_DIR
    if staged.is_dir():   # no journal names it: the edit was killed before writing its journal
        shutil.rmtree(staged, ignore_errors=True)
        removed.append(staged.name)
    cache_dir = directory / CACHE_DIR
    removed += [f"{CACHE_DIR}/{name}" for name in remove_stale_temporaries(cache_dir)]
    if not (cache_dir / SEGMENTS_FILE).is_file():
        return removed   # not a cache the sweep can judge; opening the index reports it
    listed = set(_listed_segments(directory))
    for segment in sorted(cache_dir.iterdir()):
        if SEGMENT_NAME.fullmatch(segment.name) and segment.name not in listed:
            shutil.rmtree(segment, ignore_errors=True)
            removed.append(f"{CACHE_DIR}/{segment.name}")
    return removed


def _listed_segments(directory: Path) -> list[str]:
    """Names of the cache segments `segments.json` lists (the cache's commit record)."""
    path = Path(directory) / CACHE_DIR / SEGMENTS_FILE
    listing = read_json(path)
    if not isinstance(listing, dict) or not isinstance(listing.get("segments"), list):
        raise DataError("expected an object with a 'segments' list", path=path)
    return [info["name"] for info in listing["segments"] if isinstance(info, dict) and "name" in info]


def _request_digest(operation: str, *parts: str) -> str:
    """Identifies a request: the same command with the same input gives the same digest."""
    return hashlib.sha256("\n".join((operation, *parts)).encode("utf-8")).hexdigest()


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


__all__ = ["ChangeReport", "KBEdits", "RecoveryReport", "recover_interrupted_edit"]
