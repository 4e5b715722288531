"""Dynamic batching of `POST /link`: requests that arrive together are linked in one `Linker.link_batch` call.

One linker call costs about the same for 1 mention as for a few (text encoding, the FAISS search
and the reranker all batch), so under concurrent load joining requests raises throughput; alone,
a request waits at most `max_wait_s` for company. Requests asking for different `top_k` /
`candidates_k` are linked in separate calls. Callers validate a query (`prepare_query`) before
it joins, so a joint call should not fail; if one does anyway, the batch is bisected until the
failing query is alone: it gets its own error, and its neighbours are still linked in a few
joint calls (about 2·log2(n)) rather than one call each.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

from fastapi.concurrency import run_in_threadpool

from mmel.core.types import LinkResult
from mmel.retrieval.linker import Linker
from mmel.retrieval.queries import MentionQuery


@dataclass
class _Pending:
    query: MentionQuery
    top_k: int
    candidates_k: int
    answer: asyncio.Future


@dataclass
class BatchStats:
    """How many linker calls of each size the batcher made (reported by `/health`)."""

    calls_by_size: Counter = field(default_factory=Counter)


class LinkBatcher:
    """Queues single-mention requests and links them in batches of up to `max_batch` (a background task)."""

    def __init__(self, linker: Linker, *, max_batch: int, max_wait_s: float):
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"need max_batch >= 1 and max_wait_s >= 0, got {max_batch} and {max_wait_s}")
        self.linker = linker
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._serve_forever())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None

    async def link(self, query: MentionQuery, *, top_k: int, candidates_k: int) -> LinkResult:
        """The result for one query, linked together with whatever else is waiting."""
        pending = _Pending(query, top_k, candidates_k, asyncio.get_running_loop().create_future())
        await self._queue.put(pending)
        return await pending.answer

    async def _serve_forever(self) -> None:
        while True:
            batch = await self._next_batch()
            for group in _by_ranking_sizes(batch):
                await self._link_group(group)

    async def _next_batch(self) -> list[_Pending]:
        """The first waiting request, every request already queued, and any arriving within `max_wait_s`."""
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            arrival = await self._next_arrival(deadline - asyncio.get_running_loop().time())
            if arrival is None:
                break
            batch.append(arrival)
        return batch

    async def _next_arrival(self, timeout: float) -> _Pending | None:
        """The next queued request if one arrives within `timeout` seconds, else None (never loses one)."""
        if timeout <= 0:
            return None
        getter = asyncio.ensure_future(self._queue.get())
        await asyncio.wait({getter}, timeout=timeout)
        if getter.done():
            return getter.result()
        getter.cancel()   # a cancelled get leaves its request in the queue (it is removed only on completion)
        return None

    async def _link_group(self, group: list[_Pending]) -> None:
        live = [pending for pending in group if not pending.answer.done()]   # a timed-out caller has gone
        if not live:
            return
        try:
            results = await run_in_threadpool(self.linker.link_batch, [p.query for p in live],
                                              top_k=live[0].top_k, candidates_k=live[0].candidates_k)
        except Exception as error:  # handed to the request it belongs to, whatever it is
            await self._isolate_failure(live, error)
            return
        self.stats.calls_by_size[len(live)] += 1
        for pending, result in zip(live, results, strict=True):
            if not pending.answer.done():
                pending.answer.set_result(result)

    async def _isolate_failure(self, live: list[_Pending], error: Exception) -> None:
        """Bisect a failed joint call: each half is linked together, so only the failing query stays alone."""
        if len(live) == 1:
            if not live[0].answer.done():
                live[0].answer.set_exception(error)
            return
        middle = len(live) // 2
        await self._link_group(live[:middle])
        await self._link_group(live[middle:])


def _by_ranking_sizes(batch: list[_Pending]) -> list[list[_Pending]]:
    groups: dict[tuple[int, int], list[_Pending]] = {}
    for pending in batch:
        groups.setdefault((pending.top_k, pending.candidates_k), []).append(pending)
    return list(groups.values())


__all__ = ["BatchStats", "LinkBatcher"]
