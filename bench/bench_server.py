"""Benchmark `POST /link` under concurrent clients: dynamic batching on (max_batch N) vs off (max_batch 1).

Both variants run in this process against one loaded index, behind a real uvicorn server on
127.0.0.1, alternating per repeat so that machine load hits both alike. Each run sends
--requests dev mentions from --clients concurrent clients and records throughput (requests/s) and
per-request latency p50/p95; the report keeps the median of --repeats runs and the linker calls
per batch size that the server made.

With --noisy-every-s S a third variant adds one misbehaving client to dynamic batching: every S
seconds it sends a mention that is not in its sentence (422). The server refuses such a query
before it joins a batch, so the well-behaved clients' throughput should stay that of plain
batching (before that fix, one bad query a second halved it: each failed joint call was re-linked
one request at a time).

    python bench/bench_server.py --index /work/index/wikimel --dataset /work/data/wikimel \
        --clients 8 --requests 160 --out bench/results/server-wikimel.json
    python bench/bench_server.py --index ... --dataset ... --clients 50 --requests 1000 --noisy-every-s 1
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import uvicorn

from bench_index import machine
from mmel.core.paths import atomic_write_json
from mmel.data import load_dataset
from mmel.retrieval.linker import Linker
from mmel.server.app import create_app
from mmel.server.running import uvicorn_config
from mmel.server.settings import ServerSettings


@contextlib.contextmanager
def serving(linker: Linker, settings: ServerSettings) -> Iterator[tuple[str, Any]]:
    """A uvicorn server in a thread; yields its URL and the app."""
    app = create_app(settings, linker=linker)
    server = uvicorn.Server(uvicorn_config(app, settings, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{settings.port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def one_run(linker: Linker, settings: ServerSettings, bodies: list[dict], clients: int,
            noisy_every_s: float | None = None) -> dict[str, Any]:
    with serving(linker, settings) as (url, app), httpx.Client(base_url=url, timeout=120) as client:
        def post(body: dict) -> float:
            started = time.perf_counter()
            response = client.post("/link", json=body)
            response.raise_for_status()
            return time.perf_counter() - started

        done = threading.Event()
        noisy_statuses: list[int] = []
        noisy = None
        if noisy_every_s is not None:
            noisy = threading.Thread(target=noisy_client, args=(client, bodies[0], noisy_every_s, done,
                                                                noisy_statuses), daemon=True)
            noisy.start()
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            latencies = list(pool.map(post, bodies))
        wall = time.perf_counter() - started
        done.set()
        if noisy is not None:
            noisy.join(timeout=130)
        calls = dict(sorted(app.state.batcher.stats.calls_by_size.items()))
    return {"requests_per_s": len(bodies) / wall, "p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "p95_ms": 1000 * float(np.percentile(latencies, 95)), "linker_calls_by_batch_size": calls,
            "noisy_requests_by_status": dict(sorted(Counter(noisy_statuses).items()))}


def noisy_client(client: httpx.Client, body: dict, every_s: float, done: threading.Event,
                 statuses: list[int]) -> None:
    """Every `every_s` seconds until `done`, a query whose mention is not in its sentence (the server says 422)."""
    bad = {**body, "mention": "a mention that is not in the sentence"}
    while not done.wait(every_s):
        statuses.append(client.post("/link", json=bad).status_code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, required=True, help="dataset whose --split mentions are sent")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--candidates-k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--noisy-every-s", type=float, help="add a variant with one client sending an invalid "
                                                             "query every this many seconds")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mentions = [m for m in load_dataset(args.dataset).split(args.split) if m.surface in m.sentence][:args.requests]
    bodies = [{"sentence": m.sentence, "mention": m.surface, "top_k": args.top_k, "candidates_k": args.candidates_k}
              for m in mentions]
    variants: dict[str, tuple[int, float | None]] = {
        "one request per linker call": (1, None), f"dynamic batching (up to {args.max_batch})": (args.max_batch, None)}
    if args.noisy_every_s is not None:
        variants[f"dynamic batching, one client invalid every {args.noisy_every_s:g} s"] = \
            (args.max_batch, args.noisy_every_s)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    with Linker.load(args.index) as linker:
        entities = len(linker)
        linker.link(bodies[0]["sentence"], mention=bodies[0]["mention"])     # warm-up
        for _ in range(args.repeats):
            for name, (max_batch, noisy_every_s) in variants.items():
                settings = ServerSettings(index_dir=args.index, port=args.port, max_batch=max_batch)
                runs[name].append(one_run(linker, settings, bodies, args.clients, noisy_every_s))
                print(name, {k: round(v, 1) if isinstance(v, float) else v for k, v in runs[name][-1].items()},
                      flush=True)
    summary = {name: {key: statistics.median(run[key] for run in results)
                      for key in ("requests_per_s", "p50_ms", "p95_ms")} for name, results in runs.items()}
    names = list(variants)
    report = {"index": str(args.index), "entities": entities, "clients": args.clients, "requests": len(bodies),
              "top_k": args.top_k, "candidates_k": args.candidates_k, "threads": args.threads,
              "repeats": args.repeats, "median": summary, "runs": runs,
              "throughput_ratio": summary[names[1]]["requests_per_s"] / summary[names[0]]["requests_per_s"],
              "machine": {**machine(), "torch": torch.__version__}}
    if args.noisy_every_s is not None:
        report["noisy_throughput_ratio"] = summary[names[2]]["requests_per_s"] / summary[names[1]]["requests_per_s"]
        print(f"throughput ratio (with a noisy client / without): {report['noisy_throughput_ratio']:.2f}")
    print(f"throughput ratio (batching / none): {report['throughput_ratio']:.2f}")
    if args.out:
        atomic_write_json(args.out, report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
