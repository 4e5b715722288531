"""`mmel features ...`: build and inspect the feature store."""

from __future__ import annotations

import typer

app = typer.Typer(help="Encode datasets once into the feature store.", no_args_is_help=True)
