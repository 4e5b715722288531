"""`mmel demo`: the main job on the example data shipped in the repository.

Builds (once) an index of the example KB with the shipped MIMIC checkpoint, links a few example
test mentions and prints their top entities with scores, then evaluates the linker and the BM25
baseline on the example test split. Every step is a library call; this file only prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mmel.cli.errors import exit_on_user_errors

DEFAULT_DATA = Path("examples/wikimel-mini")
DEFAULT_CHECKPOINT = Path("checkpoints/mimic-wikimel-minilm_effnet")
console = Console()


def demo(
    dataset: Annotated[Path, typer.Option("--dataset", "--data", help="Example dataset (mmel JSONL).")] = DEFAULT_DATA,
    model: Annotated[Path, typer.Option(help="Trained checkpoint directory.")] = DEFAULT_CHECKPOINT,
    work: Annotated[Path, typer.Option(help="Where the example index is built (reused on later runs).")] = Path(
        ".mmel-demo"),
    mentions: Annotated[int, typer.Option(min=1, help="How many example test mentions to print.")] = 5,
) -> None:
    """Link example mentions against the example KB with a trained MIMIC, and evaluate on the example split."""
    from mmel.data import load_dataset
    from mmel.experiments.evaluate import evaluate
    from mmel.retrieval.index_build import ModelSpec, build_index, weights_fingerprint
    from mmel.retrieval.linker import Linker

    with exit_on_user_errors():
        dataset = load_dataset(dataset)
        prior = ModelSpec.read(model).prior
        index_dir = work / f"index-{weights_fingerprint(model)[:12]}-prior-{prior.fingerprint()}"
        if not index_dir.is_dir():
            console.print(f"building the example index in {index_dir} (once) ...")
            console.print(build_index(dataset, model, index_dir).summary())
        test = dataset.split("test")
        with Linker.load(index_dir) as linker:
            results = linker.link_mentions(test, dataset.root, top_k=3)
        for mention, result in list(zip(test, results, strict=True))[:mentions]:
            console.print(_result_table(mention, result))
        linked = [r for r in results if not isinstance(r, Exception)]
        correct = sum(r.best is not None and r.best.qid == m.gold_qid for m, r in zip(test, results, strict=True)
                      if not isinstance(r, Exception))
        model_name = ("MIMIC + context prior" if prior.beyond_name else
                      f"MIMIC + {prior.name_weight:g} x name match" if prior else "MIMIC")
        console.print(f"\n{model_name} linker on {dataset.name} test: {correct}/{len(linked)} mentions linked to "
                      f"the gold entity at rank 1 (KB of {len(dataset.kb)} entities; "
                      f"{len(results) - len(linked)} failed)")
        console.print("\nBM25 baseline on the same split (full-KB ranking):")
        console.print(evaluate(dataset, "test", "bm25", progress=False).to_markdown())


def _result_table(mention, result) -> Table:
    table = Table(title=f"[bold]{mention.surface}[/] in “{mention.sentence}” (gold {mention.gold_qid})",
                  title_justify="left")
    unit_names = list(result.candidates[0].unit_scores) if not isinstance(result, Exception) and result.candidates \
        else []
    for column in ("rank", "entity", "QID", "score", f"units ({' / '.join(unit_names)})", ""):
        table.add_column(column)
    if isinstance(result, Exception):
        table.add_row("-", f"error: {result}", "", "", "", "")
        return table
    for candidate in result.candidates:
        units = " / ".join(f"{candidate.unit_scores[name]:.2f}" for name in unit_names if name in candidate.unit_scores)
        mark = "✓ gold" if candidate.qid == mention.gold_qid else ""
        table.add_row(str(candidate.rank), candidate.name, candidate.qid, f"{candidate.score:.3f}", units, mark)
    return table
