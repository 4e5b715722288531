"""Load test of `POST /link` on 127.0.0.1: concurrent clients against `mmel serve` in its own process.

Two comparisons, each variant served by a fresh `mmel serve` over the same index (in the order
A B, B A, A B... over the repeats, so that a drift in machine load hits both alike):

- `--compare batching`: one request per linker call (max_batch 1) against dynamic batching.
- `--compare noisy`: dynamic batching with every client valid, against the same number of clients
  of which one misbehaves: every `--noisy-every-s` seconds it sends a mention that is not in its
  sentence (the server answers 422). The server refuses such a query before it joins a batch, so
  the valid clients should keep their throughput and see no errors.

Each client sends dev mentions one after another (a closed loop), for `--duration-s` seconds or
until `--requests` have been sent. The report gives, per variant, the valid clients' requests/s
and p50/p95 latency, their outcomes by class (2xx, 4xx, 5xx, timeout, connection error), the
misbehaving client's statuses, the linker calls per batch size the server made, and the machine
with its load average (the machine may be shared: the load says what else ran).

    python bench/bench_server.py --index /work/index/wikimel --dataset /work/data/wikimel \
        --clients 8 --requests 160 --out bench/results/server-wikimel.json
    python bench/bench_server.py --index /work/index/wikimel --dataset /work/data/wikimel --compare noisy \
        --clients 50 --duration-s 60 --out bench/results/server-noisy-wikimel.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np
import torch

import mmel
from bench_index import machine
from mmel.core.paths import atomic_write_json
from mmel.data import load_dataset

STARTUP_TIMEOUT_S = 300     # loading a large index takes a while on a busy machine
REQUEST_TIMEOUT_S = 120


@dataclass(frozen=True)
class Variant:
    name: str
    max_batch: int
    noisy_every_s: float | None = None


@dataclass
class Tally:
    """What the valid clients got back, and what the misbehaving one did."""

    latencies_s: list[float] = field(default_factory=list)          # of valid requests answered 2xx
    outcomes: Counter[str] = field(default_factory=Counter)          # valid requests by class: 2xx, 4xx, 5xx, ...
    noisy_statuses: Counter[str] = field(default_factory=Counter)    # by status, or "timeout"...
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, outcome: str, latency_s: float) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if outcome == "2xx":
                self.latencies_s.append(latency_s)


class SharedWork:
    """The bodies to send, shared by all clients: cycled for a timed run, the first `requests` of them otherwise."""

    def __init__(self, bodies: list[dict], duration_s: float | None, requests: int):
        cycled = itertools.cycle(bodies)
        self._source = cycled if duration_s is not None else itertools.islice(cycled, requests)
        self._lock = threading.Lock()

    def next_body(self) -> dict | None:
        with self._lock:
            return next(self._source, None)


@contextlib.contextmanager
def mmel_serve(index: Path, port: int, options: list[str], *, stop: signal.Signals = signal.SIGINT) -> Iterator[str]:
    """`mmel serve INDEX OPTIONS` in a child process on 127.0.0.1:port; yields its URL once /health answers.

    Its log goes to a temporary file (a pipe nobody reads would fill up and stall the server). It is
    stopped with `stop` (uvicorn shuts down gracefully on SIGINT; Ray Serve replicas on SIGTERM).
    """
    command = [sys.executable, "-m", "mmel", "serve", str(index), "--host", "127.0.0.1", "--port", str(port),
               *options]
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_until_up(server, url, log)
            yield url
        finally:
            server.send_signal(stop)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _wait_until_up(server: subprocess.Popen, url: str, log: IO[str]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"mmel serve exited with {server.returncode}: {log.read()[-2000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"mmel serve did not answer within {STARTUP_TIMEOUT_S} s")


def post(client: httpx.Client, body: dict) -> str:
    """POST /link; the answer's status, or what went wrong on the way."""
    try:
        return str(client.post("/link", json=body).status_code)
    except httpx.TimeoutException:
        return "timeout"
    except httpx.TransportError:
        return "connection error"


def valid_client(client: httpx.Client, work: SharedWork, deadline: float, tally: Tally) -> None:
    """Send the next body as soon as the previous answer is in, until the work or the time runs out."""
    while time.monotonic() < deadline and (body := work.next_body()) is not None:
        started = time.perf_counter()
        status = post(client, body)
        tally.record(f"{status[0]}xx" if status.isdigit() else status, time.perf_counter() - started)


def noisy_client(client: httpx.Client, body: dict, every_s: float, done: threading.Event, tally: Tally) -> None:
    """Every `every_s` seconds until `done`, a query whose mention is not in its sentence (the server says 422)."""
    bad = {**body, "mention": "a mention that is not in the sentence"}
    while not done.wait(every_s):
        status = post(client, bad)
        with tally.lock:
            tally.noisy_statuses[status] += 1


def one_run(url: str, bodies: list[dict], clients: int, variant: Variant, duration_s: float | None,
            requests: int) -> dict[str, Any]:
    """One load run against the server at `url`: `clients` threads in all, one of them noisy in a noisy variant."""
    valid = clients - (variant.noisy_every_s is not None)
    work = SharedWork(bodies, duration_s, requests)
    tally = Tally()
    done = threading.Event()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        _warm_up(client, bodies[:valid])
        deadline = time.monotonic() + (duration_s if duration_s is not None else 10 * 3600)
        threads = [threading.Thread(target=valid_client, args=(client, work, deadline, tally)) for _ in range(valid)]
        if variant.noisy_every_s is not None:
            threads.append(threading.Thread(target=noisy_client, daemon=True,
                                            args=(client, bodies[0], variant.noisy_every_s, done, tally)))
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads[:valid]:
            thread.join()
        wall = time.perf_counter() - started
        done.set()
        for thread in threads[valid:]:
            thread.join(timeout=REQUEST_TIMEOUT_S)
        health = client.get("/health").json()
    latencies = np.array(tally.latencies_s) if tally.latencies_s else np.array([float("nan")])
    return {"valid_clients": valid, "wall_s": wall, "valid_requests_per_s": tally.outcomes["2xx"] / wall,
            "p50_ms": 1000 * float(np.percentile(latencies, 50)), "p95_ms": 1000 * float(np.percentile(latencies, 95)),
            "valid_outcomes": dict(sorted(tally.outcomes.items())),
            "noisy_statuses": dict(sorted(tally.noisy_statuses.items())),
            "linker_calls_by_batch_size": health.get("link_calls_by_batch_size", {}),
            "server_index": health.get("index"), "load_average_after": [round(v, 2) for v in os.getloadavg()]}


def _warm_up(client: httpx.Client, bodies: list[dict]) -> None:
    """A first concurrent round, not counted: model pages, thread pools and connections are ready afterwards."""
    threads = [threading.Thread(target=client.post, args=("/link",), kwargs={"json": body}) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def mmel_source() -> dict[str, Any]:
    """Which mmel the server ran: its directory, and the git commit with any uncommitted changes under it."""
    directory = Path(mmel.__file__).parent

    def git(*arguments: str) -> str | None:
        done = subprocess.run(["git", "-C", str(directory), *arguments], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    changed = git("status", "--porcelain", "--", ".")
    return {"directory": str(directory), "commit": git("rev-parse", "HEAD"),
            "uncommitted_changes": None if changed is None else bool(changed)}


def variants_for(compare: str, max_batch: int, noisy_every_s: float) -> list[Variant]:
    if compare == "batching":
        return [Variant("one request per linker call", 1), Variant(f"dynamic batching (up to {max_batch})", max_batch)]
    return [Variant(f"all clients valid, dynamic batching (up to {max_batch})", max_batch),
            Variant(f"one client invalid every {noisy_every_s:g} s", max_batch, noisy_every_s)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, required=True, help="dataset whose --split mentions are sent")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--compare", choices=("batching", "noisy"), default="batching")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients in all (a noisy one included)")
    parser.add_argument("--requests", type=int, default=160, help="valid requests per run (without --duration-s)")
    parser.add_argument("--duration-s", type=float, help="run each variant this long instead of --requests")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--noisy-every-s", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--candidates-k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    mentions = [m for m in load_dataset(args.dataset).split(args.split) if m.surface in m.sentence]
    bodies = [{"sentence": m.sentence, "mention": m.surface, "top_k": args.top_k, "candidates_k": args.candidates_k}
              for m in mentions]
    variants = variants_for(args.compare, args.max_batch, args.noisy_every_s)
    runs: dict[str, list[dict[str, Any]]] = {variant.name: [] for variant in variants}
    load_before = [round(v, 2) for v in os.getloadavg()]
    for repeat in range(args.repeats):
        for variant in variants if repeat % 2 == 0 else variants[::-1]:   # A B, B A, ...: drift hits both alike
            with mmel_serve(args.index, args.port,
                            ["--max-batch", str(variant.max_batch), "--threads", str(args.threads)]) as url:
                run = one_run(url, bodies, args.clients, variant, args.duration_s, args.requests)
            runs[variant.name].append(run)
            shown = {k: round(v, 1) if isinstance(v, float) else v for k, v in run.items() if k != "server_index"}
            print(variant.name, shown, flush=True)
    summary = {name: {key: statistics.median(run[key] for run in results)
                      for key in ("valid_requests_per_s", "p50_ms", "p95_ms")} for name, results in runs.items()}
    first, second = (summary[variant.name]["valid_requests_per_s"] for variant in variants)
    report = {"compare": args.compare, "index": str(args.index), "dataset": str(args.dataset), "split": args.split,
              "distinct_mentions": len(bodies), "clients": args.clients, "duration_s": args.duration_s,
              "requests": None if args.duration_s else args.requests, "max_batch": args.max_batch,
              "noisy_every_s": args.noisy_every_s if args.compare == "noisy" else None, "top_k": args.top_k,
              "candidates_k": args.candidates_k, "server_threads": args.threads, "repeats": args.repeats,
              "median": summary, "runs": runs, "throughput_ratio": second / first,
              "load_average_before": load_before, "mmel_source": mmel_source(),
              "machine": {**machine(), "torch": torch.__version__}}
    print(f"throughput ratio ({variants[1].name} / {variants[0].name}): {report['throughput_ratio']:.3f}")
    if args.out:
        atomic_write_json(args.out, report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
