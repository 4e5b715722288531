"""One rule for every command: a user error ends with a one-line message and exit code 1, not a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from mmel.core.errors import MmelError


@contextlib.contextmanager
def exit_on_user_errors() -> Iterator[None]:
    """Turn mmel errors (bad data, mismatched artifacts, bad options) and OS errors into `error: ...`, exit 1."""
    try:
        yield
    except (MmelError, OSError, ValueError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(1) from None
