"""The app behind a real uvicorn server on 127.0.0.1, called over HTTP with httpx."""

from __future__ import annotations

import httpx


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
