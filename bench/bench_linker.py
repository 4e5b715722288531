"""Benchmark the whole linker (dense first stage + MIMIC rerank) on synthetic KBs of 10K to 1M entities.

Per KB size N, fresh child processes, so that each peak RSS (getrusage) is its own; the
settings to compare (`--variant NAME:key=value,...`, default `before` = the settings up to issue
14 and `after` = today's defaults) each get their own build and serve children in the same run. A
variant may name its own model (`checkpoint=DIR`), so that two models are timed side by side, e.g.
DIM's own index against MIMIC two-stage:
`--variant mimic: --variant dim:checkpoint=checkpoints/dim-wikimel-minilm_effnet,vectors=model,reranker=none`.

- prepare: the KB and the query sample, encoded once per checkpoint for all its variants.
- build: `build_index` (dense first stage, MIMIC reranker) from precomputed entity features; time
  per stage, size on disk per part, peak RSS, the vector index's tuned setting and its recall.
- serve: `Linker.load`, single-mention `Linker.link` latency p50/p95 and `Linker.link_batch`
  throughput for each K (first-stage candidates reranked by MIMIC; top 10 returned), the same
  queries' encoding alone (backbone, independent of N and K), serving RSS (anonymous + the mapped
  cache pages touched), and the first stage's recall@K of the gold.
- reference: the same model ranking a sample of the same mentions against every entity, with the
  first variant's reranker cache read block by block from its index (so 1M fits), the "gold at
  rank 1 when exhaustive ranking finds it" reference the two-stage linker is compared with.

Features. Encoding a million entity texts and images with the backbone is out of reach on a CPU,
so entity features are synthetic, with the shapes the checkpoint's backbone gives (MiniLM +
EfficientNet: text [384] + tokens [40, 384], image [1280] + patches [49, 1280]): clustered unit
global text vectors (about 100 entities per centre), token, patch and image vectors drawn from
small pools. Every row is a hash of its row number, so any subset can be regenerated in any order.
The queries are real: sentences (and, for two thirds, rendered pictures) of `generate_mentions`
encoded by the real backbone inside `Linker.link`, and each query's gold entity is planted in the
KB as a noisy copy of its mention's features (global text cosine ~0.8, as in bench_index.py).
So a query has a right answer for the first stage to find, and the rest of its candidates are
random. Timings do not depend on the feature values (except for IVF list sizes); the gold and
agreement rates check the harness and are not accuracy figures.

    python bench/bench_linker.py --sizes 100000 1000000 --threads 2 --out bench/results/linker-issue14.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from bench_index import (
    current_rss_mib,
    directory_mib,
    in_child,
    machine,
    peak_rss_mib,
    percentiles_ms,
    timed,
    unit_rows,
)
from mmel.backbones.base import Backbone
from mmel.core.features import FeatureBatch
from mmel.core.paths import atomic_write_bytes, atomic_write_json, read_json
from mmel.core.types import Dataset, KnowledgeBase, LinkResult, Mention
from mmel.data.synthetic import generate_kb, generate_mentions, render_image
from mmel.evaluation.protocols import rank_full_kb
from mmel.features.encoding import encode_items
from mmel.features.templates import extra_view_texts
from mmel.models import load_model
from mmel.retrieval.entity_cache import CacheLayout, EntityCacheStore
from mmel.retrieval.index import VectorIndex
from mmel.retrieval.index_build import (
    CACHE_DIR,
    VECTORS_DIR,
    IndexBuildConfig,
    ModelSpec,
    build_index,
    load_checked_backbone,
)
from mmel.retrieval.linker import LINK_BATCH_SIZE, Linker, MentionQuery

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "mimic-wikimel-minilm_effnet"
TOP_K = 10                   # entities a link returns (names fetched from SQLite)
ENTITIES_PER_CLUSTER = 100   # global text vectors: one random centre per this many entities
CLUSTER_SPREAD = 1.0         # noise norm around a centre (cosine to it ~0.7), as in bench_index.py
QUERY_NOISE = 0.75           # planted gold = mention features + noise of this relative norm (cosine ~0.8)
POOL_ROWS = 256              # token, patch and image vector sets the random entities draw from
NOISE_POOL_ROWS = 4096       # two pools whose sums make every entity's own global text noise
ENTITY_IMAGE_SHARE = 0.7     # random entities with an image (the others are scored without VDLU)
MENTION_SPLIT = "bench"
QUERIES_DIR = "queries"
INDEX_DIR = "index"
MASK64 = (1 << 64) - 1


DEFAULT_VARIANTS = ("before:ivf_num_probes=16,cache_dtype=float16", "after:")


@dataclass(frozen=True)
class Variant:
    """A named set of IndexBuildConfig overrides (plain strings, as typed on the command line), and the
    checkpoint it links with when not the run's (`checkpoint=DIR`)."""

    name: str
    index_options: tuple[tuple[str, str], ...] = ()
    checkpoint: str | None = None   # resolved path

    @classmethod
    def parse(cls, text: str) -> Variant:
        name, _, options = text.partition(":")
        pairs = [tuple(item.split("=", 1)) for item in options.split(",") if item]
        if not name or any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"--variant takes NAME:key=value,key=value, got {text!r}")
        checkpoints = [str(Path(value).resolve()) for key, value in pairs if key == "checkpoint"]
        index_options = tuple(pair for pair in pairs if pair[0] != "checkpoint")
        return cls(name=name, index_options=index_options,  # type: ignore[arg-type]
                   checkpoint=checkpoints[-1] if checkpoints else None)


@dataclass(frozen=True)
class Settings:
    """What every child needs to know; plain data, so it crosses the process boundary."""

    checkpoint: Path
    ks: tuple[int, ...]
    latency_queries: int
    batch_queries: int
    exhaustive_pairs: int          # mention x entity pairs the exhaustive reference may score per size
    exhaustive_max_entities: int   # its whole-KB cache is float32 in memory: 19 KB per entity
    threads: int
    seed: int
    index_options: tuple[tuple[str, str], ...] = ()   # IndexBuildConfig overrides of every variant (`--index-set`)
    variants: tuple[Variant, ...] = (Variant("default"),)

    def index_config(self, variant: Variant) -> IndexBuildConfig:
        """Dense first stage unless the options say otherwise (`--index-set vectors=model ...`), then the variant's."""
        options = {"first_stage": "dense", **dict(self.index_options), **dict(variant.index_options)}
        # values read as YAML scalars, like `mmel train --set`: "16" -> 16, "0.995" -> 0.995, "int8" -> "int8"
        return IndexBuildConfig.from_dict({key: yaml.safe_load(value) for key, value in options.items()})

    def checkpoint_of(self, variant: Variant) -> Path:
        return Path(variant.checkpoint) if variant.checkpoint else self.checkpoint

    def record(self) -> dict[str, Any]:
        """The settings as JSON-ready data, for the results file."""
        return {**dataclasses.asdict(self), "checkpoint": str(self.checkpoint)}

    @property
    def checkpoints(self) -> list[Path]:
        """The distinct checkpoints the variants link with, in variant order (each prepares its own queries)."""
        return list(dict.fromkeys(self.checkpoint_of(variant) for variant in self.variants))

    def queries_dir(self, workdir: Path, variant: Variant) -> Path:
        return queries_dir(workdir, self.checkpoints.index(self.checkpoint_of(variant)))

    @property
    def sample_size(self) -> int:
        return max(self.latency_queries, self.batch_queries)

    def exhaustive_mentions(self, size: int) -> int:
        """Mentions the exhaustive reference ranks at this size (0 = not affordable)."""
        if size > self.exhaustive_max_entities:
            return 0
        return min(self.batch_queries, self.exhaustive_pairs // size)


# --- synthetic entity features --------------------------------------------------------------------

def mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a well-spread 64-bit hash of each value (uint64 arithmetic wraps)."""
    z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def noisy_copy(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`values` plus Gaussian noise whose norm along the last axis is QUERY_NOISE times that of each vector."""
    noise = torch.nn.functional.normalize(torch.randn(values.shape, generator=generator), dim=-1)
    return values + QUERY_NOISE * values.norm(dim=-1, keepdim=True) * noise


def planted_copies(mentions: FeatureBatch, seed: int) -> FeatureBatch:
    """The planted gold entities: noisy copies of their mentions' features (unit global text vector)."""
    generator = torch.Generator().manual_seed(seed)
    return FeatureBatch(text_global=torch.nn.functional.normalize(noisy_copy(mentions.text_global, generator), dim=-1),
                        text_tokens=noisy_copy(mentions.text_tokens, generator),
                        text_mask=mentions.text_mask.clone(),
                        image_global=noisy_copy(mentions.image_global, generator),
                        image_patches=noisy_copy(mentions.image_patches, generator),
                        has_image=mentions.has_image.clone())


class SyntheticEntityFeatures:
    """A FeatureTable of `size` synthetic entities, with planted rows (see the module docstring).

    `planted` [G] replaces the text features of rows `planted_rows` [G], and their image features
    where the planted row has an image. `generation_seconds` adds up the time spent in `gather`.
    """

    def __init__(self, size: int, *, text_length: int, spec_dims: dict[str, int], seed: int,
                 planted_rows: np.ndarray, planted: FeatureBatch):
        rng = np.random.default_rng([seed, 7])
        text_dim = spec_dims["text_dim"]
        self.size = size
        self._salt = np.uint64(int(mix64(np.array([seed]))[0]))
        self._centres = unit_rows(rng.standard_normal((max(1, size // ENTITIES_PER_CLUSTER), text_dim),
                                                      dtype=np.float32))
        self._noise_a = rng.standard_normal((NOISE_POOL_ROWS, text_dim), dtype=np.float32)
        self._noise_b = rng.standard_normal((NOISE_POOL_ROWS, text_dim), dtype=np.float32)
        self._tokens = rng.standard_normal((POOL_ROWS, text_length, text_dim), dtype=np.float32)
        self._image_global = rng.standard_normal((POOL_ROWS, spec_dims["image_global_dim"]), dtype=np.float32)
        self._patches = rng.standard_normal((POOL_ROWS, spec_dims["num_patches"], spec_dims["image_patch_dim"]),
                                            dtype=np.float32)
        self._planted_position = {int(row): position for position, row in enumerate(planted_rows)}
        self._planted = planted
        self.generation_seconds = 0.0

    def __len__(self) -> int:
        return self.size

    def gather(self, rows: Any) -> FeatureBatch:
        started = time.perf_counter()
        rows = np.asarray(rows, dtype=np.int64)
        hashes = mix64(rows.astype(np.uint64) ^ self._salt)                                      # [B]
        pool = ((hashes >> np.uint64(36)) % np.uint64(POOL_ROWS)).astype(np.int64)               # [B]
        image_pool = ((hashes >> np.uint64(44)) % np.uint64(POOL_ROWS)).astype(np.int64)         # [B]
        has_image = ((hashes >> np.uint64(52)) % np.uint64(1000)).astype(np.int64) < 1000 * ENTITY_IMAGE_SHARE
        batch = FeatureBatch(text_global=torch.from_numpy(self._text_global(hashes)),
                             text_tokens=torch.from_numpy(self._tokens[pool]),
                             text_mask=torch.ones(len(rows), self._tokens.shape[1], dtype=torch.bool),
                             image_global=torch.from_numpy(self._image_global[image_pool]),
                             image_patches=torch.from_numpy(self._patches[image_pool]),
                             has_image=torch.from_numpy(has_image))
        self._plant(rows, batch)
        self.generation_seconds += time.perf_counter() - started
        return batch

    def text_global_matrix(self) -> np.ndarray:
        """[N, Dt] global text vectors without their planted rows replaced (the FeatureTable protocol)."""
        return self._text_global(mix64(np.arange(self.size, dtype=np.uint64) ^ self._salt))

    def _text_global(self, hashes: np.ndarray) -> np.ndarray:
        """[B, Dt] unit vectors around the entities' cluster centres."""
        centre = (hashes % np.uint64(len(self._centres))).astype(np.int64)
        noise_a = ((hashes >> np.uint64(12)) % np.uint64(NOISE_POOL_ROWS)).astype(np.int64)
        noise_b = ((hashes >> np.uint64(24)) % np.uint64(NOISE_POOL_ROWS)).astype(np.int64)
        noise = unit_rows(self._noise_a[noise_a] + self._noise_b[noise_b])
        return unit_rows(self._centres[centre] + CLUSTER_SPREAD * noise)

    def _plant(self, rows: np.ndarray, batch: FeatureBatch) -> None:
        """Overwrite, in place, the planted rows of `batch` with their planted features."""
        for position, row in enumerate(rows.tolist()):
            source = self._planted_position.get(row)
            if source is None:
                continue
            for name in ("text_global", "text_tokens", "text_mask"):
                getattr(batch, name)[position] = getattr(self._planted, name)[source]
            if self._planted.has_image[source]:
                for name in ("image_global", "image_patches", "has_image"):
                    getattr(batch, name)[position] = getattr(self._planted, name)[source]


# --- the query sample -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Query:
    """One benchmark mention: what `Linker.link` is given, and its gold entity."""

    mention: Mention
    visual: dict[str, Any] | None

    @property
    def gold_row(self) -> int:
        return int(str(self.mention.gold_qid)[1:])   # generate_kb's QIDs are S<row>

    def image(self) -> Image.Image | None:
        return render_image(self.visual) if self.visual is not None else None

    def as_link_query(self) -> MentionQuery:
        return MentionQuery(sentence=self.mention.sentence, span=self.mention.span, image=self.image(),
                            id=self.mention.id)

    def record(self) -> dict[str, Any]:
        return {"id": self.mention.id, "sentence": self.mention.sentence, "surface": self.mention.surface,
                "span": list(self.mention.span or ()), "gold_qid": self.mention.gold_qid, "visual": self.visual}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Query:
        mention = Mention(id=record["id"], sentence=record["sentence"], surface=record["surface"],
                          span=tuple(record["span"]), gold_qid=record["gold_qid"])
        return cls(mention=mention, visual=record["visual"])


def sample_queries(kb: KnowledgeBase, count: int, seed: int) -> list[Query]:
    """`count` synthetic mentions with distinct gold entities (each gold is planted once)."""
    queries: list[Query] = []
    golds: set[str] = set()
    for mention in generate_mentions(kb, MENTION_SPLIT, 4 * count, seed=seed):
        if mention.gold_qid not in golds:
            golds.add(str(mention.gold_qid))
            queries.append(Query(mention=mention, visual=mention.extra.get("visual")))
        if len(queries) == count:
            return queries
    raise ValueError(f"a KB of {len(kb)} entities cannot give {count} mentions with distinct gold entities")


def encode_queries(backbone: Backbone, spec: ModelSpec, queries: list[Query],
                   images: list[Image.Image | None]) -> FeatureBatch:
    """The queries' features as the linker computes them (same texts, images and batches)."""
    parts = []
    for start in range(0, len(queries), LINK_BATCH_SIZE):
        stop = start + LINK_BATCH_SIZE
        mentions = [query.mention for query in queries[start:stop]]
        parts.append(encode_items(backbone, [spec.template.mention_text(mention) for mention in mentions],
                                  images[start:stop], max_text_length=spec.max_text_length,
                                  extra_texts=extra_view_texts(spec.views, "mention", mentions)))
    return FeatureBatch.concat(parts)


def queries_dir(workdir: Path, checkpoint_number: int) -> Path:
    """Where the query sample encoded for the run's `checkpoint_number`-th checkpoint lives."""
    return workdir / f"{QUERIES_DIR}-{checkpoint_number}"


def save_queries(directory: Path, queries: list[Query], features: FeatureBatch) -> None:
    atomic_write_json(directory / "queries.json", [query.record() for query in queries])
    atomic_write_bytes(directory / "features.safetensors", save_tensors(features.to_tensors()))


def load_queries(directory: Path) -> tuple[list[Query], FeatureBatch]:
    queries = [Query.from_record(record) for record in read_json(directory / "queries.json")]
    return queries, FeatureBatch.from_tensors(load_tensors((directory / "features.safetensors").read_bytes()))


def entity_table(size: int, spec: ModelSpec, backbone_dims: dict[str, int], seed: int, queries: list[Query],
                 query_features: FeatureBatch) -> SyntheticEntityFeatures:
    return SyntheticEntityFeatures(size, text_length=spec.max_text_length, spec_dims=backbone_dims, seed=seed,
                                   planted_rows=np.array([q.gold_row for q in queries]),
                                   planted=planted_copies(query_features, seed))


def backbone_dims(features: FeatureBatch) -> dict[str, int]:
    return {**features.dims, "num_patches": features.image_patches.shape[1]}


# --- the three children ---------------------------------------------------------------------------

def rss_parts_mib() -> dict[str, float]:
    """Resident memory now: anonymous (heap, FAISS, tensors) and file-backed (mapped code and cache files).

    File-backed pages of the memory-mapped reranker cache count in RSS once touched, but the kernel
    can drop them at any time; the anonymous part is what the process really holds.
    """
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {name: int(status[key].split()[0]) / 1024 for name, key in (("anon", "RssAnon"), ("file", "RssFile"))}


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def run_prepare(size: int, settings: Settings, workdir: Path, checkpoint_number: int = 0,
                backbone: Backbone | None = None) -> dict[str, Any]:
    """Sample the queries of this KB size and encode them with the real backbone, as the run's
    `checkpoint_number`-th checkpoint reads them (once for all its variants; the same sample for all)."""
    set_threads(settings.threads)
    checkpoint = settings.checkpoints[checkpoint_number]
    spec = ModelSpec.read(checkpoint)
    kb = generate_kb(size, seed=settings.seed)
    queries = sample_queries(kb, settings.sample_size, settings.seed)
    with torch.inference_mode():
        features, encode_seconds = timed(encode_queries, load_checked_backbone(spec, backbone), spec, queries,
                                         [query.image() for query in queries])
    directory = queries_dir(workdir, checkpoint_number)
    directory.mkdir(parents=True, exist_ok=True)
    save_queries(directory, queries, features)
    return {"size": size, "checkpoint": str(checkpoint), "queries": len(queries),
            "query_sample_encode_s": encode_seconds}


def run_build(size: int, settings: Settings, workdir: Path, variant: Variant) -> dict[str, Any]:
    """Build the variant's index of the synthetic KB (golds planted) under `workdir`."""
    set_threads(settings.threads)
    checkpoint = settings.checkpoint_of(variant)
    spec = ModelSpec.read(checkpoint)
    kb, kb_seconds = timed(generate_kb, size, seed=settings.seed)
    queries, features = load_queries(settings.queries_dir(workdir, variant))
    table = entity_table(size, spec, backbone_dims(features), settings.seed, queries, features)
    dataset = Dataset(name=f"synthetic-{size}", kb=kb, splits={}, root=workdir)
    index = workdir / f"{INDEX_DIR}-{variant.name}"
    report = build_index(dataset, checkpoint, index, config=settings.index_config(variant),
                         entity_features=table, progress=False)
    stages = dict(report.stage_seconds)
    stages["entity_cache"] -= table.generation_seconds
    disk = {part: directory_mib(index / part) for part in ("entity_cache", "vectors", "model")}
    disk["entities.sqlite"] = (index / "entities.sqlite").stat().st_size / 2**20
    return {"size": size, "variant": variant.name, "checkpoint": str(checkpoint), "kb_generation_s": kb_seconds,
            "build_s": report.seconds - table.generation_seconds, "synthetic_features_s": table.generation_seconds,
            "stages_s": stages, "vector_index": report.vector_index, "cache_dtype": report.cache_dtype,
            "recall_tuning": report.recall_tuning, "index_config": settings.index_config(variant).to_dict(),
            "with_image": report.with_image, "disk_mib": directory_mib(index), "disk_parts_mib": disk,
            "rss_parts_at_end_mib": rss_parts_mib(), "peak_rss_mib": peak_rss_mib()}


def gold_rank(result: LinkResult, gold_qid: str | None) -> int | None:
    """1-based rank of the gold entity among the returned candidates, None when it is not among them."""
    return next((candidate.rank for candidate in result.candidates if candidate.qid == gold_qid), None)


def link_rates(results: list[LinkResult], queries: list[Query]) -> dict[str, float]:
    ranks = [gold_rank(result, query.mention.gold_qid) for result, query in zip(results, queries, strict=True)]
    return {"gold_at_1": float(np.mean([rank == 1 for rank in ranks])),
            f"gold_in_top_{TOP_K}": float(np.mean([rank is not None for rank in ranks]))}


def rotated(names: list[Any], turn: int) -> list[Any]:
    """`names` starting at position `turn`: each measurement leads in turn, so drifting load hits all alike."""
    shift = turn % len(names)
    return names[shift:] + names[:shift]


def measure_serving(linker: Linker, spec: ModelSpec, queries: list[Query], link_queries: list[MentionQuery],
                    ks: tuple[int, ...], latency_queries: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Latency (one mention per call) and throughput (the linker's batches) of query encoding alone and of
    linking with each K, interleaved query by query and batch by batch, since the machine is shared.

    `Linker.link` is `link_batch` of one query, so single mentions go through `link_batch` too.
    """
    images = [query.image for query in link_queries]

    def encode(start: int, stop: int) -> FeatureBatch:
        return encode_queries(linker.backbone, spec, queries[start:stop], images[start:stop])

    def link_with(k: int) -> Callable[[int, int], list[LinkResult]]:
        return lambda start, stop: linker.link_batch(link_queries[start:stop], top_k=TOP_K, candidates_k=k)

    tasks: dict[Any, Callable[[int, int], Any]] = {"encode": encode, **{k: link_with(k) for k in ks}}
    latencies: dict[Any, list[float]] = {name: [] for name in tasks}
    batch_seconds = dict.fromkeys(tasks, 0.0)
    linked: dict[int, list[LinkResult]] = {k: [] for k in ks}
    with torch.inference_mode():
        for position in range(min(latency_queries, len(queries))):
            for name in rotated(list(tasks), position):
                latencies[name].append(timed(tasks[name], position, position + 1)[1])
        for turn, start in enumerate(range(0, len(queries), LINK_BATCH_SIZE)):
            for name in rotated(list(tasks), turn):
                output, seconds = timed(tasks[name], start, start + LINK_BATCH_SIZE)
                batch_seconds[name] += seconds
                if name != "encode":
                    linked[name].extend(output)
    encoding = {**percentiles_ms(latencies["encode"]), "batch_mentions_per_s": len(queries) / batch_seconds["encode"]}
    searches = [{"k": k, **percentiles_ms(latencies[k]), "batch_mentions_per_s": len(queries) / batch_seconds[k],
                 **link_rates(linked[k], queries),
                 "top1_qids": [result.candidates[0].qid if result.candidates else None for result in linked[k]]}
                for k in ks]
    return encoding, searches


def run_serve(size: int, settings: Settings, workdir: Path, variant: Variant,
              backbone: Backbone | None = None) -> dict[str, Any]:
    """Open the variant's index and time linking; the queries' images are rendered beforehand (not timed)."""
    set_threads(settings.threads)
    queries, features = load_queries(settings.queries_dir(workdir, variant))
    queries = queries[:settings.batch_queries]
    config = settings.index_config(variant)
    spec = ModelSpec.read(settings.checkpoint_of(variant))
    backbone, backbone_seconds = timed(load_checked_backbone, spec, backbone)
    index = workdir / f"{INDEX_DIR}-{variant.name}"
    linker, load_seconds = timed(Linker.load, index, backbone=backbone)
    with linker:
        link_queries = [query.as_link_query() for query in queries]
        linker.link_batch(link_queries[:LINK_BATCH_SIZE], top_k=TOP_K, candidates_k=max(settings.ks))   # warm-up
        encoding, searches = measure_serving(linker, spec, queries, link_queries, settings.ks,
                                             settings.latency_queries)
        serving_rss, serving_parts = current_rss_mib(), rss_parts_mib()
    # With the model's own vectors (DIM) the index holds the model's entity vectors, which the query's
    # backbone vector is not comparable with: the linker's gold rates are then its only measure.
    recall = (None if config.vectors == "model" else
              first_stage_recall(index / VECTORS_DIR, features.text_global[:len(queries)].numpy(), queries,
                                 settings.ks))
    return {"size": size, "variant": variant.name, "backbone_load_s": backbone_seconds, "index_load_s": load_seconds,
            "encoding": encoding, "searches": searches, "serving_rss_mib": serving_rss,
            "serving_rss_parts_mib": serving_parts, "first_stage_recall": recall, "peak_rss_mib": peak_rss_mib(),
            "gold_qids": [query.mention.gold_qid for query in queries]}


def first_stage_recall(vectors_dir: Path, query_vectors: np.ndarray, queries: list[Query],
                       ks: tuple[int, ...]) -> dict[str, float]:
    """Share of queries whose gold the dense first stage returns in its top K, per K (after serving: not in RSS)."""
    found = VectorIndex.load(vectors_dir).search(query_vectors, max(ks))
    golds = [query.mention.gold_qid for query in queries]
    return {str(k): float(np.mean([gold in hits[:k] for gold, hits in zip(golds, found.qids, strict=True)]))
            for k in ks}


class IndexCacheScorer:
    """The model's scores of mentions against entity rows, the entity side read from an index's reranker cache."""

    def __init__(self, checkpoint: Path, index_dir: Path, mention_features: FeatureBatch, size: int):
        spec = ModelSpec.read(checkpoint)
        self.model = load_model(checkpoint).eval()
        layout = CacheLayout.for_model(self.model, spec.max_text_length, spec.image_tokens)
        self.qids = [f"S{row}" for row in range(size)]   # generate_kb's QIDs, in KB row order
        self.cache = EntityCacheStore.open(index_dir / CACHE_DIR, layout, self.qids)
        self.mention_features = mention_features

    @torch.inference_mode()
    def score_block(self, mention_rows: np.ndarray, start: int, stop: int) -> torch.Tensor:
        mentions = self.model.encode_mentions(self.mention_features.select(torch.as_tensor(mention_rows)))
        return self.model.match(mentions, self.cache.gather(self.qids[start:stop])).scores   # [b, n]


def run_reference(size: int, settings: Settings, workdir: Path, variant: Variant) -> dict[str, Any]:
    """Rank the first queries against the whole KB with the same model, reading `variant`'s reranker cache."""
    set_threads(settings.threads)
    count = settings.exhaustive_mentions(size)
    queries, features = load_queries(settings.queries_dir(workdir, variant))
    scorer = IndexCacheScorer(settings.checkpoint_of(variant), workdir / f"{INDEX_DIR}-{variant.name}", features, size)
    gold = np.array([query.gold_row for query in queries[:count]])
    ranking, rank_seconds = timed(rank_full_kb, scorer.score_block, gold, size, top_k=1, progress=False)
    return {"size": size, "mentions": count, "cache_of": variant.name, "rank_s": rank_seconds,
            "mentions_per_s": count / rank_seconds, "gold_at_1": float(np.mean(ranking.num_greater == 0)),
            "top1_qids": [f"S{row}" for row in ranking.topk_rows[:, 0].tolist()], "peak_rss_mib": peak_rss_mib()}


# --- putting it together --------------------------------------------------------------------------

def compare(serve: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Two-stage (largest K) against the exhaustive reference on its mention sample.

    `gold_at_1_where_reference_finds_it`: of the sampled mentions whose gold the same model ranks
    first over the whole KB, the share the linker also ranks first (the issue's "gold at rank 1").
    The reference scores precomputed mention features; a linker built on it would encode its
    queries too, so the encoding time per mention is added to it for the speed ratio.
    """
    search = max(serve["searches"], key=lambda item: item["k"])
    count = reference["mentions"]
    golds = serve["gold_qids"][:count]
    linker_top1, reference_top1 = search["top1_qids"][:count], reference["top1_qids"]
    found = [ref == gold for ref, gold in zip(reference_top1, golds, strict=True)]
    kept = [top1 == gold for top1, gold, ok in zip(linker_top1, golds, found, strict=True) if ok]
    encode_per_mention = 1 / serve["encoding"]["batch_mentions_per_s"]
    exhaustive_per_mention = 1 / reference["mentions_per_s"] + encode_per_mention
    return {"k": search["k"], "mentions": count, "reference_gold_at_1": float(np.mean(found)),
            "gold_at_1_where_reference_finds_it": float(np.mean(kept)) if kept else None,
            "top1_agreement": float(np.mean([a == b for a, b in zip(linker_top1, reference_top1, strict=True)])),
            "speedup_end_to_end": exhaustive_per_mention * search["batch_mentions_per_s"]}


def run_size(size: int, settings: Settings, workdir_root: Path | None) -> dict[str, Any]:
    """Prepare the queries, then build and serve each variant, then the reference on the first variant's cache."""
    workdir = Path(tempfile.mkdtemp(prefix=f"mmel-bench-linker-{size}-", dir=workdir_root))
    case: dict[str, Any] = {"size": size, "load_average_at_start": list(os.getloadavg()), "variants": []}
    try:
        case["prepare"] = [in_child(run_prepare, size, settings, workdir, number)
                           for number in range(len(settings.checkpoints))]
        for variant in settings.variants:
            build = in_child(run_build, size, settings, workdir, variant)
            print(f"N={size:,} {variant.name}: built in {build['build_s']:.1f} s ({build['vector_index']}, cache "
                  f"{build['cache_dtype']}, {build['disk_mib']:,.0f} MiB, peak RSS {build['peak_rss_mib']:,.0f} MiB)",
                  flush=True)
            serve = in_child(run_serve, size, settings, workdir, variant)
            print(f"N={size:,} {variant.name}: " + ", ".join(
                f"K={s['k']} p50 {s['p50_ms']:.0f} ms, {s['batch_mentions_per_s']:.1f}/s" for s in serve["searches"])
                + f", recall {serve['first_stage_recall']}", flush=True)
            case["variants"].append({"name": variant.name, "build": build, "serve": serve, "comparison": None})
        case["reference"] = None
        if settings.exhaustive_mentions(size) > 0:
            case["reference"] = in_child(run_reference, size, settings, workdir, settings.variants[0])
            reference_model = settings.checkpoint_of(settings.variants[0])
            for variant, entry in zip(settings.variants, case["variants"], strict=True):
                if settings.checkpoint_of(variant) == reference_model:   # another model has its own exhaustive ranking
                    entry["comparison"] = compare(entry["serve"], case["reference"])
            print(f"N={size:,}: reference {case['reference']['mentions_per_s']:.2f} mentions/s", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    case["load_average_at_end"] = list(os.getloadavg())
    return case


def code_state() -> dict[str, Any]:
    """The commit measured and the source files that differed from it (the working tree is measured)."""
    root = Path(__file__).resolve().parent.parent

    def git(*arguments: str) -> str:
        return subprocess.run(["git", "-C", str(root), *arguments], capture_output=True, text=True,
                              check=False).stdout

    return {"commit": git("log", "-1", "--format=%h %s").strip(),
            "modified": [line[3:] for line in git("status", "--porcelain", "src").splitlines()]}


def markdown(results: dict[str, Any]) -> str:
    ks = results["settings"]["ks"]
    header = ("| N | variant | model | vector index (setting) | cache | build s (cache / vectors) | "
              "build peak RSS MiB | disk MiB | " + " | ".join(f"K={k} p50 / p95 ms | K={k} mentions/s" for k in ks)
              + " | encode only p50 ms | first-stage recall@K | gold@1 | serving RSS MiB (anon + file) | "
                "gold@1 where exhaustive finds it | reference gold@1 (mentions) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for case in results["cases"]:
        reference = case.get("reference")
        for entry in case["variants"]:
            build, serve, comparison = entry["build"], entry["serve"], entry["comparison"]
            stages, tuning = build["stages_s"], build.get("recall_tuning")
            setting = (f"{tuning['parameter']}={tuning['value']}" if tuning
                       else f"nprobe={build['index_config']['ivf_num_probes']}" if build["vector_index"] == "ivf"
                       else "exact")
            cells = [f"{case['size']:,}", entry["name"], Path(build["checkpoint"]).name,
                     f"{build['vector_index']} ({setting})", build["cache_dtype"],
                     f"{build['build_s']:.0f} ({stages['entity_cache']:.0f} / {stages['vectors']:.0f})",
                     f"{build['peak_rss_mib']:,.0f}", f"{build['disk_mib']:,.0f}"]
            for search in serve["searches"]:
                cells += [f"{search['p50_ms']:.0f} / {search['p95_ms']:.0f}", f"{search['batch_mentions_per_s']:.1f}"]
            parts, recall = serve["serving_rss_parts_mib"], serve["first_stage_recall"]
            cells += [f"{serve['encoding']['p50_ms']:.0f}",
                      "model vectors" if recall is None else " / ".join(f"{recall[str(k)]:.3f}" for k in ks),
                      f"{serve['searches'][-1]['gold_at_1']:.3f}",
                      f"{parts['anon'] + parts['file']:,.0f} ({parts['anon']:,.0f} + {parts['file']:,.0f})"]
            if comparison is None:
                cells += ["not run", ""]
            else:
                kept = comparison["gold_at_1_where_reference_finds_it"]
                cells += ["-" if kept is None else f"{kept:.3f}",
                          f"{comparison['reference_gold_at_1']:.3f} ({comparison['mentions']}, "
                          f"{reference['cache_of']} cache)"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--k", type=int, nargs="+", default=[50, 100], help="first-stage candidates reranked")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="a MIMIC checkpoint directory")
    parser.add_argument("--latency-queries", type=int, default=100, help="single links timed for p50/p95, per K")
    parser.add_argument("--batch-queries", type=int, default=256, help="mentions in the batched run, per K")
    parser.add_argument("--exhaustive-pairs", type=int, default=16_000_000,
                        help="mention x entity pairs the exhaustive reference may score per size")
    parser.add_argument("--exhaustive-max-entities", type=int, default=1_000_000,
                        help="largest KB ranked exhaustively (read block by block from the first variant's cache)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help=f"settings to compare, each built and served in the same run (default: "
                             f"{' '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--threads", type=int, default=1, help="torch and FAISS threads in every child")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where indexes are built while measuring")
    parser.add_argument("--index-set", action="append", default=[], metavar="KEY=VALUE",
                        help="an IndexBuildConfig setting (repeat); vectors=model reranker=none: DIM's own index")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    settings = Settings(checkpoint=args.checkpoint.resolve(), ks=tuple(args.k), latency_queries=args.latency_queries,
                        batch_queries=args.batch_queries, exhaustive_pairs=args.exhaustive_pairs,
                        exhaustive_max_entities=args.exhaustive_max_entities, threads=args.threads, seed=args.seed,
                        index_options=tuple(tuple(item.split("=", 1)) for item in args.index_set),
                        variants=tuple(Variant.parse(text) for text in args.variant or DEFAULT_VARIANTS))
    results: dict[str, Any] = {
        "machine": {**machine(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_at_start": list(os.getloadavg())},
        "code": code_state(),
        "settings": {**settings.record(), "top_k": TOP_K, "query_noise": QUERY_NOISE,
                     "entity_image_share": ENTITY_IMAGE_SHARE}}
    results["cases"], results["total_s"] = timed(lambda: [run_size(size, settings, args.workdir)
                                                          for size in args.sizes])
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    if args.out is not None:
        atomic_write_json(args.out, results)
    print(f"\n{json.dumps(results['machine'])}\ncode: {results['code']}; total {results['total_s']:.0f} s\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
