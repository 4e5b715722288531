"""Benchmark the first-stage vector index and the entity store on synthetic KBs of 10K to 1M entities.

Entity vectors are random unit vectors (D = 384 by default, MiniLM's width). A query is a noisy
copy of a random entity (cosine ~0.8 with it), so each query has an obvious right answer, and
the rest of its top-K is the hard, near-uniform tail of random high-dimensional data: the worst
case for approximate search, real embeddings cluster and are kinder.

Each (size, kind) runs in a fresh child process, so its peak RSS (getrusage) is its own. It counts
the input vectors too (the index is built from an in-memory [N, D] array). Measured per kind:
build time, size on disk, load time, single-query latency p50/p95 and batched throughput for each
K, recall@K against exact search, the rate at which the query's source entity is in the top-K,
time to add and to remove 1,000 entities, and peak RSS. The entity store (SQLite) gets its own
row: build time, size, and `get_many` latency for K QIDs (what a linker fetches per mention).

    python bench/bench_index.py                          # 10K and 100K
    python bench/bench_index.py --sizes 1000000 --kinds flat ivf --out bench/results/index-1m.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from mmel.core.paths import atomic_write_json
from mmel.core.types import Entity
from mmel.retrieval.index import IndexConfig, VectorIndex
from mmel.retrieval.kb_store import EntityStore

QUERY_NOISE = 0.75          # noise norm relative to the unit entity vector: cosine(query, source) ~ 0.8
CLUSTER_SPREAD = 1.0        # 'clustered' data: noise norm around a cluster centre (cosine to it ~ 0.7)
ENTITIES_PER_CLUSTER = 100
RECALL_QUERIES = 200        # queries whose exact top-K is computed for recall
BLOCK = 100_000             # entity rows generated per step
CHURN = 1_000               # entities added, then removed, to time incremental updates


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def synthetic_entities(count: int, dim: int, seed: int, data: str = "uniform") -> np.ndarray:
    """[N, D] unit vectors: uniform on the sphere, or around random centres ('clustered', closer to real text)."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng.standard_normal((max(1, count // ENTITIES_PER_CLUSTER), dim), dtype=np.float32))
    vectors = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, BLOCK):
        block = unit_rows(rng.standard_normal((min(BLOCK, count - start), dim), dtype=np.float32))
        if data == "clustered":
            block = unit_rows(centres[rng.integers(len(centres), size=len(block))] + CLUSTER_SPREAD * block)
        vectors[start:start + len(block)] = block
    return vectors


def noisy_queries(entities: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[Q, D] queries near random entities, and the rows [Q] of those source entities."""
    rng = np.random.default_rng(seed + 1)
    sources = rng.choice(len(entities), size=count, replace=False)
    noise = rng.standard_normal((count, entities.shape[1]), dtype=np.float32)
    noise *= QUERY_NOISE / np.linalg.norm(noise, axis=1, keepdims=True)
    queries = entities[sources] + noise
    return queries / np.linalg.norm(queries, axis=1, keepdims=True), sources


def exact_top_k(entities: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """[Q, k] rows of the exact nearest entities, best first (FAISS brute force, blocked, light on memory)."""
    _, rows = faiss.knn(queries, entities, k, metric=faiss.METRIC_INNER_PRODUCT)
    return rows


def current_rss_mib() -> float:
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def directory_mib(directory: Path) -> float:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file()) / 2**20


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(seconds, 50) * 1e3), "p95_ms": float(np.percentile(seconds, 95) * 1e3)}


def measure_searches(index: VectorIndex, queries: np.ndarray, sources: np.ndarray, exact: np.ndarray,
                     k: int, latency_queries: int, threads: int) -> dict[str, Any]:
    """Single-query latency (one FAISS thread, as a server thread would run it), batch throughput
    (`threads` threads), recall@k against exact search, and how often the source entity is in the top k."""
    faiss.omp_set_num_threads(1)
    latencies = []
    for query in queries[:latency_queries]:
        started = time.perf_counter()
        index.search(query[None], k)
        latencies.append(time.perf_counter() - started)
    faiss.omp_set_num_threads(threads)
    started = time.perf_counter()
    batch = index.search(queries, k)
    batch_seconds = time.perf_counter() - started
    found = [{int(qid[1:]) for qid in hits} for hits in batch.qids]
    recall = np.mean([len(hits & set(truth[:k].tolist())) / k for hits, truth in zip(found, exact, strict=False)])
    source_hits = np.mean([int(source) in hits for hits, source in zip(found, sources, strict=True)])
    return {"k": k, **percentiles_ms(latencies), "batch_mentions_per_s": len(queries) / batch_seconds,
            f"recall_at_{k}_vs_exact": float(recall), "source_in_top_k": float(source_hits)}


def timed(function, *arguments, **keywords) -> tuple[Any, float]:
    started = time.perf_counter()
    result = function(*arguments, **keywords)
    return result, time.perf_counter() - started


def run_index_case(size: int, kind: str, args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    """Build, save, reload, search and churn one index; runs in its own process.

    The entity array is freed before the reload, so `serving_rss_mib` is what a process that only
    loads and searches the index needs; `peak_rss_mib` includes the input vectors of the build.
    """
    faiss.omp_set_num_threads(args.threads)
    entities = synthetic_entities(size, args.dim, args.seed, args.data)
    queries, sources = noisy_queries(entities, args.queries, args.seed)
    exact = exact_top_k(entities, queries[:RECALL_QUERIES], max(args.k))            # [R, K]
    config = IndexConfig.from_dict({"kind": kind, **overrides})
    index, build_seconds = timed(VectorIndex.build, entities, [f"Q{row}" for row in range(size)], config,
                                 metadata={"kb_checksum": "synthetic"}, progress=False)
    del entities
    workdir = Path(tempfile.mkdtemp(prefix="mmel-bench-index-", dir=args.workdir))
    try:
        _, save_seconds = timed(index.save, workdir / "index")
        size_mib = directory_mib(workdir / "index")
        del index
        index, load_seconds = timed(VectorIndex.load, workdir / "index", expect={"kb_checksum": "synthetic"})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    latency_queries = args.latency_queries if kind != "flat" or size < 500_000 else args.latency_queries // 5
    searches = [measure_searches(index, queries, sources, exact, k, latency_queries, args.threads) for k in args.k]
    serving_rss = current_rss_mib()
    churn = synthetic_entities(CHURN, args.dim, args.seed + 99)
    churn_qids = [f"N{row}" for row in range(CHURN)]
    _, add_seconds = timed(index.add, churn, churn_qids)
    _, remove_seconds = timed(index.remove, churn_qids)
    return {"size": size, "kind": kind, "data": args.data, "config": config.to_dict(), "build_s": build_seconds,
            "save_s": save_seconds, "load_s": load_seconds, "disk_mib": size_mib, "searches": searches,
            "add_1k_s": add_seconds, "remove_1k_s": remove_seconds, "serving_rss_mib": serving_rss,
            "peak_rss_mib": peak_rss_mib()}


def run_store_case(size: int, args: argparse.Namespace) -> dict[str, Any]:
    """Build an entity store of `size` synthetic entities and time get_many for K QIDs."""
    entities = (Entity(qid=f"Q{row}", name=f"Entity {row}", attributes=f"Type: thing. Number: {row}.",
                       description=f"Synthetic entity number {row} for the benchmark.", images=(f"img/{row}.jpg",))
                for row in range(size))
    workdir = Path(tempfile.mkdtemp(prefix="mmel-bench-store-", dir=args.workdir))
    try:
        started = time.perf_counter()
        store = EntityStore.create(workdir / "entities.sqlite", entities, progress=False)
        build_seconds = time.perf_counter() - started
        rng = np.random.default_rng(args.seed)
        lookups = {}
        for k in args.k:
            latencies = []
            for _ in range(args.latency_queries):
                wanted = [f"Q{row}" for row in rng.choice(size, size=k, replace=False)]
                started = time.perf_counter()
                store.get_many(wanted)
                latencies.append(time.perf_counter() - started)
            lookups[k] = percentiles_ms(latencies)
        disk = directory_mib(workdir)
        store.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"size": size, "build_s": build_seconds, "disk_mib": disk, "get_many": lookups,
            "peak_rss_mib": peak_rss_mib()}


def in_child(function, *arguments) -> dict[str, Any]:
    """Run `function(*arguments)` in a fresh process so its peak RSS is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *arguments).result()


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    memory_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(memory_kib / 2**20, 1),
            "python": platform.python_version(), "faiss": faiss.__version__, "numpy": np.__version__,
            "load_average": [round(value, 2) for value in os.getloadavg()]}


def markdown(results: dict[str, Any]) -> str:
    ks = results["settings"]["k"]
    header = ("| N | kind | build s | disk MiB | load s | "
              + " | ".join(f"K={k} p50 / p95 ms | K={k} batch mentions/s | K={k} recall vs exact | K={k} source hit"
                           for k in ks)
              + " | add 1K s | remove 1K s | serving RSS MiB | peak RSS MiB |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for case in results["index"]:
        cells = [f"{case['size']:,}", case["kind"], f"{case['build_s']:.2f}", f"{case['disk_mib']:.0f}",
                 f"{case['load_s']:.2f}"]
        for search in case["searches"]:
            k = search["k"]
            cells += [f"{search['p50_ms']:.2f} / {search['p95_ms']:.2f}", f"{search['batch_mentions_per_s']:,.0f}",
                      f"{search[f'recall_at_{k}_vs_exact']:.3f}", f"{search['source_in_top_k']:.3f}"]
        cells += [f"{case['add_1k_s']:.2f}", f"{case['remove_1k_s']:.3f}", f"{case['serving_rss_mib']:,.0f}",
                  f"{case['peak_rss_mib']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if results["store"]:
        store_header = "| N | store build s | disk MiB | " + " | ".join(f"get_many({k}) p50 / p95 ms" for k in ks)
        lines += ["", store_header + " | peak RSS MiB |", "|" + "---|" * (len(ks) + 4)]
        for case in results["store"]:
            cells = [f"{case['size']:,}", f"{case['build_s']:.1f}", f"{case['disk_mib']:.0f}"]
            cells += [f"{case['get_many'][k]['p50_ms']:.2f} / {case['get_many'][k]['p95_ms']:.2f}" for k in ks]
            lines.append("| " + " | ".join([*cells, f"{case['peak_rss_mib']:,.0f}"]) + " |")
    return "\n".join(lines)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` IndexConfig overrides; values are parsed as JSON where they can be (numbers)."""
    overrides = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    IndexConfig.from_dict(overrides)  # fail fast on unknown keys
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivf"], choices=["flat", "hnsw", "ivf"])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--data", choices=["uniform", "clustered"], default="uniform",
                        help="uniform random unit vectors (worst case for ANN) or clustered ones")
    parser.add_argument("--k", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--queries", type=int, default=1_000, help="queries in the batched throughput run")
    parser.add_argument("--latency-queries", type=int, default=300, help="single queries timed for p50/p95")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="FAISS OpenMP threads")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="IndexConfig override, e.g. --set hnsw_ef_search=256 (repeatable)")
    parser.add_argument("--no-store", action="store_true", help="skip the entity store measurements")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where indexes are saved while measuring")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    overrides = parse_overrides(args.overrides)
    results: dict[str, Any] = {"machine": machine(), "settings": {
        "sizes": args.sizes, "kinds": args.kinds, "data": args.data, "dim": args.dim, "k": args.k,
        "queries": args.queries, "latency_queries": args.latency_queries, "threads": args.threads,
        "overrides": overrides, "query_noise": QUERY_NOISE, "recall_queries": RECALL_QUERIES}, "index": [], "store": []}
    started = time.perf_counter()
    for size in args.sizes:
        for kind in args.kinds:
            case = in_child(run_index_case, size, kind, args, overrides)
            print(f"N={size:,} {kind}: built in {case['build_s']:.1f} s, peak RSS {case['peak_rss_mib']:,.0f} MiB",
                  flush=True)
            results["index"].append(case)
        if not args.no_store:
            results["store"].append(in_child(run_store_case, size, args))
    results["total_s"] = time.perf_counter() - started
    machine_line = ", ".join(f"{key} {value}" for key, value in results["machine"].items())
    print(f"\n{machine_line}; D={args.dim}; total {results['total_s']:.0f} s\n")
    print(markdown(results))
    if args.out is not None:
        atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
