"""Option choices built from the library's name tables, so `--help` and validation list what the code has."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from typing import Annotated

import typer

from mmel.backbones import BACKBONES
from mmel.backbones.base import QUERY_RUNTIMES
from mmel.experiments import PROTOCOLS
from mmel.retrieval import FIRST_STAGES


def choices(name: str, values: Iterable[str]) -> type[Enum]:
    """A str Enum whose members are `values` (typer validates and lists them)."""
    return Enum(name, {value: value for value in values}, type=str)  # type: ignore[return-value]


FirstStageName = choices("FirstStageName", FIRST_STAGES)
BackboneName = choices("BackboneName", BACKBONES.names())
ProtocolName = choices("ProtocolName", PROTOCOLS)
QueryRuntimeName = choices("QueryRuntimeName", QUERY_RUNTIMES)

QueryRuntimeOption = Annotated[QueryRuntimeName, typer.Option(  # type: ignore[valid-type]
    "--query-runtime", help="How queries are encoded: auto (the fastest runtime that changes no answer: ONNX "
                            "Runtime float32 for minilm_effnet), float32 (PyTorch, the feature store's exact path), "
                            "onnx, or onnx-int8 (faster; a few answers change, docs/RESULTS.md).")]

__all__ = ["BackboneName", "FirstStageName", "ProtocolName", "QueryRuntimeName", "QueryRuntimeOption", "choices"]
