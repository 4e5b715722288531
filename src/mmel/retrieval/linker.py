"""Link new mentions against an index: first-stage retrieval of K candidates, rerank with the model, NIL.

    linker = Linker.load("wikimel-index")
    result = linker.link("Powers with Noel Harrison in The Girl from U.N.C.L.E.", mention="Noel Harrison")
    result.best.qid, result.best.score, result.best.unit_scores

A query is encoded on the fly with the index's backbone and text template, with the very calls
the feature store makes, so a sentence gives the features it would get in the store. The first
stage is dense (FAISS over the backbone's global text vectors), BM25 over entity names, or their
reciprocal-rank fusion ('hybrid', the default: the two miss different entities). The model then
scores the mention against each candidate's cached entity encoding (`entity_cache.py`) and the
candidates are sorted by that score (ties keep first-stage order). With a NIL calibration in the
index (`calibrate_nil`), a top-1 score (or its margin over the runner-up) under the threshold
makes the answer NIL.

Entities can be added, updated and removed in place (`add_entities`, `remove_entities`): new
cache rows go into a new segment, vectors into FAISS, metadata into SQLite, and they are linkable
as soon as the call returns. Linking and changes are serialised by one lock, so a Linker can be
shared by the threads of a server.

Shapes: B mentions in a batch, K candidates per mention, Dt text width.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from mmel.backbones.base import Backbone, ImageFeatures
from mmel.core.errors import DataError, MismatchError, MmelError
from mmel.core.features import FeatureBatch
from mmel.core.images import ImageReport, decode_image, load_image
from mmel.core.types import Candidate, Entity, KnowledgeBase, LinkResult, Mention, locate_span
from mmel.data.jsonl_format import read_mentions_jsonl
from mmel.features.name_match import name_match
from mmel.features.store import encode_items
from mmel.models import load_model
from mmel.models.base import MelModel
from mmel.retrieval.bm25 import BM25Index, query_text
from mmel.retrieval.entity_cache import CacheLayout, CompactionReport, EntityCacheStore
from mmel.retrieval.index import VectorIndex
from mmel.retrieval.index_build import (
    BM25_DIR,
    CACHE_DIR,
    ENTITIES_FILE,
    MODEL_DIR,
    NIL_FILE,
    VECTORS_DIR,
    ModelSpec,
    encode_cache_and_vectors,
    encode_entity_batches,
    load_checked_backbone,
    read_manifest,
    record_change,
    weights_fingerprint,
    write_manifest,
)
from mmel.retrieval.kb_store import EntityStore
from mmel.retrieval.nil import NilCalibration, calibrate_nil, choose_simulated_nil, nil_statistic

logger = logging.getLogger(__name__)

ImageInput = Union[str, os.PathLike, bytes, Image.Image, None]  # noqa: UP007  (a runtime alias for py3.10)
RRF_CONSTANT = 60          # reciprocal-rank fusion: score = sum over first stages of 1 / (60 + rank)
LINK_BATCH_SIZE = 32       # mentions encoded and reranked together
MAX_K = 10_000


class QueryError(MmelError, ValueError):
    """A query the linker cannot answer as asked (empty sentence, span out of range, unknown mention...)."""


@dataclass(frozen=True)
class MentionQuery:
    """One mention to link: the sentence, the mention as text or as a [start, end) span, an optional image."""

    sentence: str
    mention: str | None = None
    span: tuple[int, int] | None = None
    image: ImageInput = None
    id: str = "query"


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


@dataclass
class LinkFileReport:
    """What `link_jsonl` did: mentions linked now, skipped (already in the output), failed (error lines)."""

    linked: int = 0
    skipped: int = 0
    failed: int = 0
    dropped_partial_line: bool = False
    image_report: ImageReport = field(default_factory=ImageReport)

    def summary(self) -> str:
        partial = "; dropped an unfinished last line of the previous run" if self.dropped_partial_line else ""
        return (f"{self.linked} linked, {self.skipped} already done, {self.failed} failed (see their 'error')"
                f"{partial}; {self.image_report.summary()}")


@dataclass
class _Prepared:
    mention: Mention
    image: Image.Image | None


class _BlankImageMemo:
    """The backbone, with its blank-image features computed once.

    They are constant, and `encode_items` asks for them on every call: without the memo each
    linked batch would pay an image-encoder pass even when no query has an image.
    """

    def __init__(self, backbone: Backbone):
        self._backbone = backbone
        self._blank: ImageFeatures | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backbone, name)

    def encode_blank_images(self, count: int) -> ImageFeatures:
        if self._blank is None:
            self._blank = self._backbone.encode_blank_images(1)
        return ImageFeatures(global_=self._blank.global_.expand(count, -1),            # [count, Dg]
                             patches=self._blank.patches.expand(count, -1, -1))       # [count, P, Dp]


class Linker:
    """Answers "which entity is this mention?" from an index directory (see `build_index`)."""

    def __init__(self, directory: Path, manifest: dict[str, Any], *, model: MelModel, backbone: Backbone,
                 spec: ModelSpec, vectors: VectorIndex, store: EntityStore, cache: EntityCacheStore,
                 bm25: BM25Index | None, nil: NilCalibration | None):
        self.directory = Path(directory)
        self.manifest = manifest
        self.model = model.eval()
        self.backbone = backbone
        self.spec = spec
        self._vectors = vectors
        self._store = store
        self._cache = cache
        self._bm25 = bm25
        self._nil = nil
        self._lock = threading.RLock()

    @property
    def name_prior_weight(self) -> float:
        """Weight of the surface-name match added to reranker scores (0: the model alone); set when building."""
        return float(self.manifest.get("name_prior_weight", 0.0))

    # --- opening ----------------------------------------------------------------------------
    @classmethod
    def load(cls, index_dir: Path | str, *, expect_model: Path | str | None = None,
             backbone: Backbone | None = None) -> Linker:
        """Open an index. `expect_model` (a checkpoint directory or its weights SHA-256) must be the indexed model.

        Pass an already loaded `backbone` to share one between linkers; it must be the index's backbone.
        """
        directory = Path(index_dir)
        manifest = read_manifest(directory)
        indexed = manifest["model"]["fingerprint"]
        if expect_model is not None:
            expected = _model_fingerprint(expect_model)
            if expected != indexed:
                raise MismatchError(f"{directory} was built for model {indexed[:16]}…, not {expected[:16]}… "
                                    f"({expect_model}); rebuild it with `mmel index build` for this model")
        spec = ModelSpec.read(directory / MODEL_DIR)
        if spec.fingerprint != indexed:
            raise MismatchError(f"{directory / MODEL_DIR}: weights changed since the index was built "
                                f"({spec.fingerprint[:16]}… vs {indexed[:16]}…); rebuild the index")
        model = load_model(directory / MODEL_DIR)
        backbone = _BlankImageMemo(load_checked_backbone(spec, backbone))
        if manifest["backbone"]["fingerprint"] not in (None, backbone.fingerprint):
            raise MismatchError(f"{directory} was built with backbone {manifest['backbone']['fingerprint']}, this "
                                f"one is {backbone.fingerprint}; rebuild the index or install the matching weights")
        vectors = VectorIndex.load(directory / VECTORS_DIR, expect={"template": spec.template.to_dict(),
                                                                    "max_text_length": spec.max_text_length})
        store = EntityStore.open(directory / ENTITIES_FILE)
        layout = CacheLayout.for_model(model, spec.max_text_length, spec.image_tokens)
        cache = EntityCacheStore.open(directory / CACHE_DIR, layout, vectors.qids())
        bm25 = BM25Index.load(directory / BM25_DIR) if manifest["first_stage"] != "dense" else None
        nil = NilCalibration.load(directory / NIL_FILE) if (directory / NIL_FILE).is_file() else None
        linker = cls(directory, manifest, model=model, backbone=backbone, spec=spec, vectors=vectors, store=store,
                     cache=cache, bm25=bm25, nil=nil)
        linker._warn_if_interrupted()
        return linker

    def close(self) -> None:
        with self._lock:
            self._store.close()

    def __enter__(self) -> Linker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- linking ----------------------------------------------------------------------------
    def link(self, sentence: str, *, mention: str | None = None, span: tuple[int, int] | None = None,
             image: ImageInput = None, top_k: int = 10, candidates_k: int = 100) -> LinkResult:
        """Link one mention, given as `mention` text found in `sentence` or as its [start, end) `span`.

        `image` is a path, encoded bytes or a PIL image. Returns the top `top_k` of the `candidates_k`
        first-stage candidates, reranked; raises QueryError for a query that cannot be answered.
        """
        query = MentionQuery(sentence=sentence, mention=mention, span=span, image=image)
        return self.link_batch([query], top_k=top_k, candidates_k=candidates_k)[0]

    def link_batch(self, queries: Sequence[MentionQuery], *, top_k: int = 10, candidates_k: int = 100,
                   progress: bool = False) -> list[LinkResult]:
        """Link many mentions (encoded and reranked `LINK_BATCH_SIZE` at a time); results in query order."""
        _check_k(top_k, candidates_k)
        prepared = [_prepare(query, position) for position, query in enumerate(queries)]
        return self._link_all(prepared, top_k, candidates_k, progress)

    def link_mentions(self, mentions: Sequence[Mention], images_root: Path | None, *, top_k: int = 10,
                      candidates_k: int = 100, report: ImageReport | None = None,
                      progress: bool = False) -> list[LinkResult | QueryError]:
        """Link dataset mentions as they are, images relative to `images_root` (unusable ones counted in `report`).

        Unlike `link`, a surface form that does not occur verbatim in its sentence (about 3% of
        WikiMEL's mentions) is linked all the same, from the surface and the sentence. A mention
        that cannot be linked at all gives its QueryError in its place.
        """
        _check_k(top_k, candidates_k)
        outcomes: list[_Prepared | QueryError] = []
        for mention in mentions:
            if not mention.sentence.strip() or not mention.surface.strip():
                outcomes.append(QueryError(f"mention {mention.id!r} has an empty sentence or surface"))
                continue
            image = load_image(images_root, mention.image, report) if images_root is not None else None
            span = mention.span or locate_span(mention.sentence, mention.surface)
            outcomes.append(_Prepared(mention=dataclasses.replace(mention, span=span), image=image))
        linked = iter(self._link_all([o for o in outcomes if isinstance(o, _Prepared)], top_k, candidates_k,
                                     progress))
        return [next(linked) if isinstance(outcome, _Prepared) else outcome for outcome in outcomes]

    def _link_all(self, prepared: list[_Prepared], top_k: int, candidates_k: int, progress: bool) -> list[LinkResult]:
        results: list[LinkResult] = []
        starts = range(0, len(prepared), LINK_BATCH_SIZE)
        with self._lock, torch.inference_mode():
            for start in tqdm(starts, desc="linking", unit="batch", disable=not progress):
                results.extend(self._link_prepared(prepared[start:start + LINK_BATCH_SIZE], top_k,
                                                   max(candidates_k, top_k)))
        return results

    def _link_prepared(self, batch: list[_Prepared], top_k: int, candidates_k: int) -> list[LinkResult]:
        features = encode_items(self.backbone, [self.spec.template.mention_text(p.mention) for p in batch],
                                [p.image for p in batch], max_text_length=self.spec.max_text_length)
        shortlists = self._first_stage([p.mention for p in batch], features, candidates_k)
        shortlisted = (self.entities([qid for shortlist in shortlists for qid, _ in shortlist])
                       if self.name_prior_weight > 0 else {})                           # the prior reads their names
        ranked_all = self._rerank(features, shortlists, [p.mention.surface for p in batch], shortlisted)
        kept = [items[:top_k] for items in ranked_all]
        names = shortlisted or self.entities([qid for items in kept for qid, *_ in items])
        threshold = self._nil.threshold if self._nil is not None else None
        statistic = self._nil.statistic if self._nil is not None else None
        results = []
        for row, (prepared, items) in enumerate(zip(batch, kept, strict=True)):
            candidates = tuple(Candidate(qid=qid, name=names[qid].name if qid in names else qid, score=score,
                                         rank=rank, unit_scores=units, retrieval_score=retrieval)
                               for rank, (qid, score, units, retrieval) in enumerate(items, start=1))
            nil = self._nil is not None and self._nil.is_nil_ranking([score for _, score, *_ in ranked_all[row]])
            results.append(LinkResult(mention=prepared.mention, candidates=candidates, nil=nil,
                                      nil_threshold=threshold, nil_statistic=statistic))
        return results

    def _first_stage(self, mentions: list[Mention], features: FeatureBatch,
                     k: int) -> list[list[tuple[str, float]]]:
        """Up to k (QID, retrieval score) per mention, best first."""
        kind = self.manifest["first_stage"]
        dense = self._dense_hits(features, k) if kind != "bm25" else None
        lexical = (_bm25_hits(self._bm25, mentions, k, drop_zero=kind == "hybrid")
                   if self._bm25 is not None and kind != "dense" else None)
        if dense is not None and lexical is not None:
            return [_reciprocal_rank_fusion(d, b, k) for d, b in zip(dense, lexical, strict=True)]
        return dense if dense is not None else lexical or [[] for _ in mentions]

    def _dense_hits(self, features: FeatureBatch, k: int) -> list[list[tuple[str, float]]]:
        found = self._vectors.search(features.text_global.float().cpu().numpy(), k)    # scores [B, k]
        return [list(zip(qids, found.scores[row, :len(qids)].tolist(), strict=True))
                for row, qids in enumerate(found.qids)]

    def _rerank(self, features: FeatureBatch, shortlists: list[list[tuple[str, float]]], surfaces: list[str],
                shortlisted: dict[str, Entity]) -> list[list[tuple[str, float, dict[str, float], float]]]:
        """(QID, score, unit scores, retrieval score) per candidate, sorted by score (ties: first-stage order).

        With a name prior w > 0 (index manifest), score = model score + w * name_match(surface, name),
        with the names from `shortlisted` (QID -> Entity), and the unit scores gain 'name_match'.
        """
        if self.manifest["reranker"] == "none":
            return [[(qid, score, {}, score) for qid, score in shortlist] for shortlist in shortlists]
        mentions = self.model.encode_mentions(features)                                 # B rows
        candidates, entities = self._candidate_table(shortlists)                        # [B, K], U rows
        output = self.model.match_candidates(mentions, entities, candidates) if entities is not None else None
        ranked = []
        for row, shortlist in enumerate(shortlists):
            count = len(shortlist)
            if count == 0:
                ranked.append([])
                continue
            scores = output.scores[row, :count].tolist()                                 # [k]
            units = {name: values[row, :count].tolist() for name, values in output.unit_scores.items()}
            if self.name_prior_weight > 0:
                units["name_match"] = [name_match(surfaces[row], shortlisted[qid].name if qid in shortlisted else "")
                                       for qid, _ in shortlist]
                scores = [s + self.name_prior_weight * m for s, m in zip(scores, units["name_match"], strict=True)]
            order = sorted(range(count), key=lambda i: (-scores[i], i))
            ranked.append([(shortlist[i][0], scores[i], {name: values[i] for name, values in units.items()},
                            shortlist[i][1]) for i in order])
        return ranked

    def _candidate_table(self, shortlists: list[list[tuple[str, float]]]) -> tuple[torch.Tensor, Any]:
        """Cache rows of every distinct shortlisted entity (U rows), and each mention's candidates as rows [B, K].

        Shorter shortlists are padded with row 0; the caller reads only each mention's own count.
        """
        distinct = list(dict.fromkeys(qid for shortlist in shortlists for qid, _ in shortlist))
        if not distinct:
            return torch.zeros((len(shortlists), 0), dtype=torch.long), None
        position = {qid: index for index, qid in enumerate(distinct)}
        width = max(len(shortlist) for shortlist in shortlists)
        candidates = torch.zeros((len(shortlists), width), dtype=torch.long)
        for row, shortlist in enumerate(shortlists):
            candidates[row, :len(shortlist)] = torch.tensor([position[qid] for qid, _ in shortlist], dtype=torch.long)
        return candidates, self._cache.gather(distinct)

    # --- looking up -------------------------------------------------------------------------
    def entity(self, qid: str) -> Entity | None:
        return self._store.get(qid)

    def entities(self, qids: Sequence[str]) -> dict[str, Entity]:
        """QID -> Entity for the QIDs in the index (unknown ones are left out)."""
        return {entity.qid: entity for entity in self._store.get_many(list(qids)) if entity is not None}

    def entity_image(self, qid: str, k: int = 0) -> Image.Image | None:
        """The entity's k-th image (confined to the directory its KB was read from), or None if it has none usable."""
        entity = self._store.get(qid)
        if entity is None or not 0 <= k < len(entity.images) or qid not in self._cache:
            return None
        root = Path(self._cache.segment_metadata(qid)["images_root"])
        report = ImageReport()
        try:
            image = load_image(root, entity.images[k], report)
        except DataError as error:
            logger.warning("entity %s image %d refused: %s", qid, k, error)
            return None
        if image is None:
            logger.warning("entity %s image %d unusable: %s", qid, k, report.summary())
        return image

    @property
    def nil_calibration(self) -> NilCalibration | None:
        return self._nil

    def __len__(self) -> int:
        return len(self._vectors)

    def info(self) -> dict[str, Any]:
        """Facts about the index, JSON-ready (what GET /health shows); lock-free, so it never waits for linking."""
        return {
            "directory": str(self.directory), "entities": len(self._vectors),
            "model_type": self.manifest["model"]["model_type"],
            "model_fingerprint": self.manifest["model"]["fingerprint"],
            "backbone": self.manifest["backbone"]["name"], "backbone_fingerprint": self.backbone.fingerprint,
            "template": self.spec.template.name, "max_text_length": self.spec.max_text_length,
            "first_stage": self.manifest["first_stage"], "vector_index": self._vectors.kind,
            "reranker": self.manifest["reranker"], "cache_dtype": self._cache.storage_dtype,
            "cache_segments": self._cache.num_segments, "cache_rows_on_disk": self._cache.stored_rows(),
            "kb_checksum_at_build": self.manifest["kb"]["checksum_at_build"],
            "revision": self.manifest.get("revision", 0),
            "nil_threshold": self._nil.threshold if self._nil is not None else None,
            "nil_statistic": self._nil.statistic if self._nil is not None else None,
            "name_prior_weight": self.name_prior_weight,
            "mmel_version": self.manifest["mmel_version"], "created": self.manifest["created"],
        }

    # --- changing the KB --------------------------------------------------------------------
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
                cache, batch_vectors = encode_cache_and_vectors(self.model, batch)
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
                raise KeyError(f"{len(unknown)} QID(s) are not in the index, e.g. {unknown[:5]}; nothing removed")
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

    # --- NIL --------------------------------------------------------------------------------
    def set_nil_calibration(self, calibration: NilCalibration | None) -> None:
        """Use (and save in the index) a NIL threshold, or drop it with None."""
        with self._lock:
            path = self.directory / NIL_FILE
            if calibration is None:
                path.unlink(missing_ok=True)
            else:
                calibration.save(path)
            self._nil = calibration

    def calibrate_nil(self, mentions: Sequence[Mention], images_root: Path, *, nil_fraction: float = 0.1,
                      criterion: str = "accuracy", target_precision: float | None = None, seed: int = 0,
                      candidates_k: int = 100, statistic: str = "margin", progress: bool = True) -> NilCalibration:
        """Fit a NIL threshold on dev `mentions` (not saved: pass the result to `set_nil_calibration`).

        Linkable mentions chosen by `choose_simulated_nil` play NIL mentions: their gold entity is
        taken out of their ranking, so their best score is that of a confident wrong answer.
        Mentions whose gold entity is not in the index are real NIL mentions. `statistic` is what
        the threshold applies to: the top-1 'score' or its 'margin' over the runner-up (default:
        it separated wrong answers better on WikiMEL dev, docs/RESULTS.md).
        """
        mentions = list(mentions)
        if not mentions:
            raise ValueError("calibrate_nil needs at least one dev mention")
        simulated = choose_simulated_nil(len(mentions), nil_fraction, seed=seed)
        results = self.link_mentions(mentions, images_root, top_k=3, candidates_k=candidates_k, progress=progress)
        scores, correct, is_nil = [], [], []
        for mention, hide_gold, outcome in zip(mentions, simulated, results, strict=True):
            if isinstance(outcome, Exception):
                raise QueryError(f"dev mention {mention.id!r} cannot be linked: {outcome}")
            gold_indexed = mention.gold_qid is not None and mention.gold_qid in self._vectors
            candidates = [c for c in outcome.candidates if not (hide_gold and c.qid == mention.gold_qid)]
            scores.append(nil_statistic([c.score for c in candidates], statistic))
            correct.append(gold_indexed and not hide_gold and bool(candidates)
                           and candidates[0].qid == mention.gold_qid)
            is_nil.append(hide_gold or not gold_indexed)
        metadata = {"model_fingerprint": self.manifest["model"]["fingerprint"], "dev_mentions": len(mentions),
                    "simulated_nil_fraction": nil_fraction, "seed": seed, "candidates_k": candidates_k}
        return calibrate_nil(_finite_for_calibration(np.asarray(scores)), np.array(correct), np.array(is_nil),
                             criterion=criterion, target_precision=target_precision, metadata=metadata,
                             statistic=statistic)


def _finite_for_calibration(values: np.ndarray) -> np.ndarray:
    """-inf (no candidate) and +inf (a lone candidate's margin) moved just past the finite values, order kept."""
    finite = np.isfinite(values)
    low, high = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (0.0, 0.0)
    return np.where(finite, values, np.where(values > 0, high + 1.0, low - 1.0))


# --- linking data files ---------------------------------------------------------------------------

def link_jsonl(linker: Linker, input_path: Path, output_path: Path, *, images_root: Path | None = None,
               top_k: int = 10, candidates_k: int = 100, chunk_size: int = 256,
               progress: bool = True) -> LinkFileReport:
    """Link every mention of a mentions JSONL file into `output_path`, one JSON line per mention.

    Resumable: mentions whose id is already in the output are skipped, and each chunk is appended
    with a single write followed by fsync, so an interrupted run leaves whole lines (a torn last
    line is detected and dropped on the next run). Input format: mmel's mentions JSONL
    (docs/DATA_FORMAT.md); images are relative to `images_root` (default: the input's directory).
    """
    input_path, output_path = Path(input_path), Path(output_path)
    images_root = Path(images_root) if images_root is not None else input_path.parent
    mentions = read_mentions_jsonl(input_path, images_root)
    report = LinkFileReport()
    done, report.dropped_partial_line = _finished_ids(output_path)
    pending = [mention for mention in mentions if mention.id not in done]
    report.skipped = len(mentions) - len(pending)
    with tqdm(total=len(pending), desc="linking", unit="mention", disable=not progress) as bar:
        for start in range(0, len(pending), chunk_size):
            chunk = pending[start:start + chunk_size]
            outcomes = linker.link_mentions(chunk, images_root, top_k=top_k, candidates_k=candidates_k,
                                            report=report.image_report)
            lines = [json.dumps(_output_record(m, o), ensure_ascii=False) for m, o in zip(chunk, outcomes, strict=True)]
            _append_lines(output_path, lines)
            report.failed += sum(isinstance(outcome, QueryError) for outcome in outcomes)
            report.linked += sum(not isinstance(outcome, QueryError) for outcome in outcomes)
            bar.update(len(chunk))
    return report


def result_record(result: LinkResult) -> dict[str, Any]:
    """A LinkResult as JSON: the mention, NIL decision and ranked candidates with unit scores."""
    return {"id": result.mention.id, "surface": result.mention.surface, "span": result.mention.span,
            "nil": result.nil, "nil_threshold": result.nil_threshold, "nil_statistic": result.nil_statistic,
            "candidates": [{"rank": c.rank, "qid": c.qid, "name": c.name, "score": c.score,
                            "unit_scores": c.unit_scores, "retrieval_score": c.retrieval_score}
                           for c in result.candidates]}


def _output_record(mention: Mention, outcome: LinkResult | QueryError) -> dict[str, Any]:
    if isinstance(outcome, QueryError):
        return {"id": mention.id, "error": str(outcome)}
    return result_record(outcome)


def _finished_ids(output_path: Path) -> tuple[set[str], bool]:
    """Ids already in the output; a torn last line (no newline, or not JSON) is cut off first."""
    if not output_path.is_file():
        return set(), False
    data = output_path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    done: set[str] = set()
    for number, line in enumerate(complete.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            done.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError("not a line written by `mmel link` (no JSON object with an 'id'); use another output file",
                            path=output_path, record=f"line {number}") from None
    torn = len(complete) != len(data)
    if torn:
        with output_path.open("r+b") as handle:
            handle.truncate(len(complete))
    return done, torn


def _append_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as handle:
        handle.write("".join(line + "\n" for line in lines).encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


# --- query checks -----------------------------------------------------------------------------------

def _prepare(query: MentionQuery, position: int) -> _Prepared:
    """Validate a query and resolve its mention span and image; QueryError says what is wrong."""
    where = f"query {position}: " if position else ""
    sentence = query.sentence
    if not isinstance(sentence, str) or not sentence.strip():
        raise QueryError(f"{where}the sentence is empty")
    if (query.mention is None) == (query.span is None):
        raise QueryError(f"{where}give exactly one of mention (text) or span ([start, end))")
    span = _checked_span(sentence, query.span, where) if query.span is not None else \
        _located_mention(sentence, query.mention, where)
    mention = Mention(id=query.id, sentence=sentence, surface=sentence[span[0]:span[1]], span=span,
                      image=str(query.image) if isinstance(query.image, (str, os.PathLike)) else None)
    return _Prepared(mention=mention, image=_as_image(query.image, where))


def _checked_span(sentence: str, span: Any, where: str) -> tuple[int, int]:
    if not (isinstance(span, (tuple, list)) and len(span) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in span)):
        raise QueryError(f"{where}span must be two integers [start, end), got {span!r}")
    start, end = span
    if not 0 <= start < end <= len(sentence):
        raise QueryError(f"{where}span [{start}, {end}) is out of range for a sentence of {len(sentence)} characters")
    if not sentence[start:end].strip():
        raise QueryError(f"{where}span [{start}, {end}) holds only whitespace")
    return start, end


def _located_mention(sentence: str, mention: Any, where: str) -> tuple[int, int]:
    if not isinstance(mention, str) or not mention.strip():
        raise QueryError(f"{where}the mention is empty")
    span = locate_span(sentence, mention.strip())
    if span is None:
        raise QueryError(f"{where}the mention {mention!r} does not occur in the sentence")
    return span


def _as_image(image: ImageInput, where: str) -> Image.Image | None:
    if image is None:
        return None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        data, source = bytes(image), "the image bytes"
    elif isinstance(image, (str, os.PathLike)):
        source = str(image)
        try:
            data = Path(image).read_bytes()
        except OSError as error:
            raise QueryError(f"{where}cannot read image {source}: {error.strerror or error}") from None
    else:
        raise QueryError(f"{where}image must be a path, bytes or a PIL image, got {type(image).__name__}")
    try:
        return decode_image(data)
    except ValueError as error:
        raise QueryError(f"{where}{source} is not a usable image: {error}") from None


def _check_k(top_k: int, candidates_k: int) -> None:
    for name, value in (("top_k", top_k), ("candidates_k", candidates_k)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_K:
            raise QueryError(f"{name} must be an integer from 1 to {MAX_K}, got {value!r}")


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


def _model_fingerprint(expect_model: Path | str) -> str:
    """A checkpoint directory's weights SHA-256, or the SHA-256 itself."""
    candidate = Path(expect_model)
    return weights_fingerprint(candidate) if candidate.is_dir() else str(expect_model)


def _bm25_hits(bm25: BM25Index, mentions: list[Mention], k: int, *, drop_zero: bool) -> list[list[tuple[str, float]]]:
    """BM25 over entity names; with `drop_zero`, entities sharing no word with the mention are left out."""
    hits = bm25.search([query_text(mention) for mention in mentions], min(k, len(bm25)))
    return [[(bm25.qids[row], float(score)) for row, score in zip(rows, scores, strict=True)
             if not (drop_zero and score <= 0)]
            for rows, scores in zip(hits.rows, hits.scores, strict=True)]


def _reciprocal_rank_fusion(dense: list[tuple[str, float]], lexical: list[tuple[str, float]],
                            k: int) -> list[tuple[str, float]]:
    fused: dict[str, float] = {}
    for hits in (dense, lexical):
        for rank, (qid, _) in enumerate(hits):
            fused[qid] = fused.get(qid, 0.0) + 1.0 / (RRF_CONSTANT + rank + 1)
    return sorted(fused.items(), key=lambda item: -item[1])[:k]


__all__ = ["ChangeReport", "ImageInput", "LinkFileReport", "Linker", "MentionQuery", "QueryError", "link_jsonl",
           "result_record"]
