"""`mmel serve --replicas 2`: Ray Serve runs two replicas of the same app over one index, batching in each."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray")]

START_TIMEOUT_S = 300   # Ray, Serve's controller and proxy, and two replicas each opening the index
BATCH_WAIT_MS = 500     # long enough for concurrent requests to meet in a replica's batch


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ray_sessions_of(pid: int) -> list[Path]:
    """The session directories of a Ray that the process `pid` started (`mmel-ray-*` directories are per command)."""
    return list(Path("/tmp").glob(f"mmel-ray-*/session_*_{pid}"))


@contextlib.contextmanager
def replicated_server(index_dir: Path, log: Path) -> Iterator[tuple[str, int]]:
    """`mmel serve --replicas 2` in its own process; yields its URL and pid once /health answers; SIGTERM at the end."""
    port = free_port()
    command = [sys.executable, "-m", "mmel", "serve", str(index_dir), "--replicas", "2", "--port", str(port),
               "--threads", "1", "--max-batch", "8", "--batch-wait-ms", str(BATCH_WAIT_MS)]
    with log.open("w") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(url):
            assert server.poll() is None, f"mmel serve exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"mmel serve did not start: {log.read_text()[-3000:]}"
            time.sleep(1)
        yield url, server.pid
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


def _answers(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    return False


def test_two_replicas_answer_like_one_server_and_batch_in_each(shared_linker, tiny_index, tmp_path) -> None:
    queries = [{"sentence": s, "mention": m, "top_k": 3} for s, m, _ in tiny_index.queries]
    alone = [shared_linker.link(q["sentence"], mention=q["mention"], top_k=3) for q in queries]
    with replicated_server(tiny_index.index_dir, tmp_path / "serve.log") as (url, pid), \
            httpx.Client(base_url=url, timeout=120) as client:
        assert ray_sessions_of(pid)                 # it runs on a Ray of its own
        with ThreadPoolExecutor(max_workers=2 * len(queries)) as pool:
            responses = list(pool.map(lambda body: client.post("/link", json=body), queries * 2))
        assert [r.status_code for r in responses] == [200] * len(responses)
        for response, expected in zip(responses, alone * 2, strict=True):
            assert [c["qid"] for c in response.json()["candidates"]] == [c.qid for c in expected.candidates]
            assert [c["score"] for c in response.json()["candidates"]] == pytest.approx(
                [c.score for c in expected.candidates], abs=1e-4)
        batch = client.post("/link/batch", json={"queries": [{"sentence": q["sentence"], "mention": q["mention"]}
                                                             for q in queries[:3]], "top_k": 1})
        assert batch.status_code == 200, batch.text
        assert [r["candidates"][0]["qid"] for r in batch.json()["results"]] == [q for *_, q in tiny_index.queries[:3]]
        assert client.get("/entities/Q90").json()["name"] == "Paris"
        sizes = {int(size) for _ in range(20) for size in client.get("/health").json()["link_calls_by_batch_size"]}
        assert max(sizes) > 1                       # requests met in one replica's linker call
    assert ray_sessions_of(pid) == []               # which it stopped and removed
