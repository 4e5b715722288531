"""How uvicorn runs the app: the protocol settings that the app's own limits rely on."""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI

from mmel.server.head_timeout import head_timeout_protocol
from mmel.server.settings import ServerSettings

H11_BUFFER_BYTES = 2 * 1024 * 1024
"""h11's limit on a request head still being received (its default is 16 KiB).

Over it, h11 can only answer a bare 400 and drop the connection mid-send, which the client sees
as a reset. Set well above `max_url_bytes` and `max_header_bytes`, a long URL or header block is
received whole and answered 414 or 431 by `RequestHeadLimitMiddleware`; the buffer still bounds
what one connection may make the server hold.
"""


def uvicorn_config(app: FastAPI, settings: ServerSettings, *, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's configuration for `app` on `settings.host:settings.port` (h11, with the buffer above)."""
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                          http=head_timeout_protocol(settings.head_timeout_s),
                          h11_max_incomplete_event_size=max(H11_BUFFER_BYTES, settings.max_url_bytes,
                                                            settings.max_header_bytes) + 64 * 1024)
