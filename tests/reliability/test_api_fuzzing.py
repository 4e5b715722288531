"""Hostile input against the HTTP API of a real uvicorn server on 127.0.0.1.

Two parts. Schemathesis generates requests from the app's own OpenAPI schema (valid and invalid
bodies, parameters and multipart forms) for every operation: no answer may be a 5xx, every answer
must conform to the schema (status code, content type, body, headers), requests the schema
forbids must be refused, and none may hang (each request has a timeout). Then a hand-written
corpus of raw HTTP requests covers what a schema-driven fuzzer does not send: broken images in
multipart forms, integers of thousands of digits, path traversal in URLs, broken encodings and
framing, and the regressions of issue 13. Every refusal must name the problem, and the server
must still answer afterwards.

`MMEL_FUZZ_EXAMPLES` sets the examples per operation (default 30).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from PIL import Image
from schemathesis.specs.openapi.checks import positive_data_acceptance

from mmel.server.app import create_app
from mmel.server.settings import ServerSettings

EXAMPLES = int(os.environ.get("MMEL_FUZZ_EXAMPLES", "30"))
REQUEST_TIMEOUT_S = 30      # a request without an answer by then is a hang
SENTENCE = "Mercury sang Bohemian Rhapsody with Queen."
TOKEN = "fuzz-token-0123456789"   # the server runs with a token, so that the fuzzer checks auth as well
BEARER = {"Authorization": f"Bearer {TOKEN}"}
AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()
STATUSES: Counter[tuple[str, int]] = Counter()   # (operation, status) of every fuzzed request, for the summary


@pytest.fixture(scope="module")
def api_url(shared_linker, tiny_index, serve_app) -> Iterator[str]:
    """The tiny index served with small limits, so that the fuzzer reaches them."""
    settings_ = ServerSettings(index_dir=tiny_index.index_dir, token=TOKEN, max_batch=4, max_top_k=20,
                               max_candidates_k=50, max_body_bytes=300_000, max_image_bytes=200_000,
                               max_image_pixels=1_000_000, max_url_bytes=2_000, max_header_bytes=8_000,
                               body_timeout_s=1.0)
    with serve_app(create_app(settings_, linker=shared_linker)) as url:
        yield url
        _print_summary()


def _print_summary() -> None:
    if STATUSES:
        by_class = Counter(f"{status // 100}xx" for (_, status), count in STATUSES.items() for _ in range(count))
        print(f"\nAPI fuzzing: {sum(STATUSES.values())} requests, by status class {dict(sorted(by_class.items()))}; "
              f"by operation and status {dict(sorted(STATUSES.items()))}")


# The schema the app publishes at /openapi.json (it does not depend on the index; a test checks the served one is
# the same). It is built at import: schemathesis' fixture-based loader does not work under pytest 9.
APP_SCHEMA = create_app(ServerSettings(index_dir=Path("no-index"))).openapi()
schema = schemathesis.openapi.from_dict(APP_SCHEMA)


@schema.auth()
class BearerToken:
    """The token for every generated request; schemathesis still sends some without it, and checks they fail."""

    def get(self, case, context) -> str:
        return TOKEN

    def set(self, case, token: str, context) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}


def test_the_fuzzed_schema_is_the_one_the_server_publishes(api_url):
    with httpx.Client(base_url=api_url, timeout=REQUEST_TIMEOUT_S) as client:
        assert client.get("/openapi.json").json() == json.loads(json.dumps(APP_SCHEMA))


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
def test_every_operation_conforms_to_its_schema_and_never_fails_on_input(case, api_url):
    """Schemathesis' checks, but `positive_data_acceptance`: a schema-valid request may still be refused, with
    422, for what a schema cannot say (a mention that is not in its sentence, top_k over the server's limit)."""
    response = case.call(base_url=api_url, timeout=REQUEST_TIMEOUT_S)
    STATUSES[(f"{case.method} {case.path}", response.status_code)] += 1
    assert response.status_code < 500, response.text
    case.validate_response(response, excluded_checks=[positive_data_acceptance])


# --- the hand-written corpus ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    """One raw HTTP request and what the server must answer: a status, and a fragment of the error message."""

    name: str
    request: bytes
    status: int
    detail: str = ""


def http(method: str, path: str | bytes, body: bytes = b"", content_type: str | None = None,
         headers: bytes = AUTH) -> bytes:
    """A raw HTTP/1.1 request, sent as is: no client library normalises the path or checks the body."""
    path = path.encode("latin-1") if isinstance(path, str) else path
    head = method.encode() + b" " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    if content_type is not None:
        head += b"Content-Type: " + content_type.encode() + b"\r\n"
    if body or method == "POST":
        head += b"Content-Length: %d\r\n" % len(body)
    return head + headers + b"\r\n" + body


def post_json(path: str, body: object | bytes) -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http("POST", path, data, "application/json")


def multipart(fields: dict[str, str], files: list[tuple[str, str, bytes]] = (), boundary: str = "fuzzboundary"
              ) -> bytes:
    """A multipart/form-data POST /link with text `fields` and (field, file name, bytes) `files`."""
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
              f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for name, filename, data in files]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return http("POST", "/link", body, f"multipart/form-data; boundary={boundary}")


def png(size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (180, 160, 20)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A few bytes of PNG whose header claims `width` x `height` pixels (a decompression bomb when large)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


GOOD = {"sentence": SENTENCE, "mention": "Mercury"}
CORPUS = [
    # path traversal and odd paths: never a file outside what the server serves
    Hostile("qid with traversal", http("GET", "/entities/..%2F..%2F..%2Fetc%2Fpasswd/image/0"), 404, "not found"),
    Hostile("image number with traversal", http("GET", "/entities/Q308/image/..%2F..%2Fkb"), 404, "not found"),
    Hostile("dot segments in the path", http("GET", "/entities/../../../../etc/passwd"), 404),
    Hostile("static traversal", http("GET", "/static/../../../../etc/passwd"), 404),
    Hostile("static encoded traversal", http("GET", "/static/..%2F..%2Fapp.py"), 404),
    Hostile("docs assets traversal", http("GET", "/docs-assets/%2e%2e/%2e%2e/%2e%2e/etc/passwd"), 404),
    Hostile("negative image number", http("GET", "/entities/Q308/image/-1"), 422, "k"),
    Hostile("huge image number", http("GET", "/entities/Q308/image/" + "9" * 40), 422, "k"),
    Hostile("NUL in a qid", http("GET", "/entities/Q308%00/image/0"), 404, "no usable image"),
    Hostile("invalid UTF-8 in a qid", http("GET", "/entities/%FF%FE"), 404, "no entity"),
    Hostile("qid over the length limit", http("GET", "/entities/" + "Q" * 300), 422, "qid"),
    Hostile("URL over the limit", http("GET", "/health?q=" + "a" * 5_000), 414, "URL"),
    Hostile("headers over the limit", http("GET", "/health", headers=b"X-Filler: " + b"a" * 9_000 + b"\r\n"), 431,
            "headers"),
    # the token
    Hostile("no token", http("GET", "/entities/Q308", headers=b""), 401, "token"),
    Hostile("wrong token", http("GET", "/entities/Q308", headers=b"Authorization: Bearer " + b"x" * 21 + b"\r\n"),
            403, "token"),
    Hostile("token of invalid UTF-8", http("GET", "/entities/Q308", headers=b"Authorization: Bearer \xff\xfe\r\n"),
            403, "token"),
    Hostile("other scheme", http("GET", "/entities/Q308", headers=b"Authorization: Basic eDp5\r\n"), 401, "token"),
    # integers of every size
    Hostile("top_k of 31 digits", post_json("/link", {**GOOD, "top_k": 10**30}), 422, "top_k"),
    Hostile("top_k of 5,000 digits", post_json("/link", b'{"sentence": "Mercury", "mention": "Mercury", "top_k": '
                                                        + b"9" * 5_000 + b"}"), 422, "number out of range"),
    Hostile("span of 5,000 digits", post_json("/link", b'{"sentence": "Mercury", "span": [0, ' + b"9" * 5_000 + b"]}"),
            422, "number out of range"),
    Hostile("form top_k of 5,000 digits", multipart({**GOOD, "top_k": "9" * 5_000}), 422, "top_k"),
    Hostile("form span of 20 digits", multipart({"sentence": SENTENCE, "span_start": "0", "span_end": "9" * 20}),
            422, "out of range"),
    Hostile("float top_k", post_json("/link", {**GOOD, "top_k": 3.0}), 422, "top_k"),
    Hostile("candidates_k unset, its default over the limit", post_json("/link", GOOD), 200),
    Hostile("candidates_k over the limit", post_json("/link", {**GOOD, "candidates_k": 100}), 422, "limit of 50"),
    Hostile("batch top_k of 5,000 digits", post_json("/link/batch", b'{"queries": [{"sentence": "Mercury", "mention":'
                                                                    b' "Mercury"}], "top_k": ' + b"9" * 5_000 + b"}"),
            422, "number out of range"),
    # JSON that parsers struggle with
    Hostile("nesting 100,000 deep", post_json("/link", b"[" * 100_000), 422, "recursion limit"),
    Hostile("batch nesting 100,000 deep", post_json("/link/batch", b'{"queries": ' + b"[" * 100_000), 422,
            "recursion limit"),
    Hostile("lone surrogate in the sentence", post_json("/link", b'{"sentence": "Mercury \\ud800", "mention": '
                                                                 b'"Mercury"}'), 422, "escape"),
    Hostile("lone surrogate in a batch", post_json("/link/batch", b'{"queries": [{"sentence": "\\udfff Mercury", '
                                                                  b'"mention": "Mercury"}]}'), 422, "surrogate"),
    Hostile("invalid UTF-8 in the sentence", post_json("/link", b'{"sentence": "Mercury \xff", "mention": "Mercury"}'),
            422),
    Hostile("NUL in the sentence", post_json("/link", {"sentence": "Mercury\x00 sang", "mention": "Mercury"}), 200),
    Hostile("duplicate keys", post_json("/link", b'{"sentence": "x", "sentence": "Mercury", "mention": "Mercury"}'),
            200),
    # multipart forms with bad images and bad framing
    Hostile("truncated PNG", multipart(GOOD, [("image", "m.png", png()[:40])]), 422, "cannot be used"),
    Hostile("random bytes as an image", multipart(GOOD, [("image", "m.png", os.urandom(64))]), 422, "cannot be used"),
    Hostile("empty image file", multipart(GOOD, [("image", "m.png", b"")]), 200),
    Hostile("decompression bomb", multipart(GOOD, [("image", "bomb.png", png_claiming(50_000, 50_000))]), 413,
            "too large"),
    Hostile("image over the pixel limit", multipart(GOOD, [("image", "big.png", png_claiming(2_000, 1_000))]), 413,
            "pixels"),
    Hostile("image over the byte limit", multipart(GOOD, [("image", "big.png", b"\0" * 250_000)]), 413, "limit"),
    Hostile("two images", multipart(GOOD, [("image", "a.png", png()), ("image", "b.png", png())]), 400, "files"),
    Hostile("file name with traversal", multipart(GOOD, [("image", "../../../etc/passwd", png())]), 200),
    Hostile("image sent as text", multipart({**GOOD, "image": "aGVsbG8="}), 422, "image"),
    Hostile("unknown form field", multipart({**GOOD, "colour": "red"}), 422, "colour"),
    Hostile("sentence part over the part limit", multipart({"sentence": "Mercury " * 4_000, "mention": "Mercury"}),
            400),
    Hostile("no boundary", http("POST", "/link", b"--x\r\n", "multipart/form-data"), 400),
    Hostile("unterminated multipart", http("POST", "/link", b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n'
                                                            b"Mercury", "multipart/form-data; boundary=b"), 422,
            "sentence"),
    Hostile("base64 image that is no image", post_json("/link", {**GOOD, "image_base64": base64.b64encode(b"junk")
                                                                  .decode()}), 422, "cannot be used"),
    Hostile("base64 bomb", post_json("/link", {**GOOD, "image_base64": base64.b64encode(
        png_claiming(50_000, 50_000)).decode()}), 413, "too large"),
    # framing and methods
    Hostile("body shorter than declared", b"POST /link HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                          + AUTH + b"Content-Length: 500\r\n\r\n{\"sentence\"", 408,
            "did not arrive"),
    Hostile("broken chunked body", b"POST /link HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: "
                                   b"application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", 400),
    Hostile("no content type", http("POST", "/link", b"{}"), 415, "content type"),
    Hostile("text content type", http("POST", "/link", b"Mercury", "text/plain"), 415, "text/plain"),
    Hostile("DELETE on /link", http("DELETE", "/link"), 405),
    # regressions of issue 13, kept fixed
    Hostile("top_k true (strict integers)", post_json("/link", {**GOOD, "top_k": True}), 422, "top_k"),
    Hostile("mention of zero-width spaces", post_json("/link", {"sentence": "a \u200b\u200b b",
                                                                "mention": "\u200b\u200b"}), 422, "empty"),
    Hostile("span of zero-width spaces", post_json("/link", {"sentence": "a \u200b\u200b b", "span": [2, 4]}), 422,
            "invisible"),
    Hostile("sentence of a BOM", post_json("/link", {"sentence": "\ufeff", "mention": "\ufeff"}), 422, "empty"),
]


def exchange(url: str, request: bytes) -> tuple[int, bytes]:
    """Send `request` on its own connection; (status, body) of the answer, read until the server closes."""
    address = urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=REQUEST_TIMEOUT_S) as connection:
        connection.sendall(request)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := connection.recv(65536):   # the socket timeout bounds each wait: no hang goes unnoticed
                received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), f"no HTTP answer: {received[:200]!r}"
    if b"transfer-encoding: chunked" in head.lower():
        body = _unchunked(body)
    if b"content-type: application/json" not in head.lower():   # h11's own refusals of broken framing are text
        body = json.dumps({"detail": body.decode("utf-8", "replace")}).encode()
    return int(head.split()[1]), body


def _unchunked(body: bytes) -> bytes:
    data = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        data, body = data + rest[:size], rest[size + 2:]
    return data


@pytest.mark.parametrize("hostile", CORPUS, ids=[hostile.name for hostile in CORPUS])
def test_hostile_request_is_refused_by_name_and_the_server_stays_up(api_url, hostile: Hostile):
    status, body = exchange(api_url, hostile.request)
    assert status == hostile.status, body[:300]
    if status != 200 and body:
        detail = json.loads(body)["detail"]
        assert detail, "a refusal must say what is wrong"
        assert hostile.detail.lower() in json.dumps(detail, ensure_ascii=False).lower(), detail
    with httpx.Client(base_url=api_url, timeout=REQUEST_TIMEOUT_S) as client:
        assert client.get("/health").status_code == 200


def test_a_span_is_on_the_original_sentence_when_lowercasing_changes_its_length(api_url):
    """Regression (issue 13 #4): 'İ'.lower() is two characters; the answer's span must index the sentence as sent."""
    sentence = "İİİ Mercury sang Bohemian Rhapsody with Queen."
    with httpx.Client(base_url=api_url, timeout=REQUEST_TIMEOUT_S, headers=BEARER) as client:
        response = client.post("/link", json={"sentence": sentence, "mention": "mercury"})
    assert response.status_code == 200, response.text
    start, end = response.json()["mention"]["span"]
    assert sentence[start:end] == "Mercury"


def test_an_invalid_query_among_concurrent_valid_ones_fails_alone(api_url, tiny_index):
    """Regression (issue 13 #2): an invalid query is refused before it joins a batch; its neighbours are linked."""
    bodies = [{"sentence": s, "mention": m} for s, m, _ in tiny_index.queries[:6]]
    bodies.insert(3, {"sentence": SENTENCE, "mention": "not in the sentence"})
    with httpx.Client(base_url=api_url, timeout=REQUEST_TIMEOUT_S, headers=BEARER) as client, \
            ThreadPoolExecutor(7) as pool:
        statuses = list(pool.map(lambda body: client.post("/link", json=body).status_code, bodies))
    assert statuses == [200, 200, 200, 422, 200, 200, 200]
