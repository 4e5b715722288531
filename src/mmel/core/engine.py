"""The engine seam: run one function over shards of work, in this process or on a cluster.

Batch work (encoding a KB into the feature store, linking a file of mentions, encoding an index's
entities) is split by its caller into shards: independent pieces whose results the caller
combines (writes to disk, appends to a file, concatenates). An `Engine` only runs a worker over
the shards; it never knows what they hold. Two engines exist:

- `LocalEngine` (the default): one worker in this process, shards in order. Nothing to start,
  and it imports no cluster software.
- `mmel.scale.ray_engine.RayEngine`: a pool of Ray actors, one worker each, on a Ray cluster that
  it joins or starts (imported only when asked for: `--engine ray`).

A worker is built once per worker process by `make_worker()` (loading a backbone or opening an
index is the expensive part, so it is not repeated per shard), then called once per shard; a
worker with a `close()` method is closed when the map ends. For
a cluster engine `make_worker` and the shards are pickled (cloudpickle): a top-level class or a
`functools.partial` of a top-level function, holding paths and small settings, travels best.
Paths must name the same files on every node (one node, or a shared filesystem).

A shard is retried elsewhere only by the caller's rerun: the callers make every shard's effect
idempotent (content-addressed shards, results keyed by mention id), so a crash loses at most the
shards in flight, and the rerun does the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, TypeVar, runtime_checkable

from mmel.core.errors import MmelError, UsageError

ShardT = TypeVar("ShardT")
ResultT = TypeVar("ResultT")

Worker = Callable[[ShardT], ResultT]
"""Turns one shard into its result; built once per worker process."""

WorkerFactory = Callable[[], Worker[ShardT, ResultT]]
"""Builds a worker (picklable for a cluster engine)."""


class WorkerLostError(MmelError):
    """A worker process died mid-shard (killed, out of memory, node lost); a rerun does the unfinished shards."""


@runtime_checkable
class Engine(Protocol):
    """Runs a worker over shards and yields `(shard position, result)` pairs as shards finish."""

    name: str           # "local" or "ray": recorded in reports
    num_workers: int    # workers running shards at the same time

    def map_shards(self, make_worker: WorkerFactory[ShardT, ResultT], shards: Sequence[ShardT], *,
                   ordered: bool = False) -> Iterator[tuple[int, ResultT]]:
        """`(i, worker(shards[i]))` for every shard, each exactly once.

        With `ordered=False` pairs come as shards finish (any order); with `ordered=True` in shard
        order, holding back early finishers (a cluster engine then keeps at most a bounded number
        of results waiting). A worker's exception is raised here, after the results that came
        before it; the other shards' results are dropped (a cluster engine lets the shards still
        running finish first, so no write is cut short). Stopping the iteration early drops the
        rest too. A worker process that dies raises `WorkerLostError`.
        """
        ...

    def close(self) -> None:
        """Release the workers (and a cluster this engine started). Idempotent."""
        ...

    def __enter__(self) -> Engine: ...

    def __exit__(self, *exc_info: object) -> None: ...


class LocalEngine:
    """One worker in this process; shards run one after another, in order."""

    name = "local"
    num_workers = 1

    def map_shards(self, make_worker: WorkerFactory[ShardT, ResultT], shards: Sequence[ShardT], *,
                   ordered: bool = False) -> Iterator[tuple[int, ResultT]]:
        if not shards:
            return
        worker = make_worker()
        try:
            for position, shard in enumerate(shards):
                yield position, worker(shard)
        finally:
            close_worker(worker)

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def close_worker(worker: object) -> None:
    """Call the worker's `close()`, if it has one (a worker holding files, an index, a connection)."""
    close = getattr(worker, "close", None)
    if callable(close):
        close()


def split_into_shards(items: Sequence[ShardT], shard_size: int) -> list[Sequence[ShardT]]:
    """`items` cut into consecutive slices of `shard_size` (the last one shorter)."""
    if shard_size < 1:
        raise UsageError(f"shard_size must be positive, got {shard_size}")
    return [items[start:start + shard_size] for start in range(0, len(items), shard_size)]


__all__ = ["Engine", "LocalEngine", "Worker", "WorkerFactory", "WorkerLostError", "close_worker", "split_into_shards"]
