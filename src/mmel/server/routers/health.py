"""`GET /health`: liveness for anyone; index facts only for callers allowed to link."""

from __future__ import annotations

from fastapi import APIRouter

from mmel import __version__
from mmel.server.deps import BatcherDep, CredentialsDep, LinkerDep, SettingsDep, is_authorized
from mmel.server.schemas import HealthResponse

router = APIRouter(tags=["health"])


# The token is optional here (without it the answer is liveness only): the schema says "bearer token or none".
_OPTIONAL_TOKEN = {"security": [{}]}


@router.get("/health", response_model=HealthResponse, summary="Is the server up, and what does it serve",
            openapi_extra=_OPTIONAL_TOKEN)
def health(linker: LinkerDep, batcher: BatcherDep, settings: SettingsDep, credentials: CredentialsDep
           ) -> HealthResponse:
    if not is_authorized(settings, credentials):
        return HealthResponse(status="ok", version=__version__, auth_required=settings.token is not None)
    return HealthResponse(status="ok", version=__version__, auth_required=settings.token is not None,
                          index=linker.info(),
                          link_calls_by_batch_size=dict(sorted(batcher.stats.calls_by_size.items())))
