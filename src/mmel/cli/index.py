"""`mmel index ...`: build a link index, change its entities in place, describe it, calibrate NIL.

The library (torch, FAISS, transformers) is imported inside the commands, so `mmel --help` and
the other command groups start in a fraction of a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mmel.cli.choices import FirstStageName
from mmel.cli.engines import EngineName, EngineOption, RayAddressOption, WorkersOption, open_engine
from mmel.cli.errors import exit_on_user_errors
from mmel.core.paths import atomic_write_text

app = typer.Typer(help="Build link indexes and add, update or remove their entities.", no_args_is_help=True)




@app.command()
def build(
    dataset: Annotated[Path, typer.Option("--dataset", "--kb", help="Dataset directory (or kb.jsonl) whose "
                                                                     "knowledge base to index.")],
    model: Annotated[Path, typer.Option("--model", help="Trained model checkpoint directory.")],
    out: Annotated[Path, typer.Option("--out", help="Index directory to write (replaced atomically if present).")],
    features: Annotated[Path | None, typer.Option("--features", help="Feature store to take entity features from "
                                                                     "(default: encode on the fly).")] = None,
    first_stage: Annotated[FirstStageName, typer.Option(help="Candidate retrieval.")] = FirstStageName.hybrid,
    kind: Annotated[str, typer.Option("--kind", help="FAISS index: auto (exact up to --exact-max-entities, IVF "
                                                     "above), flat, hnsw or ivf.")] = "auto",
    exact_max_entities: Annotated[int, typer.Option(min=1, help="Largest KB indexed exactly by --kind auto.")
                                  ] = 200_000,
    ivf_probes: Annotated[int, typer.Option(min=0, help="IVF lists scanned per query (large KBs); 0: the fewest "
                                                         "that reach --recall-target, measured at build time.")] = 0,
    ivf_codes: Annotated[str, typer.Option(help="IVF vector storage: fp16 (half of float32), flat (float32) or "
                                                "sq8 (8-bit, a quarter).")
                         ] = "fp16",
    recall_target: Annotated[float, typer.Option(min=0.0, max=1.0, help="Approximate vector index: share of the "
                                                                         "golds an exact search finds in its top "
                                                                         "100 that the index must find too.")
                             ] = 0.995,
    reranker: Annotated[str, typer.Option(help="Rerank candidates with the 'model', or 'none'.")] = "model",
    vectors: Annotated[str, typer.Option(help="What the dense first stage searches: the 'backbone' text vectors, "
                                              "or the 'model''s own (a dual encoder such as DIM: with "
                                              "--first-stage dense --reranker none, exact full-KB ranking).")
                       ] = "backbone",
    cache_dtype: Annotated[str, typer.Option(help="Reranker cache storage: auto, float32, float16 or int8 "
                                                       "(per-vector scales; half of float16).")] = "auto",
    name_prior_weight: Annotated[float | None, typer.Option(
        min=0.0, help="Serve the name prior alone, with this weight of the surface-name match added to reranker "
                      "scores (0: the model alone). Default: the checkpoint's prior (`mmel fit-prior` or "
                      "`mmel tune-name-prior`), else none.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
    engine: EngineOption = EngineName.local,
    workers: WorkersOption = None,
    ray_address: RayAddressOption = None,
) -> None:
    """Build an index: entity vectors (FAISS), BM25, entity metadata (SQLite) and the reranker's entity cache.

    With --engine ray, workers encode the entities' reranker cache and vectors shard by shard (each
    writes its rows into the index being built); FAISS training and adding run here, as without it.
    """
    from mmel.data import load_dataset
    from mmel.retrieval.index_build import IndexBuildConfig, build_index

    with exit_on_user_errors():
        config = IndexBuildConfig(first_stage=first_stage.value, vector_index=kind, reranker=reranker, vectors=vectors,
                                  exact_max_entities=exact_max_entities, ivf_num_probes=ivf_probes,
                                  ivf_codes=ivf_codes, recall_target=recall_target,
                                  cache_dtype=cache_dtype,
                                  name_prior_weight=name_prior_weight)
        with open_engine(engine, workers, ray_address) as runner:
            report = build_index(load_dataset(dataset), model, out, config=config, features_store=features,
                                 progress=not quiet, engine=runner)
    typer.echo(report.summary())


@app.command()
def add(
    index_dir: Annotated[Path, typer.Argument(help="Index directory.")],
    kb: Annotated[Path, typer.Option("--kb", help="kb.jsonl with the entities to add (same QID = update).")],
    images_root: Annotated[Path | None, typer.Option(help="Directory the entities' image paths are relative to "
                                                          "(default: the file's directory).")] = None,
) -> None:
    """Add or update entities in place; they are linkable at once, no rebuild."""
    from mmel.data.jsonl_format import read_kb_jsonl
    from mmel.retrieval.linker import Linker

    with exit_on_user_errors():
        root = images_root if images_root is not None else kb.parent
        entities = list(read_kb_jsonl(kb, root))
        with Linker.load(index_dir) as linker:
            report = linker.add_entities(entities, root, progress=True)
    typer.echo(report.summary())


@app.command()
def remove(
    index_dir: Annotated[Path, typer.Argument(help="Index directory.")],
    qids: Annotated[list[str], typer.Argument(help="QIDs to remove.")],
) -> None:
    """Remove entities in place; unknown QIDs fail the command and nothing is removed."""
    from mmel.retrieval.linker import Linker

    with exit_on_user_errors(), Linker.load(index_dir) as linker:
        report = linker.remove_entities(qids)
    typer.echo(report.summary())


@app.command()
def compact(index_dir: Annotated[Path, typer.Argument(help="Index directory.")]) -> None:
    """Reclaim the disk space that removed and replaced entities still use in the reranker cache."""
    from mmel.retrieval.linker import Linker

    with exit_on_user_errors(), Linker.load(index_dir) as linker:
        report = linker.compact()
    typer.echo(f"cache rows {report.rows_before:,} -> {report.rows_after:,}, "
               f"segments {report.segments_before} -> {report.segments_after}")


@app.command()
def info(index_dir: Annotated[Path, typer.Argument(help="Index directory.")]) -> None:
    """Describe an index (model, backbone, KB checksum, counts, changes) as JSON."""
    from mmel.retrieval.index_build import describe_index

    with exit_on_user_errors():
        typer.echo(json.dumps(describe_index(index_dir), indent=2, ensure_ascii=False))


@app.command(name="calibrate-nil")
def calibrate_nil(
    index_dir: Annotated[Path, typer.Argument(help="Index directory (nil.json is written into it).")],
    dataset: Annotated[Path, typer.Option("--dataset", help="Dataset directory with the dev split.")],
    split: Annotated[str, typer.Option(help="Split to fit the threshold on.")] = "dev",
    nil_fraction: Annotated[float, typer.Option(min=0.01, max=0.9, help="Share of dev mentions that play NIL "
                                                                        "(their gold entity hidden).")] = 0.1,
    criterion: Annotated[str, typer.Option(help="What the threshold maximises: accuracy, or precision "
                                                "(with --target-precision).")] = "accuracy",
    target_precision: Annotated[float | None, typer.Option(help="With --criterion precision: the link precision "
                                                                "to reach.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the simulated NIL mentions.")] = 0,
    statistic: Annotated[str, typer.Option(help="What the threshold applies to: the top-1 'score', or its "
                                                "'margin' over the runner-up.")] = "margin",
    report: Annotated[Path | None, typer.Option(help="Also write the trade-off table (Markdown) here.")] = None,
) -> None:
    """Fit the NIL threshold on a dev split and print its precision/recall trade-off."""
    from mmel.data import load_dataset
    from mmel.retrieval.linker import Linker

    with exit_on_user_errors():
        data = load_dataset(dataset)
        with Linker.load(index_dir) as linker:
            calibration = linker.calibrate_nil(data.split(split), data.root, nil_fraction=nil_fraction,
                                               criterion=criterion, target_precision=target_precision,
                                               seed=seed, statistic=statistic)
            linker.set_nil_calibration(calibration)
        table = calibration.to_markdown()
        if report is not None:
            atomic_write_text(report, table)
    typer.echo(table)
