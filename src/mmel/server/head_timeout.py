"""uvicorn's h11 protocol with a deadline for the request head (slow-header clients, "Slowloris").

uvicorn closes an idle keep-alive connection, and `BodyTimeoutMiddleware` bounds a body's arrival,
but nothing bounds the request line and headers: a client that connects and sends nothing, or one
header line now and then, holds its connection (and h11's buffer) for ever, and enough of them
exhaust the server's sockets. Here the clock starts when a connection opens, or when the first
byte of its next request arrives, and the connection is closed if the head is not complete within
`head_timeout_s`; bytes trickling in do not move the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeadTimeoutH11Protocol(H11Protocol):
    """H11Protocol whose connections must deliver each request head within `head_timeout_s` seconds."""

    head_timeout_s: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_head():
            self._arm_head_timer()
        else:
            self._cancel_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _waiting_for_head(self) -> bool:
        """No request in progress: the bytes received so far (if any) belong to a head not yet complete."""
        return self.cycle is None or self.cycle.response_complete

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._waiting_for_head() and not self.transport.is_closing():
            client = "{}:{}".format(*self.client) if self.client else "a client"
            self.logger.info("%s: closed a connection whose request head did not arrive within %.0f s", client,
                             self.head_timeout_s)
            with contextlib.suppress(h11.LocalProtocolError):   # h11 already holds the connection broken
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()


def head_timeout_protocol(head_timeout_s: float) -> type[HeadTimeoutH11Protocol]:
    """The protocol class for uvicorn's `http=` setting, with this deadline."""
    return type("HeadTimeoutH11Protocol", (HeadTimeoutH11Protocol,), {"head_timeout_s": head_timeout_s})


__all__ = ["HeadTimeoutH11Protocol", "head_timeout_protocol"]
