"""`mmel evaluate`: rank a split with a model or baseline and write JSON + Markdown reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mmel.cli.errors import exit_on_user_errors

console = Console()


def evaluate(
    data: Annotated[Path, typer.Argument(help="Dataset directory (mmel JSONL or MIMIC layout).")],
    model: Annotated[str, typer.Option(help="bm25, bm25-text, dense, or a trained checkpoint directory.")] = "bm25",
    split: Annotated[str, typer.Option(help="Split to rank.")] = "test",
    features: Annotated[Path | None, typer.Option(help="Feature store (needed by dense and trained models).")] = None,
    first_stage: Annotated[str | None, typer.Option(
        help="Two-stage ranking: dense, bm25 or hybrid picks the top K, the model reranks them.")] = None,
    candidates: Annotated[int, typer.Option(help="K for two-stage ranking.")] = 100,
    sample: Annotated[int, typer.Option(help="Rank a seeded sample of this many mentions (0 = the whole split).")
                      ] = 0,
    seed: Annotated[int, typer.Option(help="Seed of --sample.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Directory for <name>.json and <name>.md.")] = None,
) -> None:
    """Evaluate a model or baseline on a dataset split (full-KB ranking; ties count against the gold)."""
    from mmel.data import load_dataset
    from mmel.evaluation.report import write_report
    from mmel.features.store import open_features
    from mmel.retrieval.evaluate import evaluate as run_evaluation

    with exit_on_user_errors():
        dataset = load_dataset(data)
        feature_view = open_features(features, dataset.name) if features is not None else None
        report = run_evaluation(dataset, split, model, features=feature_view, first_stage=first_stage,
                                num_candidates=candidates, sample=sample, seed=seed)
        console.print(report.to_markdown())
        if out is not None:
            json_path, markdown_path = write_report(report, out)
            console.print(f"wrote {json_path} and {markdown_path}")
