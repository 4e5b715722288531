"""A request-body size limit as plain ASGI middleware (checked before and while the body is read)."""

from __future__ import annotations

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
