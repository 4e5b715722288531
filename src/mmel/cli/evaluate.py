"""`mmel evaluate`: rank a split with a model or baseline and write JSON + Markdown reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mmel.cli.choices import FirstStageName, ProtocolName
from mmel.cli.errors import exit_on_user_errors
from mmel.core.errors import UsageError
from mmel.experiments import BASELINES

console = Console()


def evaluate(
    dataset: Annotated[Path, typer.Argument(help="Dataset directory (mmel JSONL or MIMIC layout).")],
    model: Annotated[str, typer.Option(
        help=f"A baseline ({', '.join(BASELINES)}) or a trained checkpoint directory.")] = "bm25",
    split: Annotated[str, typer.Option(help="Split to rank.")] = "test",
    features: Annotated[Path | None, typer.Option(help="Feature store (needed by dense and trained models).")] = None,
    feature_view_id: Annotated[str | None, typer.Option("--feature-view", help="Feature view to read when the store "
                                                        "holds several that fit (see `mmel features info`).")] = None,
    first_stage: Annotated[FirstStageName | None, typer.Option(
        help="Two-stage ranking through the served linker: the first stage picks the top K, the model "
             "reranks them (an index is built in a temporary directory unless --index names one).")] = None,
    index: Annotated[Path | None, typer.Option(
        help="With --first-stage: an existing index of this dataset's KB for the model (mmel index build).")] = None,
    protocol: Annotated[ProtocolName, typer.Option(
        help="full-kb (every entity, the papers' protocol) or dim-candidates (the gold among its mention's "
             "--candidates fuzzy name candidates, DIM's rule; not comparable with full-kb).")
                          ] = ProtocolName["full-kb"],
    candidates: Annotated[int, typer.Option(help="K: two-stage candidates, or the DIM protocol's candidates.")] = 100,
    sample: Annotated[int, typer.Option(help="Rank a seeded sample of this many mentions (0 = the whole split).")
                      ] = 0,
    seed: Annotated[int, typer.Option(help="Seed of --sample.")] = 0,
    name_prior: Annotated[float, typer.Option(
        help="Add this multiple of the surface-name match to a trained model's scores (0 = the model alone).")] = 0.0,
    fitted_prior: Annotated[bool, typer.Option(
        "--fitted-prior", help="Add the context prior stored in the checkpoint (by `mmel fit-prior --write`, or "
                               "its name prior) to the model's scores, as `mmel index build` serves it.")] = False,
    out: Annotated[Path | None, typer.Option(help="Directory for <name>.json and <name>.md.")] = None,
) -> None:
    """Evaluate a model or baseline on a dataset split (full-KB ranking; ties count against the gold)."""
    from mmel.data import load_dataset
    from mmel.evaluation.report import write_report
    from mmel.experiments.evaluate import evaluate as run_evaluation
    from mmel.experiments.evaluate import features_for
    from mmel.retrieval.index_build import ModelSpec

    with exit_on_user_errors():
        if fitted_prior and (name_prior or model in BASELINES):
            raise UsageError("--fitted-prior reads a trained checkpoint's prior; it replaces --name-prior")
        dataset = load_dataset(dataset)
        feature_view = (features_for(features, dataset, model, feature_view_id) if features is not None
                        else None)
        prior_weights = ModelSpec.read(Path(model)).prior.to_dict() if fitted_prior else None
        report = run_evaluation(dataset, split, model, features=feature_view,
                                first_stage=first_stage.value if first_stage else None, protocol=protocol.value,
                                num_candidates=candidates, sample=sample, seed=seed, name_prior_weight=name_prior,
                                prior_weights=prior_weights, index_dir=index)
        console.print(report.to_markdown())
        if "errors" in report.extra:
            kinds = ", ".join(f"{kind} {count}" for kind, count in report.extra["errors"].items())
            console.print(f"errors by type: {kinds}")
        if out is not None:
            json_path, markdown_path = write_report(report, out)
            console.print(f"wrote {json_path} and {markdown_path}")


DEFAULT_PRIOR_WEIGHTS = [0.0, 4.0, 8.0, 16.0, 32.0, 64.0]


def tune_name_prior(
    checkpoint: Annotated[Path, typer.Argument(help="Trained model checkpoint directory.")],
    dataset: Annotated[Path, typer.Option("--dataset", "--data", help="Dataset directory with the split to tune on.")],
    features: Annotated[Path, typer.Option("--features", help="Feature store of the dataset.")],
    split: Annotated[str, typer.Option(help="Split to tune on (never the test split you report).")] = "dev",
    weights: Annotated[list[float] | None, typer.Option("--weight", help="A weight to try (repeat the option).")
                       ] = None,
    first_stage: Annotated[FirstStageName, typer.Option(help="First stage.")] = FirstStageName.hybrid,
    candidates: Annotated[int, typer.Option(min=1, help="Candidates reranked per mention.")] = 100,
    write: Annotated[bool, typer.Option("--write", help="Store the best weight in the checkpoint's config.json "
                                                        "(used by `mmel index build`).")] = False,
) -> None:
    """Tune the weight of the surface-name match added to a model's scores, on a dev split."""
    from mmel.core.checkpoint import update_checkpoint_header
    from mmel.data import load_dataset
    from mmel.experiments.evaluate import features_for
    from mmel.experiments.evaluate import tune_name_prior as run_tuning

    with exit_on_user_errors():
        dataset = load_dataset(dataset)
        tuning = run_tuning(dataset, split, checkpoint, features_for(features, dataset, str(checkpoint)),
                            weights or DEFAULT_PRIOR_WEIGHTS, first_stage=first_stage.value, num_candidates=candidates)
        console.print(tuning.to_markdown())
        if write:
            update_checkpoint_header(checkpoint, "inference", {
                "name_prior_weight": tuning.best_weight,
                "tuned_on": f"{dataset.name} {tuning.split}, {tuning.mentions} mentions, {first_stage.value} top "
                            f"{candidates}, H@1 {100 * tuning.metrics[tuning.best_weight]['hits@1']:.2f}"})
            console.print(f"wrote name_prior_weight {tuning.best_weight:g} into {checkpoint}")


def fit_prior(
    checkpoint: Annotated[Path, typer.Argument(help="Trained model checkpoint directory.")],
    dataset: Annotated[Path, typer.Option("--dataset", "--data", help="Dataset directory with the split to fit on.")],
    features: Annotated[Path, typer.Option("--features", help="Feature store of the dataset.")],
    split: Annotated[str, typer.Option(help="Split to fit on (never the test split you report).")] = "dev",
    feature: Annotated[list[str] | None, typer.Option(
        "--feature", help="A context feature to fit (repeat the option; default: all of "
                          "mmel.lexical.context_features.FEATURE_NAMES).")] = None,
    folds: Annotated[int, typer.Option(min=2, help="Cross-validation folds of the report.")] = 5,
    ablation: Annotated[bool, typer.Option("--ablation", help="Also cross-validate the prior without each feature "
                                                              "in turn.")] = False,
    first_stage: Annotated[FirstStageName, typer.Option(help="First stage.")] = FirstStageName.hybrid,
    candidates: Annotated[int, typer.Option(min=1, help="Candidates reranked per mention.")] = 100,
    write: Annotated[bool, typer.Option("--write", help="Store the fitted weights in the checkpoint's config.json "
                                                        "(served by `mmel index build`).")] = False,
) -> None:
    """Fit the context prior (name match, life years, pronouns, shared words, entry length) on a dev split."""
    from mmel.core.checkpoint import update_checkpoint_header
    from mmel.data import load_dataset
    from mmel.experiments.context_prior import fit_context_prior
    from mmel.experiments.evaluate import features_for
    from mmel.lexical.context_features import FEATURE_NAMES

    with exit_on_user_errors():
        dataset = load_dataset(dataset)
        fit = fit_context_prior(dataset, split, checkpoint, features_for(features, dataset, str(checkpoint)),
                                feature_names=feature or FEATURE_NAMES, first_stage=first_stage.value,
                                num_candidates=candidates, folds=folds, ablation=ablation)
        console.print(fit.to_markdown())
        if write:
            scores = fit.cross_validated["context prior (fitted)"]
            update_checkpoint_header(checkpoint, "inference", {
                "prior_weights": fit.weights,
                "tuned_on": f"{dataset.name} {fit.split}, {fit.mentions} mentions, {first_stage.value} top "
                            f"{candidates}, {folds}-fold cross-validated H@1 {100 * scores['hits@1']:.2f}"})
            console.print(f"wrote the context prior into {checkpoint}")


def unit_analysis(
    checkpoint: Annotated[Path, typer.Argument(help="Trained model checkpoint directory.")],
    dataset: Annotated[Path, typer.Option("--dataset", "--data", help="Dataset directory.")],
    features: Annotated[Path, typer.Option("--features", help="Feature store of the dataset.")],
    split: Annotated[str, typer.Option(help="Split to analyse.")] = "test",
    first_stage: Annotated[FirstStageName, typer.Option(help="First stage.")] = FirstStageName.hybrid,
    candidates: Annotated[int, typer.Option(min=1, help="Candidates reranked per mention.")] = 100,
    out: Annotated[Path | None, typer.Option(help="Also write the analysis as JSON to this file.")] = None,
) -> None:
    """Rank each mention's served shortlist by every unit of the model alone: what each unit contributes."""
    import dataclasses

    from mmel.core.paths import atomic_write_json
    from mmel.data import load_dataset
    from mmel.experiments.evaluate import features_for
    from mmel.experiments.units import unit_analysis as run_analysis

    with exit_on_user_errors():
        dataset = load_dataset(dataset)
        analysis = run_analysis(dataset, split, checkpoint, features_for(features, dataset, str(checkpoint)),
                                first_stage=first_stage.value, num_candidates=candidates)
        console.print(analysis.to_markdown())
        if out is not None:
            atomic_write_json(out, dataclasses.asdict(analysis))
            console.print(f"wrote {out}")
