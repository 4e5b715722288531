"""The Ray engine: `Engine.map_shards` over a pool of Ray actors, on a cluster it joins or starts.

The engine keeps one actor per worker (`num_cpus=cpus_per_worker` each) for its whole life, so
the processes start and import torch once. Each `map_shards` call builds its worker in every actor
once (`make_worker()`, shipped through Ray's object store: a loaded backbone is serialised once,
not once per shard) and feeds the actors shards in order: a worker gets its next
shard when it hands back its last result; ordered, results wait for their turn in a bounded
buffer. When a map fails or is abandoned, the shards still running are allowed to finish (a kill
could cut a write short), actors that died or stay busy are killed, and the next map replaces them.

Why actors and not Ray Data: a shard here is a unit of resumption whose result the driver commits
(a content-addressed shard reported written, result lines appended and fsynced), and results are
arbitrary Python objects; Ray Data's strengths (columnar blocks, file readers, operator fusion)
do not apply, and its executor adds several seconds of start-up per job (docs/SCALING.md).

Without `address` a private single-node Ray is started inside the command and stopped by
`close()`; with `address` the engine joins that cluster (`cluster.RayConnection`).

A worker that dies (killed, out of memory, node lost) fails the map with `WorkerLostError`: the
shards already reported are kept by the callers, and rerunning the command does the rest.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

import ray
from ray.exceptions import RayActorError, RayTaskError

from mmel.core.engine import ResultT, ShardT, WorkerFactory, WorkerLostError, close_worker
from mmel.core.errors import MmelError, UsageError
from mmel.scale.cluster import RayConnection, local_cpus

SETTLE_TIMEOUT_S = 60.0         # after a failure, how long running shards may take before their workers are killed
ACTOR_START_TIMEOUT_S = 120.0   # a worker that cannot start by then lacks CPUs (held by another job?): an error


@ray.remote
class _ShardActor:
    """One worker process: holds the worker of the current map and runs it on the shards it is sent."""

    def __init__(self) -> None:
        self._worker: Any = None

    def install(self, make_worker: WorkerFactory) -> None:
        self.release()
        self._worker = make_worker()

    def run(self, position: int, shard: Any) -> tuple[int, Any]:
        return position, self._worker(shard)

    def release(self) -> None:
        if self._worker is not None:
            close_worker(self._worker)
        self._worker = None


class RayEngine:
    """`num_workers` Ray actors (default: the cluster's CPUs / `cpus_per_worker`), kept for the engine's life."""

    name = "ray"

    def __init__(self, num_workers: int | None = None, *, address: str | None = None, cpus_per_worker: float = 1.0):
        if num_workers is not None and num_workers < 1:
            raise UsageError(f"the Ray engine needs at least one worker, got {num_workers}")
        if cpus_per_worker <= 0:
            raise UsageError(f"cpus_per_worker must be positive, got {cpus_per_worker}")
        self.cpus_per_worker = cpus_per_worker
        self._actors: list[Any] = []
        self._connection = RayConnection(address, num_cpus=(num_workers or local_cpus()) * cpus_per_worker)
        cluster_cpus = self._connection.cluster_cpus()
        self.num_workers = num_workers or max(1, int(cluster_cpus // cpus_per_worker))
        if self.num_workers * cpus_per_worker > cluster_cpus:
            self.close()
            raise UsageError(f"{self.num_workers} workers of {cpus_per_worker:g} CPU need "
                             f"{self.num_workers * cpus_per_worker:g} CPUs; the Ray cluster has {cluster_cpus:g}")

    def map_shards(self, make_worker: WorkerFactory[ShardT, ResultT], shards: Sequence[ShardT], *,
                   ordered: bool = False) -> Iterator[tuple[int, ResultT]]:
        if not shards:
            return
        dispatch = _Dispatch(self._install(make_worker, min(self.num_workers, len(shards))), shards, ordered)
        try:
            yield from dispatch.results()
        except (RayTaskError, RayActorError) as error:
            _raise_for_caller(error)
        finally:
            self._keep_only(dispatch.settle(SETTLE_TIMEOUT_S))

    def _install(self, make_worker: WorkerFactory, count: int) -> list[Any]:
        """`count` live actors, each holding a worker built by `make_worker` (shipped once, via the object store)."""
        while len(self._actors) < count:
            self._actors.append(_ShardActor.options(num_cpus=self.cpus_per_worker).remote())
        actors = self._actors[:count]
        _, waiting = ray.wait([actor.__ray_ready__.remote() for actor in actors], num_returns=count,
                              timeout=ACTOR_START_TIMEOUT_S)
        if waiting:
            self._keep_only([])
            raise UsageError(f"{len(waiting)} of {count} Ray workers did not start within {ACTOR_START_TIMEOUT_S:g} s: "
                             f"the cluster has {ray.available_resources().get('CPU', 0):g} CPUs free of "
                             f"{ray.cluster_resources().get('CPU', 0):g} (another job may hold them)")
        factory = ray.put(make_worker)
        try:
            ray.get([actor.install.remote(factory) for actor in actors])
        except (RayTaskError, RayActorError) as error:
            self._keep_only([])
            _raise_for_caller(error)
        return actors

    def _keep_only(self, healthy: list[Any]) -> None:
        """Keep the `healthy` actors (their workers released) and kill the others (dead, or still busy)."""
        for actor in self._actors:
            if actor in healthy:
                actor.release.remote()
            else:
                ray.kill(actor)
        self._actors = [actor for actor in self._actors if actor in healthy]

    def close(self) -> None:
        """Stop the workers; disconnect if this engine connected (stopping the Ray it started). Idempotent."""
        if ray.is_initialized():
            self._keep_only([])
        self._connection.close()

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Dispatch:
    """One map: sends shards to free actors in shard order, collects results, and settles what still runs.

    Ordered, a shard is sent only while fewer than `2 * actors` results are held back, so memory
    stays bounded however uneven the shards are.
    """

    def __init__(self, actors: list[Any], shards: Sequence[Any], ordered: bool):
        self.actors = actors
        self.free = list(actors)
        self.shards = shards
        self.ordered = ordered
        self.running: dict[Any, Any] = {}   # result ref -> its actor
        self.next_shard = 0

    def results(self) -> Iterator[tuple[int, Any]]:
        held: dict[int, Any] = {}
        next_out = yielded = 0
        while yielded < len(self.shards):
            self._send(next_out)
            position, result = self._next_finished()
            if not self.ordered:
                yield position, result
                yielded += 1
                continue
            held[position] = result
            while next_out in held:
                yield next_out, held.pop(next_out)
                next_out += 1
                yielded += 1

    def _send(self, next_out: int) -> None:
        limit = min(len(self.shards), next_out + 2 * len(self.actors)) if self.ordered else len(self.shards)
        while self.free and self.next_shard < limit:
            actor = self.free.pop()
            self.running[actor.run.remote(self.next_shard, self.shards[self.next_shard])] = actor
            self.next_shard += 1

    def _next_finished(self) -> tuple[int, Any]:
        """(position, result) of the next shard to finish; raises its worker's error (that actor is not freed)."""
        [ref], _ = ray.wait(list(self.running), num_returns=1)
        actor = self.running.pop(ref)
        result = ray.get(ref)
        self.free.append(actor)
        return result

    def settle(self, timeout_s: float) -> list[Any]:
        """Let the shards still running finish (their results are dropped: a kill could cut a write short and
        leave debris), up to `timeout_s`; returns the actors that are idle and alive."""
        healthy = list(self.free)
        if self.running:
            ready, _ = ray.wait(list(self.running), num_returns=len(self.running), timeout=timeout_s)
            for ref in ready:
                try:
                    ray.get(ref)
                except RayActorError:
                    continue                     # its process died
                except RayTaskError:
                    pass                         # the worker raised; its process is fine
                healthy.append(self.running[ref])
        return healthy


def _raise_for_caller(error: RayTaskError | RayActorError) -> NoReturn:
    """Raise what the caller should see: a worker's mmel error as itself, a dead worker as WorkerLostError,
    anything else (a bug) as Ray's error with the remote traceback."""
    if isinstance(error, RayActorError):
        raise WorkerLostError(f"a Ray worker died ({error.__class__.__name__}); the shards that finished are kept: "
                              "rerun the command to do the rest") from error
    if isinstance(error.cause, MmelError):   # the user's error (bad data...), not a remote traceback
        raise error.cause from None
    raise error


__all__ = ["RayEngine"]
