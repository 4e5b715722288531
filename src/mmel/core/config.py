"""Typed configs: dataclasses that reject unknown keys and round-trip through JSON."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, ClassVar, TypeVar

from mmel.core.errors import MmelError

C = TypeVar("C", bound="ConfigBase")


class ConfigError(MmelError, ValueError):
    """A config key or value that does not fit the dataclass."""


@dataclasses.dataclass
class ConfigBase:
    """Base of every config. Subclasses are dataclasses with paper defaults and comments citing the spec."""

    model_type: ClassVar[str] = ""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        """Build from a dict; unknown keys raise with the list of valid ones."""
        valid = cls.field_names()
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} key(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
        hints = typing.get_type_hints(cls)
        converted = {key: _coerce(cls.__name__, key, value, hints.get(key)) for key, value in values.items()}
        return cls(**converted)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))

    def replace(self: C, **changes: Any) -> C:
        return type(self).from_dict({**self.to_dict(), **changes})


def _coerce(owner: str, key: str, value: Any, hint: Any) -> Any:
    """Check simple scalar types; JSON gives lists where tuples are declared."""
    if hint is None:
        return value
    origin = typing.get_origin(hint)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{owner}.{key} must be true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{owner}.{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{owner}.{key} must be a number, got {value!r}")
        return float(value)
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{owner}.{key} must be a string, got {value!r}")
    return value
