"""Request limits as plain ASGI middleware: body size, body arrival time, URL and header sizes."""

from __future__ import annotations

import asyncio
from http import HTTPStatus

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimitMiddleware:
    """413 for a body over `max_body_bytes`.

    A declared Content-Length over the limit is refused before anything is read. A chunked body
    without a length is counted as it arrives: going over raises HTTPException(413) inside the
    endpoint's read, which FastAPI turns into the response like any other HTTP error.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            response = JSONResponse({"detail": self._too_large_message(declared)},
                                    status_code=HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, self._too_large_message(received))
            return message

        await self.app(scope, counting_receive, send)

    def _too_large_message(self, size: int) -> str:
        return f"request body of {size}+ bytes is over this server's limit of {self.max_body_bytes} bytes"


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BodyTimeoutMiddleware:
    """408 (and a closed connection) when a request body is not all in within `timeout_s` of the request.

    uvicorn has no body-read timeout: a client that declares 1,000 bytes and sends 6 holds its
    connection (and a server task) for as long as it likes. Reads from the body share one deadline,
    counted from when the headers arrived.
    """

    def __init__(self, app: ASGIApp, timeout_s: float):
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:      # after the body, receive only waits for a disconnect: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                raise HTTPException(HTTPStatus.REQUEST_TIMEOUT,
                                    f"the request body did not arrive within {self.timeout_s:g} s",
                                    headers={"Connection": "close"}) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)


class RequestHeadLimitMiddleware:
    """414 for a URL over `max_url_bytes`, 431 for headers over `max_header_bytes` (in all).

    Without it an oversized request line or header block only meets h11's buffer limit, which
    answers a bare 400 and drops the connection while the client is still sending (a reset).
    The server's h11 buffer (see `running.uvicorn_config`) is set above these limits so that such
    requests reach this middleware and get a status that says what is wrong.
    """

    def __init__(self, app: ASGIApp, max_url_bytes: int, max_header_bytes: int):
        self.app = app
        self.max_url_bytes = max_url_bytes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        url_bytes = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b""))
        if url_bytes > self.max_url_bytes:
            return _closing_error(HTTPStatus.REQUEST_URI_TOO_LONG,
                                  f"URL of {url_bytes} bytes is over this server's limit of {self.max_url_bytes}")
        header_bytes = sum(len(name) + len(value) for name, value in scope.get("headers", []))
        if header_bytes > self.max_header_bytes:
            return _closing_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                  f"headers of {header_bytes} bytes are over this server's limit of "
                                  f"{self.max_header_bytes}")
        return None


def _closing_error(status: HTTPStatus, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})
