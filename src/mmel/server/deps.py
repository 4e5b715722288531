"""Request dependencies: the loaded Linker, the settings, bearer-token auth, and the blocking-call runner."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mmel.retrieval.linker import Linker
from mmel.server.batching import LinkBatcher
from mmel.server.settings import ServerSettings

T = TypeVar("T")

bearer_scheme = HTTPBearer(auto_error=False, description="the token given to `mmel serve --token`")


def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


def get_linker(request: Request) -> Linker:
    return request.app.state.linker


def get_batcher(request: Request) -> LinkBatcher:
    return request.app.state.batcher


def is_authorized(settings: ServerSettings, credentials: HTTPAuthorizationCredentials | None) -> bool:
    """True when no token is configured, or the request carries exactly that token (constant-time compare)."""
    if settings.token is None:
        return True
    if credentials is None:   # HTTPBearer gives None for a missing header or another scheme
        return False
    return hmac.compare_digest(credentials.credentials.encode("utf-8"), settings.token.encode("utf-8"))


SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
LinkerDep = Annotated[Linker, Depends(get_linker)]
BatcherDep = Annotated[LinkBatcher, Depends(get_batcher)]
CredentialsDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


def require_token(settings: SettingsDep, credentials: CredentialsDep) -> None:
    """401 without credentials, 403 with the wrong ones; nothing to do when the server has no token."""
    if settings.token is None:
        return
    if credentials is None:
        raise HTTPException(HTTPStatus.UNAUTHORIZED, "this server needs a bearer token (Authorization header)",
                            headers={"WWW-Authenticate": "Bearer"})
    if not is_authorized(settings, credentials):
        raise HTTPException(HTTPStatus.FORBIDDEN, "the bearer token is not valid")


async def run_with_timeout(function: Callable[[], T], timeout_s: float) -> T:
    """Run blocking work in the thread pool; 504 when it takes longer than `timeout_s`.

    A thread cannot be killed, so the work finishes in the background after a timeout; the client
    gets its answer on time and the Linker's own locks keep the late result from doing harm.
    """
    return await await_with_timeout(run_in_threadpool(function), timeout_s)


async def await_with_timeout(work: Awaitable[T], timeout_s: float) -> T:
    """`work`'s result; 504 when it takes longer than `timeout_s`."""
    try:
        return await asyncio.wait_for(work, timeout=timeout_s)
    except asyncio.TimeoutError:
        raise HTTPException(HTTPStatus.GATEWAY_TIMEOUT,
                            f"the request took longer than the server's limit of {timeout_s:g} s") from None
