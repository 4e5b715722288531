"""What `mmel enrich descriptions` costs per 1,000 entities: requests, tokens and wall time.

No real LLM is reachable where this runs, so the endpoint is the tests' chat-completions server
(tests/enrich/chat_server.py, a real HTTP server on 127.0.0.1) answering every entity with a
description of `--answer-words` words after `--latency` seconds. The KB is the 990 real WikiMEL
entities of examples/wikimel-mini, so prompts have real lengths. Token counts are the server's
`usage` field (it counts whitespace-separated words; BPE tokenizers give about 1.3 tokens per
English word) next to the client's --dry-run estimate (4 characters per token). Each scenario is
the real command in a fresh process (start-up included), then the same command again, answered
from the cache.

    python bench/bench_enrich.py --out bench/results/enrich.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "enrich"))

from chat_server import ChatServer  # noqa: E402  (the tests' server, not part of the package)

KB = REPO / "examples" / "wikimel-mini"


def run_enrich(server: ChatServer, out: Path, cache: Path, concurrency: int, *extra: str) -> tuple[float, str]:
    """Run the CLI in a fresh process; returns (wall seconds, stdout)."""
    command = [sys.executable, "-m", "mmel", "enrich", "descriptions", str(KB), "--out", str(out), "--base-url",
               server.url, "--model", "bench-model", "--cache", str(cache), "--concurrency", str(concurrency),
               "--rps", "1000", "--no-progress", *extra]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, check=True)
    return time.perf_counter() - started, result.stdout


def scenario(latency: float, concurrency: int, answer_words: int, work: Path) -> dict[str, object]:
    server = ChatServer().start()
    server.delay_s, server.answer_words = latency, answer_words
    try:
        cache, out = work / f"cache-{latency}-{concurrency}.sqlite", work / f"plus-{latency}-{concurrency}"
        _, dry = run_enrich(server, out, cache, concurrency, "--dry-run")
        first_s, _ = run_enrich(server, out, cache, concurrency)
        provenance = json.loads((out / "enrichment.json").read_text())["steps"][0]
        rerun_s, rerun = run_enrich(server, out, cache, concurrency)
    finally:
        server.stop()
    entities = provenance["entities"]
    per_1000 = 1000 / entities
    counts = provenance["counts"]
    return {"latency_s": latency, "concurrency": concurrency, "answer_words": answer_words, "entities": entities,
            "requests": sum(server.requests.values()), "answered": counts["answered"], "failed": counts["failed"],
            "dry_run_estimate": json.loads(dry.strip().splitlines()[-1]),
            "per_1000": {"requests": round(sum(server.requests.values()) * per_1000),
                         "prompt_words": round(counts["prompt_tokens"] * per_1000),
                         "completion_words": round(counts["completion_tokens"] * per_1000),
                         "wall_s": round(first_s * per_1000, 1), "rerun_wall_s": round(rerun_s * per_1000, 1)},
            "rerun_answered_from_cache": "answered 0," in rerun}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, nargs="+", default=[0.0, 0.2], help="Server seconds per request.")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--answer-words", type=int, default=60, help="Words per answer (a 2-3 sentence description).")
    parser.add_argument("--out", type=Path, help="Write the results here as JSON.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        results = [scenario(latency, args.concurrency, args.answer_words, Path(work)) for latency in args.latency]
    report = {"machine": f"{platform.machine()}, {platform.python_version()}", "scenarios": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
