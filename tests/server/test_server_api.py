"""The REST API through FastAPI's TestClient over the real tiny index: every endpoint, auth, limits,
and a barrage of bad input that must come back 4xx with a message, never 500."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mmel.server.app import create_app
from mmel.server.settings import ServerSettings

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SENTENCE = "Mercury sang Bohemian Rhapsody with Queen."


def make_client(linker, index_dir, **settings) -> TestClient:
    app = create_app(ServerSettings(index_dir=index_dir, **settings), linker=linker)
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(shared_linker, tiny_index):
    with make_client(shared_linker, tiny_index.index_dir, max_batch=4, max_body_bytes=300_000,
                     max_image_bytes=200_000, max_image_pixels=1_000_000, max_top_k=20) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def secured(shared_linker, tiny_index):
    with make_client(shared_linker, tiny_index.index_dir, token=TOKEN) as test_client:
        yield test_client


def png(size=(40, 30), colour=(180, 160, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width=50_000, height=50_000) -> bytes:
    """A PNG whose header claims 2.5 gigapixels (a decompression bomb), a few bytes long."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def assert_error(response, status: int, fragment: str = "") -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert detail, "an error needs a message"
    assert fragment in json.dumps(detail), detail


# --- endpoints ------------------------------------------------------------------------------------

def test_link_json(client):
    response = client.post("/link", json={"sentence": SENTENCE, "mention": "Mercury", "top_k": 3})
    assert response.status_code == 200
    body = response.json()
    assert body["mention"] == {"sentence": SENTENCE, "surface": "Mercury", "span": [0, 7]}
    assert [c["rank"] for c in body["candidates"]] == [1, 2, 3]
    best = body["candidates"][0]
    assert best["qid"] == "Q15869" and best["name"] == "Freddie Mercury"
    assert set(best["unit_scores"]) == {"tglu", "vdlu", "cmfu"} and best["image_count"] == 1
    assert "Queen" in best["text"] and body["nil"] is False


def test_link_by_span_and_multipart_image(client):
    by_span = client.post("/link", json={"sentence": SENTENCE, "span": [0, 7], "top_k": 2})
    assert by_span.json()["candidates"][0]["qid"] == "Q15869"
    form = {"sentence": SENTENCE, "span_start": "0", "span_end": "7", "top_k": "2"}
    upload = client.post("/link", data=form, files={"image": ("m.png", png(), "image/png")})
    assert upload.status_code == 200, upload.text
    assert upload.json()["candidates"][0]["unit_scores"]["vdlu"] != 0.0   # the uploaded image was used
    encoded = client.post("/link", json={"sentence": SENTENCE, "mention": "Mercury", "top_k": 2,
                                         "image_base64": base64.b64encode(png()).decode()})
    assert encoded.json()["candidates"][0]["score"] == pytest.approx(upload.json()["candidates"][0]["score"])


def test_link_batch(client, tiny_index):
    queries = [{"sentence": s, "mention": m} for s, m, _ in tiny_index.queries[:4]]
    response = client.post("/link/batch", json={"queries": queries, "top_k": 1})
    assert response.status_code == 200
    assert [r["candidates"][0]["qid"] for r in response.json()["results"]] == [q for *_, q in tiny_index.queries[:4]]


def test_entities_and_their_images(client):
    entity = client.get("/entities/Q308").json()
    assert entity == {"qid": "Q308", "name": "Mercury (planet)", "attributes": entity["attributes"],
                      "description": "", "image_count": 1}
    image = client.get("/entities/Q308/image/0")
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(image.content)).size == (96, 96)
    assert_error(client.get("/entities/Q-none"), 404, "Q-none")
    assert_error(client.get("/entities/Q308/image/3"), 404, "no usable image")
    assert_error(client.get("/entities/Q90/image/0"), 404)
    assert_error(client.get("/entities/Q308/image/-1"), 422)


def test_health_page_and_offline_docs(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["auth_required"] is False
    assert health["index"]["entities"] == 8 and health["index"]["model_type"] == "mimic"
    page = client.get("/")
    assert page.status_code == 200 and 'id="sentence"' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    assert "http" not in page.text.replace('"http-equiv"', "")     # nothing loaded from elsewhere
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/link", "/link/batch", "/entities/{qid}", "/entities/{qid}/image/{k}", "/health"} <= set(paths)
    assert "multipart/form-data" in paths["/link"]["post"]["requestBody"]["content"]


# --- auth -----------------------------------------------------------------------------------------

def test_bearer_token_guards_the_api(secured):
    body = {"sentence": SENTENCE, "mention": "Mercury"}
    assert_error(secured.post("/link", json=body), 401, "bearer token")
    assert_error(secured.post("/link", json=body, headers={"Authorization": "Bearer wrong-token-value"}), 403)
    assert_error(secured.post("/link", json=body, headers={"Authorization": f"Basic {TOKEN}"}), 401)
    assert_error(secured.get("/entities/Q90"), 401)
    assert_error(secured.get("/entities/Q308/image/0"), 401)
    assert_error(secured.post("/link/batch", json={"queries": [body]}), 401)
    assert secured.post("/link", json=body, headers=AUTH).status_code == 200
    assert secured.get("/entities/Q90", headers=AUTH).status_code == 200
    anonymous = secured.get("/health").json()
    assert anonymous["auth_required"] is True and anonymous["index"] is None
    assert secured.get("/health", headers=AUTH).json()["index"]["entities"] == 8
    assert secured.get("/").status_code == 200                      # the page loads, and asks for the token


# --- bad input: always 4xx with a message ---------------------------------------------------------

@pytest.mark.parametrize(("body", "status", "fragment"), [
    ({"sentence": SENTENCE}, 422, "exactly one"),
    ({"sentence": SENTENCE, "mention": "Mercury", "span": [0, 7]}, 422, "exactly one"),
    ({"sentence": "", "mention": "x"}, 422, "sentence"),
    ({"sentence": SENTENCE, "mention": "Pluto"}, 422, "does not occur"),
    ({"sentence": SENTENCE, "span": [3, 500]}, 422, "out of range"),
    ({"sentence": SENTENCE, "span": [3]}, 422, "span"),
    ({"sentence": SENTENCE, "span": ["a", "b"]}, 422, "span"),
    ({"sentence": 42, "mention": "Mercury"}, 422, "sentence"),
    ({"sentence": ["x"], "mention": "Mercury"}, 422, "sentence"),
    ({"sentence": SENTENCE, "mention": "Mercury", "top_k": 0}, 422, "top_k"),
    ({"sentence": SENTENCE, "mention": "Mercury", "top_k": 21}, 422, "limit of 20"),
    ({"sentence": SENTENCE, "mention": "Mercury", "top_k": "many"}, 422, "top_k"),
    ({"sentence": SENTENCE, "mention": "Mercury", "top_k": True}, 422, "top_k"),
    ({"sentence": SENTENCE, "mention": "Mercury", "candidates_k": "50"}, 422, "candidates_k"),
    ({"sentence": SENTENCE, "span": [True, 7]}, 422, "span"),
    ({"sentence": SENTENCE, "mention": "Mercury", "candidates_k": 10**6}, 422, "candidates_k"),
    ({"sentence": SENTENCE, "mention": "Mercury", "colour": "red"}, 422, "colour"),
    ({"sentence": "x" * 5001, "mention": "x"}, 422, "sentence"),
    ({"sentence": SENTENCE, "mention": "Mercury", "image_base64": "%%%not base64%%%"}, 422, "base64"),
    ({"sentence": SENTENCE, "mention": "Mercury", "image_base64": base64.b64encode(b"junk").decode()}, 422,
     "cannot be used"),
    ({"sentence": SENTENCE, "mention": "Mercury", "image_base64": base64.b64encode(bomb_png()).decode()}, 413,
     "too large"),
    ({"sentence": SENTENCE, "mention": "Mercury", "image_base64": base64.b64encode(png((1200, 1000))).decode()}, 413,
     "pixels"),
    ([1, 2, 3], 422, ""),
    ("just a string", 422, ""),
])
def test_bad_json_bodies(client, body, status, fragment):
    assert_error(client.post("/link", json=body), status, fragment)


@pytest.mark.parametrize(("content", "content_type", "status"), [
    (b"{not json", "application/json", 422),
    (b"\xff\xfe\x00garbage", "application/json", 422),
    (b"", "application/json", 422),
    (b"sentence=x", "application/x-www-form-urlencoded", 422),
    (b"", "", 415),
    (b"hello", "text/plain", 415),
    (b"hello", "", 415),
    (b"--x\r\nbroken multipart", "multipart/form-data; boundary=x", 400),
])
def test_unreadable_bodies(client, content, content_type, status):
    headers = {"Content-Type": content_type} if content_type else {}
    assert_error(client.post("/link", content=content, headers=headers), status)


def test_bad_multipart_forms(client):
    assert_error(client.post("/link", data={"sentence": SENTENCE, "mention": "Mercury", "extra": "1"}), 422, "extra")
    assert_error(client.post("/link", data={"sentence": SENTENCE, "span_start": "0"}), 422, "span_end")
    assert_error(client.post("/link", data={"sentence": SENTENCE, "span_start": "a", "span_end": "7"}), 422, "span")
    corrupt = {"image": ("m.png", b"\x89PNG\r\n\x1a\n truncated", "image/png")}
    assert_error(client.post("/link", data={"sentence": SENTENCE, "mention": "Mercury"}, files=corrupt), 422,
                 "cannot be used")
    bomb = {"image": ("bomb.png", bomb_png(), "image/png")}
    assert_error(client.post("/link", data={"sentence": SENTENCE, "mention": "Mercury"}, files=bomb), 413, "too large")
    big = {"image": ("big.bin", b"\0" * 250_000, "image/png")}
    assert_error(client.post("/link", data={"sentence": SENTENCE, "mention": "Mercury"}, files=big), 413, "limit")


def test_size_limits(client):
    assert_error(client.post("/link", content=b"x" * 400_000, headers={"Content-Type": "application/json"}), 413,
                 "limit")

    def chunked():
        for _ in range(40):
            yield b"x" * 10_000
    assert_error(client.post("/link", content=chunked(), headers={"Content-Type": "application/json"}), 413,
                 "limit")
    queries = [{"sentence": SENTENCE, "mention": "Mercury"}] * 5
    assert_error(client.post("/link/batch", json={"queries": queries}), 413, "limit of 4")
    assert_error(client.post("/link/batch", json={"queries": []}), 422, "queries")
    assert_error(client.post("/link/batch", json={"queries": [{"sentence": SENTENCE}]}), 422, "exactly one")
    assert_error(client.post("/link/batch", content=b"[", headers={"Content-Type": "application/json"}), 422)


def test_slow_requests_time_out(shared_linker, tiny_index):
    with make_client(shared_linker, tiny_index.index_dir, request_timeout_s=1e-6, body_timeout_s=30) as impatient:
        assert_error(impatient.post("/link", json={"sentence": SENTENCE, "mention": "Mercury"}), 504, "limit")


def test_random_garbage_never_gives_a_server_error(client):
    import random

    generator = random.Random(7)
    values = [None, True, -1, 0, 10**12, 1.5, "", "x" * 600, [], {}, [0], ["a", 1], {"a": 1}, "Mercury", [0, 7]]
    keys = ["sentence", "mention", "span", "top_k", "candidates_k", "image_base64", "queries", "zzz"]
    for _ in range(60):
        body = {key: generator.choice(values) for key in generator.sample(keys, generator.randint(0, 5))}
        for path in ("/link", "/link/batch"):
            response = client.post(path, json=body)
            assert response.status_code < 500, (path, body, response.text)


def test_a_real_bug_is_a_logged_500_with_json(tiny_index, linker_backbone, tmp_path, caplog):
    from mmel.retrieval.linker import Linker

    broken = Linker.load(tiny_index.copy_index(tmp_path / "index"), backbone=linker_backbone)
    broken.close()                                   # its SQLite connection is gone: every lookup fails
    with make_client(broken, tiny_index.index_dir) as client:
        response = client.get("/entities/Q90")
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error (logged on the server)"}
    assert "unexpected error on GET /entities/Q90" in caplog.text
