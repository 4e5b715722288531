"""The `mmel` command: one typer sub-app per command group, each a thin shell over the library."""

from __future__ import annotations

import typer

from mmel.cli import data, demo, enrich, evaluate, features, index, link, models, serve, train

app = typer.Typer(name="mmel", help="Multimodal entity linking: data, features, training, evaluation, linking.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
app.add_typer(data.app, name="data")
app.add_typer(features.app, name="features")
app.add_typer(enrich.app, name="enrich")
app.command(name="demo")(demo.demo)
app.command(name="evaluate")(evaluate.evaluate)
app.command(name="tune-name-prior")(evaluate.tune_name_prior)
app.command(name="fit-prior")(evaluate.fit_prior)
app.command(name="unit-analysis")(evaluate.unit_analysis)
app.add_typer(index.app, name="index")
app.command(name="link")(link.link)
app.add_typer(models.app, name="models")
app.command(name="serve")(serve.serve)
app.command(name="train")(train.train)
