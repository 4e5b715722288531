"""The Ray engine: `Engine.map_shards` over a pool of Ray actors, on a cluster it joins or starts.

The engine keeps one actor per worker (`num_cpus=cpus_per_worker` each) for its whole life, so
the processes start and import torch once. Each `map_shards` call builds its worker in every actor
once (`make_worker()`, shipped through Ray's object store: a loaded backbone is serialised once,
not once per shard) and feeds the actors shards with `ray.util.ActorPool`: a worker gets its next
shard when it hands back its last result, so an ordered map holds at most one waiting result per
worker. A map that fails or is abandoned kills the actors (shards may still be running on them);
the next map starts new ones.

Why actors and not Ray Data: a shard here is a unit of resumption whose result the driver commits
(a content-addressed shard reported written, result lines appended and fsynced), and results are
arbitrary Python objects; Ray Data's strengths (columnar blocks, file readers, operator fusion)
do not apply, and its executor adds several seconds of start-up per job (docs/SCALING.md).

Without `address` a private single-node Ray is started inside the command (loopback only, no
dashboard, a temporary directory under /tmp, usage statistics off) and shut down by `close()`;
with `address` the engine joins that cluster and only disconnects. An already connected driver
(`ray.init` called by the caller, as the tests do) is used as it is and left connected.

A worker that dies (killed, out of memory, node lost) fails the map with `WorkerLostError`: the
shards already reported are kept by the callers, and rerunning the command does the rest.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util import ActorPool

from mmel.core.engine import ResultT, ShardT, WorkerFactory, WorkerLostError, close_worker
from mmel.core.errors import MmelError, UsageError

LOOPBACK = "127.0.0.1"
TEMP_PARENT = Path("/tmp")   # Ray's unix socket paths must stay short (108 bytes), whatever $TMPDIR is


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
        self._temp_dir: Path | None = None
        self._connected_here = not ray.is_initialized()
        if self._connected_here:
            if address is None:
                self._temp_dir = _start_local_ray(num_workers or _local_cpus(), cpus_per_worker)
            else:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        cluster_cpus = ray.cluster_resources().get("CPU", 0.0)
        self.num_workers = num_workers or max(1, int(cluster_cpus // cpus_per_worker))
        if self.num_workers * cpus_per_worker > cluster_cpus:
            self.close()
            raise UsageError(f"{self.num_workers} workers of {cpus_per_worker:g} CPU need "
                             f"{self.num_workers * cpus_per_worker:g} CPUs; the Ray cluster has {cluster_cpus:g}")

    def map_shards(self, make_worker: WorkerFactory[ShardT, ResultT], shards: Sequence[ShardT], *,
                   ordered: bool = False) -> Iterator[tuple[int, ResultT]]:
        if not shards:
            return
        actors = self._install(make_worker, min(self.num_workers, len(shards)))
        pool = ActorPool(actors)
        run = pool.map if ordered else pool.map_unordered
        finished = False
        try:
            yield from run(lambda actor, item: actor.run.remote(*item), list(enumerate(shards)))
            finished = True
        except RayTaskError as error:
            if isinstance(error.cause, MmelError):   # the user's error (bad data...), not a remote traceback
                raise error.cause from None
            raise
        except RayActorError as error:
            raise WorkerLostError(f"a Ray worker died ({error.__class__.__name__}); the shards that finished "
                                  "are kept: rerun the command to do the rest") from error
        finally:
            if finished:
                for actor in actors:
                    actor.release.remote()
            else:   # failed or abandoned: shards may still run on the actors; start afresh next time
                self._kill_actors()

    def _install(self, make_worker: WorkerFactory, count: int) -> list[Any]:
        """`count` live actors, each holding a worker built by `make_worker` (shipped once, via the object store)."""
        while len(self._actors) < count:
            self._actors.append(_ShardActor.options(num_cpus=self.cpus_per_worker).remote())
        actors = self._actors[:count]
        factory = ray.put(make_worker)
        try:
            ray.get([actor.install.remote(factory) for actor in actors])
        except RayTaskError as error:
            self._kill_actors()
            if isinstance(error.cause, MmelError):
                raise error.cause from None
            raise
        except RayActorError as error:
            self._kill_actors()
            raise WorkerLostError(f"a Ray worker died while starting ({error.__class__.__name__})") from error
        return actors

    def _kill_actors(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []

    def close(self) -> None:
        """Stop the workers; disconnect if this engine connected (stopping the Ray it started). Idempotent."""
        if ray.is_initialized():
            self._kill_actors()
        if self._connected_here and ray.is_initialized():
            ray.shutdown()
        self._connected_here = False
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _local_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _start_local_ray(num_workers: int, cpus_per_worker: float) -> Path:
    """Start a private Ray on this machine for one command; returns its temporary directory."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")   # no reports to the outside
    temp_dir = Path(tempfile.mkdtemp(prefix="mmel-ray-", dir=TEMP_PARENT))
    try:
        ray.init(address="local", num_cpus=math.ceil(num_workers * cpus_per_worker), include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING, _temp_dir=str(temp_dir),
                 _node_ip_address=LOOPBACK)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return temp_dir


__all__ = ["RayEngine"]
