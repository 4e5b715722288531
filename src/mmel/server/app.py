"""The FastAPI application: `create_app(settings)` wires the routers, limits, error handlers and web page.

The Linker is loaded once in the lifespan (or handed in, already loaded) and shared by every
request through `app.state`, with a `LinkBatcher` that joins concurrent `POST /link` requests
into one linker call. Bad input never reaches the generic 500 handler: validation errors
are 422, size limits 413/414/431, auth 401/403, unknown entities 404, a body too slow to arrive 408,
work over the time limit 504; a client that disconnects is logged in one line; a 500 means a bug
and is logged with its traceback.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from pathlib import Path

import swagger_ui_bundle
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.requests import ClientDisconnect

from mmel import __version__
from mmel.backbones.base import BackboneConfig
from mmel.retrieval.linker import Linker
from mmel.retrieval.queries import QueryError
from mmel.server.batching import LinkBatcher
from mmel.server.limits import BodySizeLimitMiddleware, BodyTimeoutMiddleware, RequestHeadLimitMiddleware
from mmel.server.routers import entities, health, link
from mmel.server.settings import ServerSettings

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
DESCRIPTION = (
    "Link a mention in a sentence (optionally with an image) to the entities of a knowledge base: "
    "first-stage retrieval, then reranking with the trained model. The web page is at `/`."
)


def create_app(settings: ServerSettings, *, linker: Linker | None = None) -> FastAPI:
    """Build the app. With `linker=None` the lifespan loads `settings.index_dir` (and closes it at shutdown)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = linker if linker is not None else Linker.load(
            settings.index_dir, backbone_config=BackboneConfig(query_runtime=settings.query_runtime))
        app.state.linker = loaded
        app.state.batcher = LinkBatcher(loaded, max_batch=settings.max_batch,
                                        max_wait_s=settings.link_batch_wait_ms / 1000)
        app.state.batcher.start()
        try:
            yield
        finally:
            await app.state.batcher.stop()
            if linker is None:
                loaded.close()

    app = FastAPI(title="mmel", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(BodyTimeoutMiddleware, timeout_s=settings.body_timeout_s or settings.request_timeout_s)
    app.add_middleware(RequestHeadLimitMiddleware, max_url_bytes=settings.max_url_bytes,
                       max_header_bytes=settings.max_header_bytes)
    _add_error_handlers(app)
    for module in (link, entities, health):
        app.include_router(module.router)
    _add_web_page(app)
    _add_offline_docs(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        """422 listing where and what, without echoing the (possibly huge) input back."""
        detail = [{"loc": list(item.get("loc", ())), "msg": item.get("msg", ""), "type": item.get("type", "")}
                  for item in error.errors()]
        return JSONResponse({"detail": detail}, status_code=HTTPStatus.UNPROCESSABLE_ENTITY)

    @app.exception_handler(QueryError)
    async def invalid_query(request: Request, error: QueryError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=HTTPStatus.UNPROCESSABLE_ENTITY)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, error: ClientDisconnect) -> Response:
        """A client that hangs up mid-request is routine, not a server error: one line, no traceback."""
        logger.info("client %s disconnected during %s %s", _client(request), request.method, request.url.path)
        return Response(status_code=HTTPStatus.BAD_REQUEST)   # never sent: there is nobody to send it to

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error (logged on the server)"},
                            status_code=HTTPStatus.INTERNAL_SERVER_ERROR)


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown"


def _add_web_page(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def web_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


def _add_offline_docs(app: FastAPI) -> None:
    """Swagger UI from the locally installed `swagger-ui-bundle` (FastAPI's default loads it from a CDN)."""
    app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_bundle.swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title="mmel API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")
