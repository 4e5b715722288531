"""Build a self-describing link index directory from a knowledge base and a trained model checkpoint.

    <index>/manifest.json     format, versions, model (type + weights SHA-256), backbone (name +
                              fingerprint), template, max text length, KB checksum at build time,
                              first stage, counts, change log
    <index>/model/            a copy of the checkpoint: the index is self-contained
    <index>/vectors/          VectorIndex (FAISS) over the backbone's global text vectors of the entities
    <index>/bm25/             BM25Index over entity names (first stage 'bm25' or 'hybrid' only)
    <index>/entities.sqlite   EntityStore: names, texts, image paths
    <index>/entity_cache/     EntityCacheStore: the model's per-entity cache for reranking; each segment
                              records the directory its entities' image paths are relative to
    <index>/nil.json          optional NilCalibration (`mmel index calibrate-nil`)
    <index>/edit-journal.json, <index>/edit-staged/
                              only while an add/remove/compact is under way, or after one was killed:
                              the next `Linker.load` finishes or undoes it (`retrieval/edit_journal.py`)

`mmel.retrieval.linker.Linker` opens it. Entity features come from the feature store when one is
given (`build_features` reuses every entry already encoded), from a caller's FeatureTable
(`entity_features`: features computed elsewhere, or synthetic ones for benchmarks), else they are
encoded on the fly with the same calls the store makes (`encode_items`), so the store and on-the-fly
paths give the same features.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmel.backbones import load_backbone
from mmel.backbones.base import Backbone
from mmel.backbones.text_layers import TEXT_LAYERS_KEY, apply_text_layers
from mmel.core.checkpoint import WEIGHTS_FILE, read_checkpoint_header
from mmel.core.config import ConfigBase, ConfigError
from mmel.core.crashpoints import crash_point
from mmel.core.engine import Engine
from mmel.core.errors import DataError, MismatchError, UsageError
from mmel.core.features import FeatureTable, FeatureViews
from mmel.core.images import ImageReport
from mmel.core.manifest import read_manifest as read_versioned_manifest
from mmel.core.paths import atomic_directory, atomic_write_json, read_json, sha256_file
from mmel.core.types import Dataset
from mmel.features.store import build_features
from mmel.features.templates import TextTemplate, get_template, template_for_views
from mmel.lexical.bm25 import BM25Index
from mmel.lexical.context_features import NO_PRIOR, ContextPrior
from mmel.models import MODELS, load_model
from mmel.retrieval import FIRST_STAGES
from mmel.retrieval.entity_cache import CacheLayout, EntityCacheStore
from mmel.retrieval.entity_encoding import (
    EncodedFeatures,
    EntityShardEncoder,
    FeatureSource,
    StoredFeatures,
    TableFeatures,
    encode_entity_side,
)
from mmel.retrieval.index import INDEX_KINDS, IndexConfig, VectorIndex, read_index_manifest
from mmel.retrieval.index_tuning import describe_tuning
from mmel.retrieval.kb_store import EntityStore, kb_checksum

logger = logging.getLogger(__name__)

FORMAT_NAME = "mmel-link-index"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_DIR = "model"
VECTORS_DIR = "vectors"
BM25_DIR = "bm25"
ENTITIES_FILE = "entities.sqlite"
CACHE_DIR = "entity_cache"
NIL_FILE = "nil.json"
RERANKERS = ("model", "none")
VECTOR_SOURCES = ("backbone", "model")
CACHE_DTYPES = ("auto", "float32", "float16", "int8")
CHANGE_LOG_LENGTH = 100   # manifest keeps the last this many add/remove records
DEFAULT_TEMPLATE = "mimic"
DEFAULT_MAX_TEXT_LENGTH = 40


@dataclass
class IndexBuildConfig(ConfigBase):
    """How `build_index` builds an index. Defaults suit KBs from a few entities to about a million."""

    first_stage: str = "hybrid"              # 'dense' (FAISS), 'bm25' (entity names) or 'hybrid' (both, fused)
    reranker: str = "model"                  # 'model' (rerank with the checkpoint) or 'none' (first stage only)
    # What the dense first stage searches: the backbone's global text vectors ('backbone'), or the
    # model's own retrieval vectors ('model', for a dual encoder such as DIM: with first_stage
    # 'dense' and reranker 'none' the index ranks the whole KB by the model's exact scores).
    vectors: str = "backbone"
    vector_index: str = "auto"               # FAISS kind: 'auto', 'flat' (exact), 'hnsw' or 'ivf'
    exact_max_entities: int = 200_000        # 'auto' is exact up to this many entities, IVF above
    ivf_num_probes: int = 0                  # IVF lists scanned per query; 0 = the fewest reaching recall_target
    ivf_codes: str = "fp16"                  # IVF vector storage: 'fp16' (default), 'flat' (float32) or 'sq8' (8-bit)
    recall_target: float = 0.995             # approximate first stage: share of exactly-found golds it must find
    cache_dtype: str = "auto"                # reranker cache storage: 'float32', 'float16', 'int8' or 'auto'
    # 'auto' stores float32 up to this many entities, int8 above (WikiMEL test: Hits@1 79.13 int8 vs
    # 79.11 float32, docs/RESULTS.md; a quarter of the disk and page cache)
    float32_cache_max_entities: int = 200_000
    bm25_fields: str = "name"                # BM25 documents: 'name' or 'name+text'
    encode_batch_size: int = 64              # entities per backbone / model batch while building
    name_prior_weight: float | None = None   # serve the name prior of this weight alone; None: the checkpoint's
    prior_weights: dict[str, float] | None = None   # serve this context prior (feature -> weight); None: as above

    def __post_init__(self) -> None:
        choices = (("first_stage", FIRST_STAGES), ("reranker", RERANKERS), ("cache_dtype", CACHE_DTYPES),
                   ("vectors", VECTOR_SOURCES),
                   ("vector_index", INDEX_KINDS))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}; available: {', '.join(allowed)}")
        for name in ("exact_max_entities", "float32_cache_max_entities", "encode_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"IndexBuildConfig.{name} must be at least 1, got {getattr(self, name)}")
        self.vector_index_config()   # checks the FAISS settings
        if self.name_prior_weight is not None and self.name_prior_weight < 0:
            raise ConfigError(f"IndexBuildConfig.name_prior_weight must be >= 0, got {self.name_prior_weight}")
        if self.name_prior_weight is not None and self.prior_weights is not None:
            raise ConfigError("IndexBuildConfig: give name_prior_weight or prior_weights, not both")
        if self.prior_weights is not None:
            try:
                ContextPrior(dict(self.prior_weights))
            except ValueError as error:
                raise ConfigError(f"IndexBuildConfig.prior_weights: {error}") from None

    def prior(self, spec: ModelSpec) -> ContextPrior:
        """The context prior the index serves: the one given here, else the checkpoint's."""
        if self.prior_weights is not None:
            return ContextPrior(dict(self.prior_weights))
        if self.name_prior_weight is not None:
            return ContextPrior.name_only(self.name_prior_weight)
        return spec.prior

    def storage_dtype(self, num_entities: int) -> str:
        if self.cache_dtype != "auto":
            return self.cache_dtype
        return "float32" if num_entities <= self.float32_cache_max_entities else "int8"

    def vector_index_config(self) -> IndexConfig:
        return IndexConfig(kind=self.vector_index, exact_max_entities=self.exact_max_entities,
                           ivf_num_probes=self.ivf_num_probes, ivf_codes=self.ivf_codes,
                           recall_target=self.recall_target)


@dataclass(frozen=True)
class ModelSpec:
    """What a checkpoint needs from the input side: its backbone and how texts were rendered."""

    model_type: str
    fingerprint: str              # SHA-256 of model.safetensors
    backbone_name: str
    backbone_fingerprint: str | None
    template: TextTemplate
    max_text_length: int
    views: FeatureViews = field(default_factory=FeatureViews)   # the text views the model reads (its class says)
    image_tokens: int = 49           # P: image tokens per item of the backbone's features (config.json "backbone")
    prior: ContextPrior = NO_PRIOR   # config.json "inference" (`prior_of`)
    directory: Path | None = None    # the checkpoint directory (where its fine-tuned text layers are)
    text_layers: dict[str, Any] | None = None   # its fine-tuned text layers (backbones.text_layers), if any

    @property
    def name_prior_weight(self) -> float:
        """Weight of the surface-name match in the checkpoint's prior (0: none)."""
        return self.prior.name_weight

    @classmethod
    def read(cls, checkpoint_dir: Path) -> ModelSpec:
        header = read_checkpoint_header(Path(checkpoint_dir))
        backbone = header.get("backbone") or {}
        preprocess = header.get("preprocess") or {}
        template = _template_from(preprocess, source=Path(checkpoint_dir))
        views = _model_views(header, template, source=Path(checkpoint_dir))
        return cls(model_type=header["model_type"], fingerprint=weights_fingerprint(checkpoint_dir),
                   backbone_name=backbone.get("name", "minilm_effnet"),
                   backbone_fingerprint=backbone.get("fingerprint"), template=template, views=views,
                   max_text_length=int(preprocess.get("max_text_length", DEFAULT_MAX_TEXT_LENGTH)),
                   image_tokens=int(backbone.get("num_patches", 49)),
                   prior=prior_of(header.get("inference") or {}, source=Path(checkpoint_dir)),
                   directory=Path(checkpoint_dir), text_layers=backbone.get(TEXT_LAYERS_KEY))


def prior_of(inference: dict[str, Any], *, source: Path) -> ContextPrior:
    """A checkpoint's context prior: its fitted `prior_weights` (`mmel fit-prior --write`), else the name prior of
    its `name_prior_weight` (`mmel tune-name-prior --write`, or learned by `model.name_signal`), else none."""
    try:
        if "prior_weights" in inference:
            return ContextPrior({name: float(weight) for name, weight in dict(inference["prior_weights"]).items()})
        return ContextPrior.name_only(float(inference.get("name_prior_weight", 0.0)))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{source}/config.json: bad \"inference\" prior: {error}") from None


@dataclass
class IndexBuildReport:
    """What `build_index` did."""

    directory: Path
    entities: int
    with_image: int
    first_stage: str
    vector_index: str
    cache_dtype: str
    seconds: float
    bytes_on_disk: int
    image_report: ImageReport = field(default_factory=ImageReport)
    stage_seconds: dict[str, float] = field(default_factory=dict)   # where `seconds` went, stage by stage
    recall_tuning: dict[str, Any] | None = None   # the approximate vector index's tuned setting (TuningResult dict)

    def summary(self) -> str:
        tuned = f"; vector search {describe_tuning(self.recall_tuning)}" if self.recall_tuning else ""
        return (f"{self.directory}: {self.entities} entities ({self.with_image} with an image), first stage "
                f"{self.first_stage} ({self.vector_index} vectors), reranker cache {self.cache_dtype}, "
                f"{self.bytes_on_disk / 2**20:.1f} MiB, built in {self.seconds:.1f} s{tuned}; "
                f"{self.image_report.summary()}")


def _model_views(header: dict[str, Any], template: TextTemplate, *, source: Path) -> FeatureViews:
    """The views the checkpoint's model declares; its template must render their primary pair."""
    model_class = MODELS.get(header["model_type"])
    views = model_class(model_class.config_class.from_dict(header["config"])).feature_views()
    expected = template_for_views(views)
    if (template.mention_format, template.entity_format) != (expected.mention_format, expected.entity_format):
        raise MismatchError(f"{source}: preprocess.template {template.name!r} does not render the model's views "
                            f"({views.mention} / {views.entity}, template {expected.name!r})")
    return views


def weights_fingerprint(checkpoint_dir: Path) -> str:
    """SHA-256 of a checkpoint's weights file: what an index records and `expect_model` compares."""
    path = Path(checkpoint_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise MismatchError(f"{checkpoint_dir}: {WEIGHTS_FILE} is missing; not a model checkpoint directory")
    return sha256_file(path)


def load_checked_backbone(spec: ModelSpec, backbone: Backbone | None = None) -> Backbone:
    """The checkpoint's backbone (loaded by name unless given), refused when its fingerprint differs.

    A loaded backbone gets the checkpoint's fine-tuned text layers, if it has any; a given one must
    already have them (its fingerprint names them).
    """
    if backbone is None:
        backbone = load_backbone(spec.backbone_name)
        if spec.text_layers is not None and spec.directory is not None:
            backbone = apply_text_layers(backbone, spec.directory, spec.text_layers)
    if backbone.name != spec.backbone_name:
        raise MismatchError(f"the model was trained on backbone {spec.backbone_name!r}, not {backbone.name!r}")
    if spec.backbone_fingerprint is not None and backbone.fingerprint != spec.backbone_fingerprint:
        raise MismatchError(f"backbone {backbone.name!r} has fingerprint {backbone.fingerprint}, but the model was "
                            f"trained on {spec.backbone_fingerprint}; install the matching weights")
    return backbone


def build_index(dataset: Dataset, checkpoint_dir: Path, out_dir: Path, *, config: IndexBuildConfig | None = None,
                features_store: Path | None = None, entity_features: FeatureTable | None = None,
                backbone: Backbone | None = None, progress: bool = True,
                engine: Engine | None = None) -> IndexBuildReport:
    """Build the index of `dataset.kb` for the model in `checkpoint_dir` at `out_dir` (atomically).

    `entity_features` gives the KB's features in KB row order instead of the store or the backbone;
    the backbone is then not loaded, so nothing checks that they come from the model's backbone.
    `engine` runs the entity-side encoding (default: in this process; `mmel.scale` for Ray), shard
    by shard (`retrieval/entity_encoding.py`); FAISS training and adding run here, exactly as without it.
    """
    started = time.perf_counter()
    config = config or IndexBuildConfig()
    kb = dataset.kb
    _check_buildable(dataset, features_store, entity_features)
    stages: dict[str, float] = {}
    with _stage(stages, "load_model"):
        spec = ModelSpec.read(checkpoint_dir)
        model = load_model(checkpoint_dir)
        backbone = load_checked_backbone(spec, backbone) if entity_features is None else None
    storage_dtype = config.storage_dtype(len(kb))
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp, torch.inference_mode():
        with _stage(stages, "entity_cache"):
            source: FeatureSource
            if entity_features is not None:
                source = TableFeatures(entity_features, config.encode_batch_size)
            elif features_store is not None:
                source = _stored_features(dataset, backbone, spec, features_store, config, progress)
            else:
                source = EncodedFeatures(list(kb), Path(dataset.root), spec, config.encode_batch_size, backbone)
            layout = CacheLayout.for_model(model, spec.max_text_length, spec.image_tokens)
            store = EntityCacheStore.create(tmp / CACHE_DIR, layout, storage_dtype)
            with store.new_segment(kb.qids, metadata={"images_root": str(Path(dataset.root).resolve())}) as segment:
                encoder = EntityShardEncoder(Path(checkpoint_dir), source, segment, config.vectors, model)
                vectors, with_image, report = encode_entity_side(encoder, len(kb), engine=engine, progress=progress)
        with _stage(stages, "vectors"):
            vectors_index = VectorIndex.build(vectors, kb.qids, config.vector_index_config(), progress=progress,
                                              metadata=_vector_metadata(spec))
            vectors_index.save(tmp / VECTORS_DIR)
        with _stage(stages, "entity_store"):
            EntityStore.create(tmp / ENTITIES_FILE, kb, progress=progress).close()
        if config.first_stage != "dense":
            with _stage(stages, "bm25"):
                BM25Index.build(kb, config.bm25_fields).save(tmp / BM25_DIR)  # type: ignore[arg-type]
        with _stage(stages, "model_and_manifest"):
            shutil.copytree(checkpoint_dir, tmp / MODEL_DIR)
            manifest = _new_manifest(spec, config, dataset, storage_dtype, vectors_index.kind, with_image)
            atomic_write_json(tmp / MANIFEST_FILE, manifest)
    built = IndexBuildReport(directory=out_dir, entities=len(kb), with_image=with_image,
                             first_stage=config.first_stage, vector_index=vectors_index.kind,
                             cache_dtype=storage_dtype, seconds=time.perf_counter() - started,
                             bytes_on_disk=_directory_bytes(out_dir), image_report=report, stage_seconds=stages,
                             recall_tuning=vectors_index.tuning)
    logger.info("%s", built.summary())
    return built


def read_manifest(index_dir: Path) -> dict[str, Any]:
    return read_versioned_manifest(index_dir, file_name=MANIFEST_FILE, format_name=FORMAT_NAME,
                                   format_version=FORMAT_VERSION, what="mmel link index",
                                   hint="build one with `mmel index build`")


def describe_index(index_dir: Path) -> dict[str, Any]:
    """Facts about an index from its files alone (no model or backbone loaded): `mmel index info`."""
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    vectors = read_index_manifest(index_dir / VECTORS_DIR)
    nil_path = index_dir / NIL_FILE
    return {"directory": str(index_dir), "entities": vectors["count"], "vector_index": vectors["kind"],
            "search_setting": vectors.get("search_setting"), "recall_tuning": vectors.get("tuning"),
            "nil_threshold": read_json(nil_path)["threshold"] if nil_path.is_file() else None,
            "bytes_on_disk": _directory_bytes(index_dir), "vectors": manifest.get("vectors", "backbone"),
            **{key: manifest[key] for key in ("model", "backbone", "preprocess", "kb", "first_stage", "reranker",
                                              "cache_dtype", "revision", "created", "mmel_version")},
            "last_changes": manifest.get("changes", [])[-5:]}


def write_manifest(index_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(Path(index_dir) / MANIFEST_FILE, manifest)


def record_change(manifest: dict[str, Any], **counts: int) -> None:
    """Bump the revision and log what changed (the KB checksum at build time stays as it was)."""
    manifest["revision"] = manifest.get("revision", 0) + 1
    log = manifest.setdefault("changes", [])
    log.append({"revision": manifest["revision"], "time": _now(), **counts})
    del log[:-CHANGE_LOG_LENGTH]


def _check_buildable(dataset: Dataset, features_store: Path | None, entity_features: FeatureTable | None) -> None:
    kb = dataset.kb
    if len(kb) == 0:
        raise DataError("the knowledge base is empty; nothing to index", path=dataset.root)
    if kb.duplicate_qids:
        raise DataError(f"{len(kb.duplicate_qids)} duplicate QIDs in the knowledge base, e.g. "
                        f"{list(kb.duplicate_qids[:5])}", path=dataset.root)
    if entity_features is not None and features_store is not None:
        raise UsageError("give entity features either as a feature store or as a table, not both")
    if entity_features is not None and len(entity_features) != len(kb):
        raise MismatchError(f"the entity feature table has {len(entity_features)} rows but the knowledge base has "
                            f"{len(kb)} entities; they must be in KB row order")


@contextmanager
def _stage(stages: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the block to `stages[name]`."""
    crash_point(f"index_build.{name}")
    started = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - started


def _stored_features(dataset: Dataset, backbone: Backbone, spec: ModelSpec, store_dir: Path,
                     config: IndexBuildConfig, progress: bool) -> StoredFeatures:
    """The store's entity features for the model (encoding only what the store lacks first), in KB order."""
    features = build_features(dataset, backbone, store_dir, template=spec.template.name,
                              entity_field=spec.template.entity_field, max_text_length=spec.max_text_length,
                              splits=[], progress=progress, extra_views=spec.views.entity_extra)
    if features.template != spec.template:
        raise MismatchError(f"{features.view_dir}: template {features.template} differs from the model's "
                            f"{spec.template}")
    return StoredFeatures(Path(store_dir), dataset.name, features.view_id, config.encode_batch_size)


def _vector_metadata(spec: ModelSpec) -> dict[str, Any]:
    return {"backbone_fingerprint": spec.backbone_fingerprint or "", "template": spec.template.to_dict(),
            "max_text_length": spec.max_text_length}


def _new_manifest(spec: ModelSpec, config: IndexBuildConfig, dataset: Dataset, storage_dtype: str,
                  vector_kind: str, with_image: int) -> dict[str, Any]:
    from mmel import __version__

    prior = config.prior(spec)
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "mmel_version": __version__, "created": _now(),
        "model": {"model_type": spec.model_type, "fingerprint": spec.fingerprint},
        "backbone": {"name": spec.backbone_name, "fingerprint": spec.backbone_fingerprint},
        "preprocess": {"template": spec.template.to_dict(), "max_text_length": spec.max_text_length},
        "kb": {"dataset": dataset.name, "checksum_at_build": kb_checksum(dataset.kb),
               "entities_at_build": len(dataset.kb), "with_image_at_build": with_image},
        "first_stage": config.first_stage, "reranker": config.reranker, "vectors": config.vectors,
        "vector_index": vector_kind,
        "bm25_fields": config.bm25_fields, "cache_dtype": storage_dtype,
        "name_prior_weight": prior.name_weight, "prior": prior.to_dict(),
        "build_config": config.to_dict(), "revision": 0, "changes": [],
    }


def _template_from(preprocess: dict[str, Any], *, source: Path) -> TextTemplate:
    """The checkpoint's text template: a registered name, or a full {name, mention_format, ...} object."""
    template = preprocess.get("template", DEFAULT_TEMPLATE)
    if isinstance(template, str):
        return get_template(template, preprocess.get("entity_field"))
    if isinstance(template, dict):
        try:
            return TextTemplate(**template)
        except TypeError as error:
            raise DataError(f"preprocess.template is malformed: {error}", path=source) from None
    raise DataError(f"preprocess.template must be a name or an object, got {template!r}", path=source)


def _directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in Path(directory).rglob("*") if path.is_file())


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


__all__ = ["FIRST_STAGES", "RERANKERS", "IndexBuildConfig", "IndexBuildReport", "ModelSpec", "build_index",
           "describe_index",
           "load_checked_backbone", "read_manifest",
           "weights_fingerprint", "write_manifest"]
