"""One rule for every command: a user error ends with a one-line message and exit code 1, not a traceback.

User errors are mmel's own (`MmelError`: bad data, mismatched artifacts, bad options, unknown
names), the operating system's (a missing file, no permission) and settings that fail their
pydantic validation. Anything else is a bug and
keeps its traceback, so that it can be reported and fixed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pydantic
import typer

from mmel.core.errors import MmelError


@contextlib.contextmanager
def exit_on_user_errors() -> Iterator[None]:
    """Turn mmel errors and OS errors into `error: ...` and exit code 1; let every other exception through."""
    try:
        yield
    except (MmelError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    except pydantic.ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in error.errors())
        typer.echo(f"error: {problems}", err=True)
        raise typer.Exit(1) from None
