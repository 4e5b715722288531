"""The `--engine local|ray`, `--workers` and `--ray-address` options, shared by the batch commands.

`local` (the default) runs in this process and never imports Ray. `ray` imports `mmel.scale`
only then: it joins the cluster at `--ray-address` (or $RAY_ADDRESS), or else starts a private
Ray on this machine for the command and stops it at the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from enum import Enum
from typing import Annotated

import typer

from mmel.core.engine import Engine, LocalEngine
from mmel.core.errors import UsageError


class EngineName(str, Enum):
    local = "local"
    ray = "ray"


EngineOption = Annotated[EngineName, typer.Option(
    "--engine", help="Where the batch work runs: local (this process, the default) or ray (Ray workers; "
                     "the data and output paths must be the same on every node).")]
WorkersOption = Annotated[int | None, typer.Option(
    "--workers", min=1, help="With --engine ray: worker processes (default: one per CPU of the cluster).")]
RayAddressOption = Annotated[str | None, typer.Option(
    "--ray-address", envvar="RAY_ADDRESS", help="With --engine ray: join this running Ray cluster (e.g. "
                                                "127.0.0.1:6379 or auto); default: start a Ray for this command.")]


@contextlib.contextmanager
def open_engine(engine: EngineName, workers: int | None = None, ray_address: str | None = None) -> Iterator[Engine]:
    """The engine the options ask for, closed (a Ray started here stopped) when the block ends."""
    if engine is EngineName.local:
        if workers is not None:
            raise UsageError("--workers needs --engine ray (the local engine is one process)")
        yield LocalEngine()
        return
    from mmel.scale.ray_engine import RayEngine

    with RayEngine(workers, address=ray_address) as ray_engine:
        yield ray_engine


__all__ = ["EngineName", "EngineOption", "RayAddressOption", "WorkersOption", "open_engine"]
