"""Explicit, lazy name tables: name -> "module:attribute", imported on first use."""

from __future__ import annotations

import importlib
from typing import Any

from mmel.core.errors import MmelError


class UnknownNameError(MmelError, KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class Registry:
    """A literal table of names; `get` imports the target lazily and lists the names on a miss."""

    def __init__(self, kind: str, table: dict[str, str]):
        self.kind = kind
        self._table = dict(table)

    def names(self) -> list[str]:
        return sorted(self._table)

    def __contains__(self, name: object) -> bool:
        return name in self._table

    def get(self, name: str) -> Any:
        try:
            target = self._table[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}") from None
        module_name, attribute = target.split(":")
        return getattr(importlib.import_module(module_name), attribute)
