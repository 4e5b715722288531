"""`mmel data ...`: prepare, validate and convert datasets."""

from __future__ import annotations

import typer

app = typer.Typer(help="Prepare, validate and convert MEL datasets.", no_args_is_help=True)
