"""A client for any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, llama.cpp, LM Studio).

Many requests run at once (bounded by a semaphore) under a requests-per-second limit; 429, 5xx,
timeouts and broken connections are retried with exponential backoff, honouring `Retry-After`.
401/403/404 stop the whole run (a wrong key, model or URL would fail every request the same way).
The API key is only ever put in the Authorization header: never logged, never returned.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from mmel.core.errors import MmelError
from mmel.enrich.answers import MALFORMED_JSON, MISSING_CONTENT, Answer, Failure, Outcome, clean_answer

Messages = list[dict[str, str]]
FATAL_STATUSES = {401: "the API key was refused", 403: "the API key may not use this model",
                  404: "no such model or endpoint"}


class EndpointError(MmelError):
    """The endpoint refuses every request (bad key, model or URL): stop instead of failing each entity."""


@dataclass(frozen=True)
class ClientSettings:
    """How hard to push an endpoint and how long to keep trying."""

    concurrency: int = 4
    requests_per_second: float = 5.0
    timeout_s: float = 120.0
    max_attempts: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.requests_per_second <= 0 or self.max_attempts < 1 or self.timeout_s <= 0:
            raise ValueError("concurrency and max attempts must be >= 1, requests/s and timeout > 0")


class RateLimiter:
    """Spaces request starts at least 1/rate seconds apart (retries included)."""

    def __init__(self, per_second: float):
        self._interval = 1.0 / per_second
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self._lock:
            now = time.monotonic()
            delay = max(0.0, self._next - now)
            self._next = max(now, self._next) + self._interval
        if delay:
            await asyncio.sleep(delay)


def retry_after_seconds(value: str | None, limit: float) -> float | None:
    """The delay a `Retry-After` header asks for (seconds or an HTTP date), capped at `limit`."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), limit)


def parse_completion(body: bytes) -> tuple[Outcome, str | None]:
    """The answer in a chat-completions response body, and its finish_reason."""
    try:
        record = json.loads(body)
        choice = record["choices"][0]
        message = choice["message"]
    except json.JSONDecodeError as error:
        return Failure(MALFORMED_JSON, error.msg), None
    except (KeyError, IndexError, TypeError) as error:
        return Failure(MISSING_CONTENT, f"no {error}"), None
    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    outcome = clean_answer(message.get("content") if isinstance(message, dict) else None, finish == "length")
    usage = record.get("usage") if isinstance(record, dict) else None
    if isinstance(outcome, Answer) and isinstance(usage, dict):
        outcome = Answer(outcome.text, _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")))
    return outcome, finish


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class ChatClient:
    """Sends chat requests to `base_url` + /chat/completions for one `model`."""

    def __init__(self, base_url: str, model: str, api_key: str | None, settings: ClientSettings,
                 max_tokens: int, temperature: float):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.settings = settings
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._api_key = api_key
        self._generation = {"max_tokens": max_tokens, "temperature": temperature}

    @property
    def name(self) -> str:
        """The model as cache keys and provenance name it."""
        return self.model

    def run(self, jobs: Sequence[tuple[str, Messages]], on_outcome: Callable[[str, Outcome], None]) -> None:
        """Ask every (item id, messages) job once; `on_outcome` sees each result as it arrives (one thread)."""
        asyncio.run(self.run_async(jobs, on_outcome))

    async def run_async(self, jobs: Sequence[tuple[str, Messages]],
                        on_outcome: Callable[[str, Outcome], Awaitable[None] | None]) -> None:
        """`run` inside a running event loop."""
        limiter = RateLimiter(self.settings.requests_per_second)
        semaphore = asyncio.Semaphore(self.settings.concurrency)
        timeout = httpx.Timeout(self.settings.timeout_s)
        limits = httpx.Limits(max_connections=self.settings.concurrency)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=self._headers) as client:

            async def one(item: str, messages: Messages) -> None:
                async with semaphore:
                    outcome = await self._ask(client, limiter, messages)
                result = on_outcome(item, outcome)
                if result is not None:
                    await result

            tasks = [asyncio.ensure_future(one(item, messages)) for item, messages in jobs]
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _ask(self, client: httpx.AsyncClient, limiter: RateLimiter, messages: Messages) -> Outcome:
        payload = {"model": self.model, "messages": messages, **self._generation}
        reason, detail, wait = "", "", None
        for attempt in range(self.settings.max_attempts):
            if attempt:
                await asyncio.sleep(wait if wait is not None else self._backoff(attempt))
            await limiter.wait()
            try:
                response = await client.post(self.url, json=payload)
                body = await response.aread()
            except httpx.TimeoutException:
                reason, detail, wait = "timeout", f"no answer within {self.settings.timeout_s:g} s", None
                continue
            except httpx.TransportError as error:
                reason, detail, wait = "connection error", type(error).__name__, None
                continue
            if response.status_code in FATAL_STATUSES:
                raise EndpointError(f"{self.url} answered HTTP {response.status_code} for model {self.model!r} "
                                    f"({FATAL_STATUSES[response.status_code]}): {self._excerpt(body)}")
            if response.status_code == 429 or response.status_code >= 500 or response.status_code == 408:
                reason = "rate limited (HTTP 429)" if response.status_code == 429 else "server error (HTTP 5xx)"
                detail = f"HTTP {response.status_code}"
                wait = retry_after_seconds(response.headers.get("retry-after"), self.settings.max_backoff_s)
                continue
            if response.status_code != 200:
                return Failure(f"HTTP {response.status_code}", self._excerpt(body))
            return parse_completion(body)[0]
        return Failure(reason, f"{detail}, {self.settings.max_attempts} attempts")

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter, so that many waiting requests do not return all at once."""
        delay = min(self.settings.backoff_s * 2 ** (attempt - 1), self.settings.max_backoff_s)
        return delay * random.uniform(0.5, 1.0)

    def _excerpt(self, body: bytes, limit: int = 200) -> str:
        """The start of an error body for a message, with the API key cut out should a server echo it."""
        text = body[:limit].decode("utf-8", errors="replace")
        return text.replace(self._api_key, "***") if self._api_key else text


__all__ = ["ChatClient", "ClientSettings", "EndpointError", "parse_completion", "retry_after_seconds"]
