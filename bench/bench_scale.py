"""Scale-out on one machine: the batch commands on the local engine and on Ray with 1 and 2 workers, in one run.

Four measurements (each its own sub-command, all in one report with `all`):

- `startup`: Ray's fixed cost. Starting a private single-node Ray (`ray.init`), starting N worker
  actors and running a first map on them (process start + importing torch, transformers, mmel),
  a second map on the warm actors, and the shutdown; each repeated on a fresh Ray.
- `features`: `build_features` of a synthetic dataset (rendered images) with the offline backbone
  (MiniLM + EfficientNet-Lite0) into a fresh store, per engine: wall time, items/s, the speed-up
  over the local engine, and the per-worker rates (texts/s, images/s of worker time). The Ray
  stores are checked to hold the same cache files as the local one.
- `link`: `link_mention_files` of the first `--count` mentions of a mentions file with an index,
  per engine: wall time (workers open the index inside it), mentions/s and the speed-up; the Ray
  outputs are checked to be byte-identical to the local engine's.
- `serve`: `mmel serve --engine ray --replicas R` for R in 1, 2 (and plain `mmel serve` for
  reference), each under the same closed-loop load of concurrent clients (bench_server.py's).

Variants run one after another in this process (a fresh Ray per Ray variant), so a shared
machine's load hits them in turn, not alike: the report records the load average. Worker actors
get 1 CPU each and `--threads` torch threads (default 1, the local engine too: the same thread count
gives bit-identical features, and "local" is then the one-core baseline).

    python bench/bench_scale.py all --index /work/index/wikimel --dataset /work/data/wikimel \\
        --out bench/results/scale-2cores.json
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench_index import machine
from bench_server import Variant, mmel_serve, one_run
from mmel.backbones import load_backbone
from mmel.core.engine import Engine, LocalEngine
from mmel.core.paths import atomic_write_json
from mmel.data import load_dataset
from mmel.data.mention_files import read_mentions_file
from mmel.data.synthetic import generate_dataset
from mmel.features.store import build_features
from mmel.retrieval.jobs import link_mention_files
from mmel.retrieval.linker import Linker

ENGINES = ("local", "ray-1", "ray-2")


@dataclass(frozen=True)
class ImportOnly:
    """Worker factory for the start-up measurement: imports what a feature worker imports (torch, transformers,
    mmel), then returns its shards unchanged."""

    def __call__(self):
        import mmel.features.shard_encoder  # noqa: F401

        return lambda shard: shard


def open_engine(name: str) -> tuple[Engine, float]:
    """The engine called `name` and the seconds it took to start (Ray: a private single-node Ray)."""
    started = time.perf_counter()
    if name == "local":
        return LocalEngine(), 0.0
    from mmel.scale.ray_engine import RayEngine

    engine = RayEngine(int(name.split("-")[1]))
    return engine, time.perf_counter() - started


def measure_startup(workers: int, repeats: int) -> dict[str, Any]:
    from mmel.scale.ray_engine import RayEngine

    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine = RayEngine(workers)
        connected = time.perf_counter()
        list(engine.map_shards(ImportOnly(), list(range(workers))))
        first_map = time.perf_counter()
        list(engine.map_shards(ImportOnly(), list(range(workers))))
        second_map = time.perf_counter()
        engine.close()
        runs.append({"ray_init_s": connected - started, "first_map_s": first_map - connected,
                     "warm_map_s": second_map - first_map, "shutdown_s": time.perf_counter() - second_map})
    median = {key: round(statistics.median(run[key] for run in runs), 3) for key in runs[0]}
    return {"workers": workers, "repeats": repeats, "median": median, "runs": runs}


def measure_features(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    dataset = generate_dataset(args.entities, mentions_per_split={"test": args.mentions}, seed=0,
                               out_dir=workdir / "synthetic", image_size=64)
    backbone = load_backbone("minilm_effnet")

    def build(engine: Engine, store: Path) -> dict[str, Any]:
        report = build_features(dataset, backbone, store, shard_size=args.shard_size, engine=engine,
                                num_threads=args.threads, progress=False).report
        items = report.texts_encoded + report.images_encoded
        return {"wall_s": round(report.wall_seconds, 2), "items_per_s": round(items / report.wall_seconds, 2),
                "texts_per_s_per_worker": round(report.texts_per_second, 1),
                "images_per_s_per_worker": round(report.images_per_second, 2),
                "same_cache_as_local": same_files(workdir / "store-local-1-warm" / "cache", store / "cache"),
                "texts": report.texts_encoded, "images": report.images_encoded}

    results = per_engine(lambda engine, run: build(engine, workdir / f"store-{engine.name}-{engine.num_workers}-{run}"),
                         "items_per_s")
    return {"dataset": dataset.name, "entities": args.entities, "mentions": args.mentions,
            "shard_size": args.shard_size, "backbone": "minilm_effnet", "torch_threads_per_worker": args.threads,
            "engines": results}


def measure_link(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    mentions_file = args.dataset / "mentions" / f"{args.split}.jsonl"
    lines = mentions_file.read_text(encoding="utf-8").splitlines(keepends=True)[:args.count]
    workdir.mkdir(parents=True)
    source = workdir / "mentions.jsonl"
    source.write_text("".join(lines), encoding="utf-8")
    count = len(read_mentions_file(source, args.dataset))
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    Linker.load(args.index).close()
    open_s = time.perf_counter() - started
    reference = workdir / "links-local-1-warm.jsonl"

    def link(engine: Engine, run: str) -> dict[str, Any]:
        output = workdir / f"links-{engine.name}-{engine.num_workers}-{run}.jsonl"
        started = time.perf_counter()
        link_mention_files(args.index, source, output, engine=engine, images_root=args.dataset, top_k=args.top_k,
                           chunk_size=args.chunk_size, num_threads=args.threads, progress=False)
        wall = time.perf_counter() - started
        return {"wall_s": round(wall, 2), "mentions_per_s": round(count / wall, 2),
                "same_output_as_local": output.read_bytes() == reference.read_bytes()}

    return {"index": str(args.index), "mentions_file": str(mentions_file), "mentions": count, "top_k": args.top_k,
            "chunk_size": args.chunk_size, "torch_threads_per_worker": args.threads,
            "index_open_s": round(open_s, 2), "engines": per_engine(link, "mentions_per_s")}


def per_engine(run_on: Any, rate: str) -> dict[str, Any]:
    """`run_on(engine, run)` for each engine: the local one once ("warm": this process has everything
    imported), each Ray one twice on the same workers, "cold" (worker processes starting, importing
    torch and mmel) then "warm" (only the worker rebuilt). Speed-ups compare the warm runs."""
    results: dict[str, Any] = {}
    for name in ENGINES:
        engine, start_s = open_engine(name)
        try:
            cold = run_on(engine, "cold") if name != "local" else None
            warm = run_on(engine, "warm")
        finally:
            engine.close()
        results[name] = {"engine_start_s": round(start_s, 2), **warm,
                         **({"cold_wall_s": cold["wall_s"]} if cold else {})}
        print(name, results[name], flush=True)
    for name in ENGINES:
        results[name]["speedup_vs_local"] = round(results[name][rate] / results["local"][rate], 2)
    return results


def measure_serve(args: argparse.Namespace) -> dict[str, Any]:
    mentions = [m for m in load_dataset(args.dataset).split(args.split) if m.surface in m.sentence]
    bodies = [{"sentence": m.sentence, "mention": m.surface, "top_k": args.top_k} for m in mentions]
    variants = {"mmel serve (uvicorn, no Ray)": [], "ray serve, 1 replica": ["--engine", "ray", "--replicas", "1"],
                "ray serve, 2 replicas": ["--engine", "ray", "--replicas", "2"]}
    results: dict[str, Any] = {}
    for name, options in variants.items():
        with mmel_serve(args.index, args.port, [*options, "--threads", "1", "--max-batch", str(args.max_batch)],
                        stop=signal.SIGTERM) as url:
            results[name] = one_run(url, bodies, args.clients, Variant(name, args.max_batch), None, args.requests)
        print(name, {k: round(v, 1) if isinstance(v, float) else v for k, v in results[name].items()}, flush=True)
    base = results["ray serve, 1 replica"]["valid_requests_per_s"]
    return {"index": str(args.index), "split": args.split, "clients": args.clients, "requests": args.requests,
            "max_batch": args.max_batch, "top_k": args.top_k, "variants": results,
            "two_replicas_vs_one": round(results["ray serve, 2 replicas"]["valid_requests_per_s"] / base, 3)}


def same_files(left: Path, right: Path) -> bool:
    """Whether two trees hold the same files with the same bytes."""
    names = sorted(p.relative_to(left) for p in left.rglob("*") if p.is_file())
    return names == sorted(p.relative_to(right) for p in right.rglob("*") if p.is_file()) and all(
        filecmp.cmp(left / name, right / name, shallow=False) for name in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("startup", "features", "link", "serve", "all"))
    parser.add_argument("--index", type=Path, help="link index for `link` and `serve`")
    parser.add_argument("--dataset", type=Path, help="dataset whose --split mentions `link` and `serve` send")
    parser.add_argument("--split", default="test")
    parser.add_argument("--count", type=int, default=1200, help="mentions linked per engine")
    parser.add_argument("--chunk-size", type=int, default=32, help="mentions per chunk (the unit of a worker)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--entities", type=int, default=1500, help="synthetic KB size for `features`")
    parser.add_argument("--mentions", type=int, default=500, help="synthetic mentions for `features`")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker, the local engine's too "
                                                                "(equal threads give equal features)")
    parser.add_argument("--shard-size", type=int, default=128, help="texts per feature shard (images: 1/8)")
    parser.add_argument("--startup-repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--port", type=int, default=8799)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report: dict[str, Any] = {"command": " ".join(sys.argv), "machine": {**machine(), "torch": torch.__version__}}
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        if args.what in ("startup", "all"):
            report["startup"] = {str(n): measure_startup(n, args.startup_repeats) for n in (1, 2)}
            print("startup", {n: r["median"] for n, r in report["startup"].items()}, flush=True)
        if args.what in ("features", "all"):
            report["features"] = measure_features(args, workdir / "features")
        if args.what in ("link", "all"):
            report["link"] = measure_link(args, workdir / "link")
        if args.what in ("serve", "all"):
            report["serve"] = measure_serve(args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    if args.out:
        atomic_write_json(args.out, report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
