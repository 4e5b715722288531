"""The engine seam: LocalEngine and RayEngine run a worker over every shard exactly once."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from mmel.core.engine import Engine, LocalEngine, split_into_shards
from mmel.core.errors import DataError, UsageError


@dataclass(frozen=True)
class Squares:
    """A worker factory: squares numbers, refuses negative ones, and says which process did it."""

    def __call__(self):
        def square_all(shard: list[int]) -> tuple[list[int], int]:
            if any(number < 0 for number in shard):
                raise DataError("negative number", path="numbers", record=str(shard))
            return [number * number for number in shard], os.getpid()
        return square_all


class ClosingWorker:
    closed = 0

    def __call__(self, shard: list[int]) -> int:
        return sum(shard)

    def close(self) -> None:
        ClosingWorker.closed += 1


def test_local_engine_maps_in_order_in_this_process_and_closes_its_worker() -> None:
    shards = split_into_shards(list(range(10)), 4)
    assert shards == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with LocalEngine() as engine:
        assert isinstance(engine, Engine)
        results = list(engine.map_shards(Squares(), shards))
        assert [position for position, _ in results] == [0, 1, 2]
        assert [value for _, (values, _) in results for value in values] == [n * n for n in range(10)]
        assert {pid for _, (_, pid) in results} == {os.getpid()}
        assert list(engine.map_shards(ClosingWorker, shards)) == [(0, 6), (1, 22), (2, 17)]
    assert ClosingWorker.closed == 1


def test_shard_size_must_be_positive() -> None:
    with pytest.raises(UsageError, match="shard_size"):
        split_into_shards([1, 2], 0)


@pytest.mark.ray
@pytest.mark.xdist_group("ray")
@pytest.mark.parametrize("ordered", [True, False])
def test_ray_engine_runs_each_shard_once_on_its_workers(ray_engine, ordered: bool) -> None:
    shards = split_into_shards(list(range(40)), 3)
    results = list(ray_engine.map_shards(Squares(), shards, ordered=ordered))
    positions = [position for position, _ in results]
    assert sorted(positions) == list(range(len(shards)))
    if ordered:
        assert positions == list(range(len(shards)))
    for position, (values, _) in results:
        assert values == [n * n for n in shards[position]]
    assert os.getpid() not in {pid for _, (_, pid) in results}
    assert ray_engine.num_workers == 2 and isinstance(ray_engine, Engine)


@pytest.mark.ray
@pytest.mark.xdist_group("ray")
def test_a_workers_user_error_reaches_the_caller_as_itself(ray_engine) -> None:
    with pytest.raises(DataError, match=r"numbers, record \[5, -1\]: negative number"):
        list(ray_engine.map_shards(Squares(), [[1, 2], [5, -1], [3]], ordered=True))
    assert [values for _, (values, _) in ray_engine.map_shards(Squares(), [[2], [3]], ordered=True)] == [[4], [9]]


@pytest.mark.ray
@pytest.mark.xdist_group("ray")
def test_more_workers_than_the_cluster_has_cpus_is_refused(ray_engine) -> None:
    from mmel.scale.ray_engine import RayEngine

    with pytest.raises(UsageError, match="need 5 CPUs; the Ray cluster has 2"):
        RayEngine(5)
    assert [values for _, (values, _) in ray_engine.map_shards(Squares(), [[4]])] == [[16]]   # still connected

