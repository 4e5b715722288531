"""The `mmel` command: one typer sub-app per command group, each a thin shell over the library."""

from __future__ import annotations

import typer

from mmel.cli import data, evaluate, features

app = typer.Typer(name="mmel", help="Multimodal entity linking: data, features, training, evaluation, linking.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
app.add_typer(data.app, name="data")
app.add_typer(features.app, name="features")
app.command(name="evaluate")(evaluate.evaluate)
