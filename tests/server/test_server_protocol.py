"""What the server does with misbehaving clients, over a real uvicorn server run as `mmel serve` runs it
(`uvicorn_config`): slow bodies, hang-ups, oversized URLs and headers, and an entity image that is a FIFO."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from mmel.server.app import create_app
from mmel.server.settings import ServerSettings

WAIT_S = 20        # generous bound on anything that must happen "soon"; tests never assert durations


@contextlib.contextmanager
def served(serving, linker, index_dir, **settings) -> Iterator[tuple[str, int]]:
    """The app with these settings under `serving` (tests/conftest.py: `uvicorn_config`); yields (host, port)."""
    app = create_app(ServerSettings(index_dir=index_dir, **settings), linker=linker)
    with serving(app) as url:
        address = urlsplit(url)
        yield address.hostname, address.port


@pytest.fixture(scope="module")
def server(shared_linker, tiny_index, serve_app) -> Iterator[tuple[str, int]]:
    with served(serve_app, shared_linker, tiny_index.index_dir, body_timeout_s=1.0, head_timeout_s=1.0) as address:
        yield address


def partial_post(address: tuple[str, int], path: bytes = b"/link", content_type: bytes = b"application/json",
                 start: bytes = b'{"sent') -> socket.socket:
    """A connection that declares a 1,000-byte body and sends only its `start`."""
    connection = socket.create_connection(address, timeout=WAIT_S)
    connection.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: " + content_type +
                       b"\r\nContent-Length: 1000\r\n\r\n" + start)
    return connection


def read_until_closed(connection: socket.socket) -> bytes:
    received = b""
    while chunk := connection.recv(65536):      # the socket timeout bounds each wait
        received += chunk
    return received


@pytest.mark.parametrize(("path", "content_type", "start"), [
    (b"/link", b"application/json", b'{"sent'), (b"/link/batch", b"application/json", b'{"quer'),
    (b"/link", b"multipart/form-data; boundary=xyz", b'--xyz\r\nContent-Disposition: form-data; name="sentence"')])
def test_a_slow_body_gets_408_and_its_connection_closed(server, path, content_type, start):
    connections = [partial_post(server, path, content_type, start) for _ in range(5)]
    try:
        for connection in connections:
            assert read_until_closed(connection).startswith(b"HTTP/1.1 408 ")
    finally:
        for connection in connections:
            connection.close()


@pytest.mark.parametrize("trickle", [b"", b"GET /health HTTP/1.1\r\nHost: x\r\n"])
def test_a_request_head_that_does_not_arrive_closes_its_connection(server, trickle):
    connections = [socket.create_connection(server, timeout=WAIT_S) for _ in range(5)]
    try:
        for connection in connections:
            connection.sendall(trickle)
        for connection in connections:
            for _ in range(3):   # header lines keep trickling in: they must not move the deadline
                with contextlib.suppress(OSError):
                    connection.sendall(b"X-Slow: 1\r\n" if trickle else b"")
            assert read_until_closed(connection) == b""
    finally:
        for connection in connections:
            connection.close()
    with httpx.Client(timeout=WAIT_S) as client:   # a client that sends its head at once is served
        assert client.get(f"http://{server[0]}:{server[1]}/health").status_code == 200


def test_a_client_hanging_up_mid_body_is_one_log_line_not_an_error(server, caplog):
    caplog.set_level(logging.INFO)
    partial_post(server).close()
    deadline = time.monotonic() + WAIT_S
    while not any("disconnected" in record.getMessage() for record in caplog.records):
        assert time.monotonic() < deadline, "the hang-up was never logged"
        time.sleep(0.05)
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR or record.exc_info]
    with httpx.Client(base_url=f"http://{server[0]}:{server[1]}", timeout=WAIT_S) as client:
        assert client.get("/health").status_code == 200


def raw_exchange(address: tuple[str, int], head: bytes) -> bytes:
    """Send a request head as is (no client library checks its size) and read the answer until the server closes."""
    with socket.create_connection(address, timeout=WAIT_S) as connection:
        connection.sendall(head)
        return read_until_closed(connection)


@pytest.mark.parametrize(("head", "status"), [
    (b"GET /health?q=" + b"a" * 1_000_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"414"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * 1_000_000 + b"\r\n\r\n", b"431"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-F%d: %s\r\n" % (i, b"a" * 100) for i in range(1000))
     + b"\r\n", b"431"),
])
def test_an_oversized_url_or_header_block_gets_414_or_431(server, head, status):
    assert raw_exchange(server, head).startswith(b"HTTP/1.1 " + status + b" ")
    with httpx.Client(base_url=f"http://{server[0]}:{server[1]}", timeout=WAIT_S) as client:
        assert client.get("/health").status_code == 200


def test_an_entity_image_that_is_a_fifo_answers_404(server, tiny_index):
    image = tiny_index.root / "kb" / "mercury_planet.png"
    kept = image.with_suffix(".kept")
    image.rename(kept)
    try:
        os.mkfifo(image)
        with httpx.Client(base_url=f"http://{server[0]}:{server[1]}", timeout=WAIT_S) as client:
            for _ in range(3):      # each would have left a server thread blocked on the FIFO for good
                assert client.get("/entities/Q308/image/0").status_code == 404
            assert client.get("/health").status_code == 200
    finally:
        image.unlink(missing_ok=True)
        kept.rename(image)
