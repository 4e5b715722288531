"""The app behind a real uvicorn server on 127.0.0.1, called over HTTP with httpx."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from mmel.server.app import create_app
from mmel.server.settings import ServerSettings


def test_real_server_links_over_http(running_server, tiny_index):
    sentence, mention, qid = tiny_index.queries[3]
    with httpx.Client(base_url=running_server, timeout=30) as client:
        assert client.get("/health").json()["status"] == "ok"
        response = client.post("/link", json={"sentence": sentence, "mention": mention, "top_k": 3})
        assert response.status_code == 200
        assert response.json()["candidates"][0]["qid"] == qid
        form = client.post("/link", data={"sentence": sentence, "mention": mention}, files={"image": ("x.png", b"??")})
        assert form.status_code == 422 and "cannot be used" in form.json()["detail"]
        assert client.get("/entities/Q308/image/0").headers["content-type"] == "image/jpeg"
        assert client.get("/").headers["content-type"].startswith("text/html")


def test_concurrent_link_requests_are_joined_into_one_linker_call(shared_linker, tiny_index, serve_app):
    settings = ServerSettings(index_dir=tiny_index.index_dir, max_batch=4, link_batch_wait_ms=2000)
    queries = tiny_index.queries[:4]
    expected = [shared_linker.link(sentence, mention=mention, top_k=3) for sentence, mention, _ in queries]
    with serve_app(create_app(settings, linker=shared_linker)) as url, httpx.Client(base_url=url, timeout=60) as client:
        def post(body: dict) -> httpx.Response:
            return client.post("/link", json=body)

        with ThreadPoolExecutor(max_workers=4) as pool:
            responses = list(pool.map(post, [{"sentence": s, "mention": m, "top_k": 3} for s, m, _ in queries]))
        assert [r.status_code for r in responses] == [200] * 4
        for response, alone in zip(responses, expected, strict=True):
            assert [c["qid"] for c in response.json()["candidates"]] == [c.qid for c in alone.candidates]
            assert [c["score"] for c in response.json()["candidates"]] == pytest.approx(
                [c.score for c in alone.candidates], abs=1e-4)
        assert client.get("/health").json()["link_calls_by_batch_size"] == {"4": 1}

        sentence, mention, qid = queries[0]
        with ThreadPoolExecutor(max_workers=2) as pool:
            good, bad = pool.map(post, [{"sentence": sentence, "mention": mention, "top_k": 3},
                                        {"sentence": sentence, "mention": "not in the sentence"}])
        assert good.status_code == 200 and good.json()["candidates"][0]["qid"] == qid
        assert bad.status_code == 422 and "does not occur" in bad.json()["detail"]
