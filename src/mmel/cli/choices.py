"""Option choices built from the library's name tables, so `--help` and validation list what the code has."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

from mmel.backbones import BACKBONES
from mmel.experiments import PROTOCOLS
from mmel.retrieval import FIRST_STAGES


def choices(name: str, values: Iterable[str]) -> type[Enum]:
    """A str Enum whose members are `values` (typer validates and lists them)."""
    return Enum(name, {value: value for value in values}, type=str)  # type: ignore[return-value]


FirstStageName = choices("FirstStageName", FIRST_STAGES)
BackboneName = choices("BackboneName", BACKBONES.names())
ProtocolName = choices("ProtocolName", PROTOCOLS)

__all__ = ["BackboneName", "FirstStageName", "ProtocolName", "choices"]
