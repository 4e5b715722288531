"""Link new mentions against an index: first-stage retrieval of K candidates, rerank with the model, NIL.

    linker = Linker.load("wikimel-index")
    result = linker.link("Powers with Noel Harrison in The Girl from U.N.C.L.E.", mention="Noel Harrison")
    result.best.qid, result.best.score, result.best.unit_scores

A query is encoded on the fly with the index's backbone and text template, with the very calls
the feature store makes, so a sentence gives the features it would get in the store. The first
stage (`first_stage.py`: dense, BM25 or their fusion) keeps K candidates, the model reranks them
against their cached entity encodings (`reranking.py`, with the name prior and the tie rule), and
with a NIL calibration in the index (`calibrate_nil`) a top-1 score (or its margin over the
runner-up) under the threshold makes the answer NIL. Queries are checked in `queries.py`, KB
edits live in `kb_edits.py`, data-file jobs in `jobs.py`.

Linking and changes are serialised by one lock, so a Linker can be shared by the threads of a server.

Shapes: B mentions in a batch, K candidates per mention, Dt text width.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from mmel.backbones.base import Backbone, BackboneConfig, ImageFeatures
from mmel.backbones.query_runtime import query_backbone, resolve_query_runtime
from mmel.core.errors import DataError, MismatchError, UsageError
from mmel.core.features import FeatureBatch, FeatureTable
from mmel.core.images import ImageReport, load_image
from mmel.core.types import Candidate, Entity, LinkResult, Mention, locate_span
from mmel.features.encoding import encode_items
from mmel.features.templates import extra_view_texts
from mmel.lexical.bm25 import BM25Index
from mmel.lexical.context_features import ContextPrior
from mmel.models import load_model
from mmel.models.base import MelModel
from mmel.retrieval.entity_cache import CacheLayout, EntityCacheStore
from mmel.retrieval.first_stage import FirstStage
from mmel.retrieval.index import VectorIndex
from mmel.retrieval.index_build import (
    BM25_DIR,
    CACHE_DIR,
    ENTITIES_FILE,
    MODEL_DIR,
    NIL_FILE,
    VECTORS_DIR,
    ModelSpec,
    load_checked_backbone,
    read_manifest,
    weights_fingerprint,
)
from mmel.retrieval.kb_edits import KBEdits, recover_interrupted_edit
from mmel.retrieval.kb_store import EntityStore
from mmel.retrieval.nil import NilCalibration, calibrate_nil, choose_simulated_nil, nil_statistic
from mmel.retrieval.queries import (
    ImageInput,
    MentionQuery,
    PreparedQuery,
    QueryError,
    check_k,
    is_blank,
    prepare_query,
)
from mmel.retrieval.reranking import rerank

logger = logging.getLogger(__name__)

LINK_BATCH_SIZE = 32       # mentions encoded and reranked together


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


class Linker(KBEdits):
    """Answers "which entity is this mention?" from an index directory (see `build_index`)."""

    def __init__(self, directory: Path, manifest: dict[str, Any], *, model: MelModel, backbone: Backbone,
                 spec: ModelSpec, vectors: VectorIndex, store: EntityStore, cache: EntityCacheStore,
                 bm25: BM25Index | None, nil: NilCalibration | None, query_encoder: Backbone | None = None,
                 query_runtime: str = "float32"):
        self.directory = Path(directory)
        self.manifest = manifest
        self.model = model.eval()
        self.backbone = backbone                                  # exact: entity features (KB edits)
        self.query_encoder = query_encoder if query_encoder is not None else backbone   # queries only
        self.query_runtime = query_runtime
        self.spec = spec
        self._vectors = vectors
        self._store = store
        self._cache = cache
        self._bm25 = bm25
        self._nil = nil
        self._lock = threading.RLock()

    @property
    def _first_stage(self) -> FirstStage:
        """The index's first stage over its current vectors and BM25 (both change when the KB is edited)."""
        return FirstStage(self.manifest["first_stage"], self._vectors, self._bm25)

    @property
    def prior(self) -> ContextPrior:
        """The context features added to reranker scores (empty: the model alone); set when building.

        Indexes built before the context prior existed hold only `name_prior_weight`: the name prior.
        """
        if "prior" in self.manifest:
            return ContextPrior(dict(self.manifest["prior"]))
        return ContextPrior.name_only(float(self.manifest.get("name_prior_weight", 0.0)))

    @property
    def name_prior_weight(self) -> float:
        """Weight of the surface-name match in the prior (0: none)."""
        return self.prior.name_weight

    # --- opening ----------------------------------------------------------------------------
    @classmethod
    def load(cls, index_dir: Path | str, *, expect_model: Path | str | None = None,
             backbone: Backbone | None = None, backbone_config: BackboneConfig | None = None,
             read_only: bool = False) -> Linker:
        """Open an index. `expect_model` (a checkpoint directory or its weights SHA-256) must be the indexed model.

        Pass an already loaded `backbone` to share one between linkers; it must be the index's backbone.
        `backbone_config.query_runtime` says how queries are encoded (default `auto`: the fastest
        runtime that costs no accuracy); `float32` is the exact path the feature store takes.
        `read_only`: the FAISS vectors are memory-mapped, not read in (processes linking from the same
        index share them through the page cache), and entity edits refuse.
        """
        directory = Path(index_dir)
        recovered = recover_interrupted_edit(directory)
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
        exact = load_checked_backbone(spec, backbone)
        backbone = _BlankImageMemo(exact)
        if manifest["backbone"]["fingerprint"] not in (None, backbone.fingerprint):
            raise MismatchError(f"{directory} was built with backbone {manifest['backbone']['fingerprint']}, this "
                                f"one is {backbone.fingerprint}; rebuild the index or install the matching weights")
        config = backbone_config or BackboneConfig()
        query_runtime = resolve_query_runtime(exact, config.query_runtime)
        query_encoder = backbone if query_runtime == "float32" else _BlankImageMemo(
            query_backbone(exact, config.replace(query_runtime=query_runtime)))
        vectors = VectorIndex.load(directory / VECTORS_DIR, expect={"template": spec.template.to_dict(),
                                                                    "max_text_length": spec.max_text_length},
                                   read_only=read_only)
        store = EntityStore.open(directory / ENTITIES_FILE)
        layout = CacheLayout.for_model(model, spec.max_text_length, spec.image_tokens)
        cache = EntityCacheStore.open(directory / CACHE_DIR, layout, vectors.qids())
        bm25 = BM25Index.load(directory / BM25_DIR) if manifest["first_stage"] != "dense" else None
        nil = NilCalibration.load(directory / NIL_FILE) if (directory / NIL_FILE).is_file() else None
        linker = cls(directory, manifest, model=model, backbone=backbone, spec=spec, vectors=vectors, store=store,
                     cache=cache, bm25=bm25, nil=nil, query_encoder=query_encoder, query_runtime=query_runtime)
        linker._note_recovery(recovered)
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
        check_k(top_k, candidates_k)
        prepared = [prepare_query(query, position) for position, query in enumerate(queries)]
        return self._link_all(prepared, top_k, candidates_k, progress)

    def link_mentions(self, mentions: Sequence[Mention], images_root: Path | None, *, top_k: int = 10,
                      candidates_k: int = 100, report: ImageReport | None = None,
                      progress: bool = False) -> list[LinkResult | QueryError]:
        """Link dataset mentions as they are, images relative to `images_root` (unusable ones counted in `report`).

        Unlike `link`, a surface form that does not occur verbatim in its sentence (about 3% of
        WikiMEL's mentions) is linked all the same, from the surface and the sentence. A mention
        that cannot be linked at all gives its QueryError in its place.
        """
        check_k(top_k, candidates_k)
        outcomes: list[PreparedQuery | QueryError] = []
        for mention in mentions:
            if is_blank(mention.sentence) or is_blank(mention.surface):
                outcomes.append(QueryError(f"mention {mention.id!r} has an empty sentence or surface"))
                continue
            image = load_image(images_root, mention.image, report) if images_root is not None else None
            span = mention.span or locate_span(mention.sentence, mention.surface)
            outcomes.append(PreparedQuery(mention=dataclasses.replace(mention, span=span), image=image))
        linked = iter(self._link_all([o for o in outcomes if isinstance(o, PreparedQuery)], top_k, candidates_k,
                                     progress))
        return [next(linked) if isinstance(outcome, PreparedQuery) else outcome for outcome in outcomes]

    def _link_all(self, prepared: list[PreparedQuery], top_k: int, candidates_k: int,
                  progress: bool) -> list[LinkResult]:
        results: list[LinkResult] = []
        starts = range(0, len(prepared), LINK_BATCH_SIZE)
        with self._lock, torch.inference_mode():
            for start in tqdm(starts, desc="linking", unit="batch", disable=not progress):
                results.extend(self._link_prepared(prepared[start:start + LINK_BATCH_SIZE], top_k,
                                                   max(candidates_k, top_k)))
        return results

    def _link_prepared(self, batch: list[PreparedQuery], top_k: int, candidates_k: int) -> list[LinkResult]:
        mentions = [p.mention for p in batch]
        features = encode_items(self.query_encoder, [self.spec.template.mention_text(m) for m in mentions],
                                [p.image for p in batch], max_text_length=self.spec.max_text_length,
                                extra_texts=extra_view_texts(self.spec.views, "mention", mentions))
        return self._rank_encoded(mentions, features, top_k, candidates_k)

    def rank_features(self, mentions: Sequence[Mention], features: FeatureTable, *, top_k: int = 10,
                      candidates_k: int = 100, batch_size: int = LINK_BATCH_SIZE,
                      progress: bool = False) -> list[LinkResult]:
        """Link mentions whose features are already computed (row i of `features` = mentions[i]).

        Everything after query encoding is the linker's own path (first stage, reranking, name
        prior, tie rule, NIL): `mmel evaluate --first-stage` reads mention features from the
        feature store and ranks through here, so its numbers are the served linker's.
        """
        check_k(top_k, candidates_k)
        mentions = list(mentions)
        if len(features) != len(mentions):
            raise UsageError(f"{len(mentions)} mentions but {len(features)} feature rows")
        results: list[LinkResult] = []
        with self._lock, torch.inference_mode():
            for start in tqdm(range(0, len(mentions), batch_size), desc="linking", unit="batch",
                              disable=not progress):
                rows = np.arange(start, min(start + batch_size, len(mentions)))
                results.extend(self._rank_encoded(mentions[start:start + batch_size], features.gather(rows), top_k,
                                                  max(candidates_k, top_k)))
        return results

    def _rank_encoded(self, mentions: list[Mention], features: FeatureBatch, top_k: int,
                      candidates_k: int) -> list[LinkResult]:
        reranks = self.manifest["reranker"] != "none"
        own_vectors = self.manifest.get("vectors", "backbone") == "model"   # the model's own scores, searched exactly
        encoded = self.model.encode_mentions(features) if reranks or own_vectors else None   # once per batch
        if own_vectors:
            query_vectors = self.model.query_vectors(encoded).float().cpu().numpy()
        else:
            query_vectors = features.text_global.float().cpu().numpy()                  # [B, Dt]
        shortlists = self._first_stage.retrieve(mentions, query_vectors, candidates_k)
        prior = self.prior
        shortlisted = self.entities([qid for shortlist in shortlists for qid, _ in shortlist]) if prior else {}
        ranked_all = rerank(self.model if reranks else None, encoded, shortlists, self._cache.gather,
                            mentions=mentions, entities=shortlisted, prior=prior)
        kept = [items[:top_k] for items in ranked_all]
        names = shortlisted or self.entities([item.qid for items in kept for item in items])
        threshold = self._nil.threshold if self._nil is not None else None
        statistic = self._nil.statistic if self._nil is not None else None
        results = []
        for mention, items, ranked in zip(mentions, kept, ranked_all, strict=True):
            candidates = tuple(Candidate(qid=item.qid, name=names[item.qid].name if item.qid in names else item.qid,
                                         score=item.score, rank=rank, unit_scores=item.unit_scores,
                                         retrieval_score=item.retrieval_score,
                                         first_stage_rank=item.first_stage_rank)
                               for rank, item in enumerate(items, start=1))
            nil = self._nil is not None and self._nil.is_nil_ranking([item.score for item in ranked])
            results.append(LinkResult(mention=mention, candidates=candidates, nil=nil,
                                      nil_threshold=threshold, nil_statistic=statistic))
        return results

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
            "query_runtime": self.query_runtime,
            "template": self.spec.template.name, "max_text_length": self.spec.max_text_length,
            "first_stage": self.manifest["first_stage"], "vector_index": self._vectors.kind,
            "reranker": self.manifest["reranker"], "vectors": self.manifest.get("vectors", "backbone"),
            "cache_dtype": self._cache.storage_dtype,
            "cache_segments": self._cache.num_segments, "cache_rows_on_disk": self._cache.stored_rows(),
            "kb_checksum_at_build": self.manifest["kb"]["checksum_at_build"],
            "revision": self.manifest.get("revision", 0),
            "nil_threshold": self._nil.threshold if self._nil is not None else None,
            "nil_statistic": self._nil.statistic if self._nil is not None else None,
            "name_prior_weight": self.name_prior_weight, "prior": self.prior.to_dict(),
            "mmel_version": self.manifest["mmel_version"], "created": self.manifest["created"],
        }

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
            raise UsageError("calibrate_nil needs at least one dev mention")
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


def _model_fingerprint(expect_model: Path | str) -> str:
    """A checkpoint directory's weights SHA-256, or the SHA-256 itself."""
    candidate = Path(expect_model)
    return weights_fingerprint(candidate) if candidate.is_dir() else str(expect_model)


__all__ = ["LINK_BATCH_SIZE", "Linker", "MentionQuery", "QueryError"]
