"""`mmel train`: train a model from a recipe (a thin shell over `mmel.training.run.train`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmel.cli.errors import exit_on_user_errors


def train(
    recipe: Annotated[str, typer.Option("--recipe", help="Packaged recipe name (e.g. mimic-wikimel-cpu, "
                                                         "mimic-paper) or a recipe .yaml file.")],
    dataset: Annotated[Path, typer.Option("--dataset", "--data",
                                          help="Dataset directory (mmel JSONL or MIMIC layout).")],
    out: Annotated[Path, typer.Option("--out", help="Run directory: logs, resume state, best/ checkpoint.")],
    features: Annotated[Path | None, typer.Option("--features", help="Feature store directory (frozen-backbone "
                                                                     "recipes).")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a recipe key, e.g. --set trainer.max_epochs=3 (repeatable). Several devices: "
                      "--set trainer.devices=4 (--set trainer.num_nodes=N on a cluster); data.batch_size stays "
                      "the global batch.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last epoch.")] = False,
) -> None:
    """Train a model from a recipe; the best checkpoint by dev MRR is exported to OUT/best.

    With --set trainer.devices=N (N > 1) the command runs once per device (Lightning's DDP starts
    the others): each process trains on its share of every batch against the whole batch's
    entities, gathered across devices, so the objective is the same as on one device.
    """
    # imported here, not at module level: Lightning takes seconds to import and other commands need none of it
    from mmel.training.recipe import load_recipe
    from mmel.training.run import train as run_training

    with exit_on_user_errors():
        loaded = load_recipe(recipe, overrides or [])
        result = run_training(loaded, data_dir=dataset, out_dir=out, features_dir=features, resume=resume)
    typer.echo(result.summary())
