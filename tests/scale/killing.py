"""A worker that SIGKILLs its own process when it receives a chosen shard: a worker killed mid-job, for real."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KillOnShard:
    """Worker factory wrapping `make_worker`: the worker dies (SIGKILL, no clean-up) on a shard `is_victim` picks."""

    make_worker: Callable[[], Callable[[Any], Any]]
    is_victim: Callable[[Any], bool]

    def __call__(self) -> Callable[[Any], Any]:
        worker = self.make_worker()

        def run(shard: Any) -> Any:
            if self.is_victim(shard):
                os.kill(os.getpid(), signal.SIGKILL)
            return worker(shard)
        return run


@dataclass
class KillingEngine:
    """An engine whose workers die on the shard `is_victim` picks; otherwise the wrapped (real) engine."""

    engine: Any
    is_victim: Callable[[Any], bool]

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def num_workers(self) -> int:
        return self.engine.num_workers

    def map_shards(self, make_worker: Callable, shards: Sequence[Any], *, ordered: bool = False) -> Iterator:
        return self.engine.map_shards(KillOnShard(make_worker, self.is_victim), shards, ordered=ordered)
