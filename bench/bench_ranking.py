"""Benchmark ranking a split against a whole KB with a trained model: naive, exhaustive and two-stage.

Variants, all on the same mentions in one run (issue 4, section 3):

- `naive exhaustive`: the published evaluation's cost model (`NaiveModelScorer`): for every batch of
  20 mentions and chunk of 6,000 entities, every unit runs from the features again, entity side
  included (models.md §1.9, step 2);
- `exhaustive`: `ModelScorer`, the entity side encoded once per KB (reported apart, as a one-off
  cost) and only the mention-entity interaction per block;
- `two-stage K`: the served linker (`Linker.rank_features` over an index built for the model from the
  same features, dense first stage): FAISS keeps the top K, the model reranks them, for K in --candidates;
- `rerank K=100, one mention per call` vs `batched`: the generic `MelModel.match_candidates` (a model
  call per mention) against MIMIC's batched one, on the same candidates.

Throughput is mentions per second, median of --repeats timed runs. KBs: a real dataset with its
feature store (WikiMEL, 18,880 entities), or `--synthetic N` entities of random features with the
model's widths and the store's shapes (L=40 text tokens, 49 image patches; one entity in four has an
image, drawn from a bank of 256 random image feature sets; values do not change the cost).

    python bench/bench_ranking.py --model checkpoints/mimic-wikimel-minilm_effnet \
        --data /work/data/wikimel --features /work/features/wikimel --out bench/results/ranking-wikimel.json
    python bench/bench_ranking.py --model checkpoints/mimic-wikimel-minilm_effnet --synthetic 100000 \
        --out bench/results/ranking-synthetic-100k.json
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench_encode import median_seconds
from bench_index import machine, unit_rows
from mmel.core.features import FeatureBatch, FeatureTable
from mmel.core.paths import atomic_write_json
from mmel.core.types import Dataset, Entity, KnowledgeBase, Mention
from mmel.data import load_dataset
from mmel.evaluation.protocols import gold_rows_for, rank_full_kb
from mmel.experiments.evaluate import RowSubset
from mmel.experiments.ranking import ModelScorer, NaiveModelScorer
from mmel.features.views import open_features
from mmel.models import load_model
from mmel.models.base import MelModel
from mmel.retrieval.index_build import IndexBuildConfig, build_index
from mmel.retrieval.linker import Linker

EVAL_MENTION_BATCH = 20     # the published evaluation's mentions per batch (models.md §1.8)
EVAL_ENTITY_CHUNK = 6_000   # ... and entities per chunk
TEXT_LENGTH = 40
PATCHES = 49
IMAGE_BANK = 256


class SyntheticFeatureTable:
    """Random features of the store's shapes for `count` rows, float16 in memory, generated in blocks."""

    def __init__(self, count: int, dims: dict[str, int], *, seed: int, image_share: float = 0.25):
        rng = np.random.default_rng(seed)
        self.text_global = unit_rows(rng.standard_normal((count, dims["text_dim"]), dtype=np.float32))
        self.text_tokens = np.empty((count, TEXT_LENGTH, dims["text_dim"]), dtype=np.float16)   # [N, L, Dt]
        for start in range(0, count, 10_000):
            stop = min(start + 10_000, count)
            self.text_tokens[start:stop] = rng.standard_normal((stop - start, TEXT_LENGTH, dims["text_dim"]),
                                                               dtype=np.float32)
        self.image_global = rng.standard_normal((IMAGE_BANK, dims["image_global_dim"]), dtype=np.float32)
        self.image_patches = rng.standard_normal((IMAGE_BANK, PATCHES, dims["image_patch_dim"]), dtype=np.float32)
        self.image_of_row = rng.integers(0, IMAGE_BANK, size=count)
        self.has_image = rng.random(count) < image_share

    def __len__(self) -> int:
        return len(self.text_global)

    def gather(self, rows: Sequence[int] | np.ndarray) -> FeatureBatch:
        rows = np.asarray(rows, dtype=np.int64)
        images = self.image_of_row[rows]
        return FeatureBatch(text_global=torch.from_numpy(self.text_global[rows]),
                            text_tokens=torch.from_numpy(self.text_tokens[rows].astype(np.float32)),
                            text_mask=torch.ones(len(rows), TEXT_LENGTH, dtype=torch.bool),
                            image_global=torch.from_numpy(self.image_global[images]),
                            image_patches=torch.from_numpy(self.image_patches[images]),
                            has_image=torch.from_numpy(self.has_image[rows]))

    def text_global_matrix(self) -> np.ndarray:
        return self.text_global


def _timed(run: Callable[[], Any], repeats: int) -> float:
    """Median of `repeats` timed runs, no warm-up (an exhaustive run is minutes long; the first call pays no setup)."""
    return median_seconds(run, repeats, warm_up=False)


def _real_kb(data: Path, features_dir: Path, split: str) -> tuple[FeatureTable, FeatureTable, np.ndarray, str]:
    dataset = load_dataset(data)
    features = open_features(features_dir, dataset.name)
    features.check_dataset(dataset)
    return (features.entities, features.mentions[split], gold_rows_for(dataset.split(split), dataset.kb),
            f"{dataset.name} {split}, KB {len(dataset.kb):,} (real features {features.backbone_fingerprint})")


def _synthetic_kb(count: int, mentions: int, dims: dict[str, int]) -> tuple[FeatureTable, FeatureTable,
                                                                             np.ndarray, str]:
    entities = SyntheticFeatureTable(count, dims, seed=0)
    queries = SyntheticFeatureTable(mentions, dims, seed=1)
    gold = np.random.default_rng(2).integers(0, count, size=mentions)
    return entities, queries, gold, f"synthetic KB {count:,} (random features of the store's shapes)"


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    dims = {"text_dim": model.config.text_dim, "image_global_dim": model.config.image_global_dim,
            "image_patch_dim": model.config.image_patch_dim}
    if args.synthetic:
        entities, all_mentions, all_gold, kb_name = _synthetic_kb(args.synthetic, args.mentions, dims)
    else:
        entities, all_mentions, all_gold, kb_name = _real_kb(args.data, args.features, args.split)
    rows = np.sort(np.random.default_rng(args.seed).choice(np.flatnonzero(all_gold >= 0), size=args.mentions,
                                                           replace=False))
    mentions, gold = RowSubset(all_mentions, rows), all_gold[rows]
    naive_rows = np.arange(min(args.naive_mentions, len(rows)))
    num_entities = len(entities)
    results: dict[str, Any] = {}

    def record(name: str, seconds: float, count: int, **extra: Any) -> None:
        results[name] = {"seconds": round(seconds, 3), "mentions": count,
                         "mentions_per_s": round(count / seconds, 3), **extra}
        print(f"{name:<40} {count / seconds:10.2f} mentions/s  ({seconds:.2f} s for {count})", flush=True)

    naive = NaiveModelScorer(model, entities, RowSubset(mentions, naive_rows))
    record("naive exhaustive", _timed(lambda: rank_full_kb(
        naive.score_block, gold[naive_rows], num_entities, mention_batch_size=EVAL_MENTION_BATCH,
        entity_chunk_size=EVAL_ENTITY_CHUNK, progress=False), args.naive_repeats), len(naive_rows))

    scorer = ModelScorer(model, entities, mentions, progress=False)
    started = time.perf_counter()
    scorer.entity_cache  # noqa: B018 - the one-off KB encoding, timed on its own
    results["kb_encoding_seconds"] = round(time.perf_counter() - started, 3)
    exhaustive_rows = naive_rows

    def exhaustive() -> None:
        cached = ModelScorer(model, entities, RowSubset(mentions, exhaustive_rows), progress=False,
                             entity_cache=scorer.entity_cache)
        rank_full_kb(cached.score_block, gold[exhaustive_rows], num_entities, mention_batch_size=EVAL_MENTION_BATCH,
                     entity_chunk_size=EVAL_ENTITY_CHUNK, progress=False)

    record("exhaustive (entity side once per KB)", _timed(exhaustive, args.naive_repeats),
           len(exhaustive_rows))

    with tempfile.TemporaryDirectory(prefix="bench-ranking-") as scratch:
        kb = KnowledgeBase([Entity(f"Q{row}", f"entity {row}") for row in range(num_entities)])
        build_index(Dataset(name="bench", kb=kb, splits={}, root=Path(scratch)), args.model, Path(scratch) / "index",
                    config=IndexBuildConfig(first_stage="dense"), entity_features=entities, progress=False)
        queries = [Mention(id=str(row), sentence="a mention", surface="mention") for row in rows]
        with Linker.load(Path(scratch) / "index") as linker:
            for k in args.candidates:
                record(f"two-stage dense top {k} (served linker)", _timed(lambda k=k: linker.rank_features(
                    queries, mentions, top_k=k, candidates_k=k), args.repeats), len(rows))

    _time_rerank_variants(model, scorer, rows, num_entities, args, record)
    return {"kb": kb_name, "kb_entities": num_entities, "model": str(args.model), "threads": args.threads,
            "repeats": args.repeats, "naive_repeats": args.naive_repeats, "results": results,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "machine": {**machine(), "torch": torch.__version__}}


def _time_rerank_variants(model: MelModel, scorer: ModelScorer, rows: np.ndarray, num_entities: int,
                          args: argparse.Namespace, record: Callable[..., None]) -> None:
    """The model's batched `match_candidates` against the generic one-mention-per-call version, K=100."""
    candidates = torch.as_tensor(np.random.default_rng(3).integers(0, num_entities, size=(len(rows), 100)))
    with torch.inference_mode():
        encoded = scorer.encoded_mentions(np.arange(len(rows)))
        cache = scorer.entity_cache
        record("rerank K=100, one mention per call", _timed(
            lambda: MelModel.match_candidates(model, encoded, cache, candidates), args.repeats), len(rows))
        record("rerank K=100, batched", _timed(
            lambda: model.match_candidates(encoded, cache, candidates), args.repeats), len(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="trained checkpoint directory")
    parser.add_argument("--data", type=Path, help="dataset directory (with --features)")
    parser.add_argument("--features", type=Path, help="feature store of --data")
    parser.add_argument("--split", default="test")
    parser.add_argument("--synthetic", type=int, default=0, help="entities of a synthetic KB instead of --data")
    parser.add_argument("--mentions", type=int, default=200, help="mentions ranked by two-stage and rerank runs")
    parser.add_argument("--naive-mentions", type=int, default=20, help="mentions ranked exhaustively (slow)")
    parser.add_argument("--candidates", type=int, nargs="+", default=[10, 50, 100, 200])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not args.synthetic and (args.data is None or args.features is None):
        parser.error("give --data and --features, or --synthetic N")
    report = run(args)
    if args.out:
        atomic_write_json(args.out, report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
