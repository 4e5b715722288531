"""`mmel features ...`: build and inspect the feature store (a thin shell over `mmel.features`)."""

from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from mmel.backbones import DEFAULT_BACKBONE, load_backbone
from mmel.cli.choices import BackboneName
from mmel.cli.engines import EngineName, EngineOption, RayAddressOption, WorkersOption, open_engine
from mmel.cli.errors import exit_on_user_errors
from mmel.core.paths import atomic_write_json
from mmel.data import load_dataset
from mmel.features.templates import TEMPLATES, TEXT_VIEWS

app = typer.Typer(help="Encode datasets once into the feature store.", no_args_is_help=True)


class StorageDtype(str, Enum):
    float16 = "float16"
    float32 = "float32"


@app.command()
def build(
    dataset: Annotated[Path, typer.Argument(help="Dataset directory (mmel JSONL or MIMIC layout).")],
    store: Annotated[Path, typer.Option("--store", help="Feature store directory (created if missing).")],
    backbone: Annotated[BackboneName, typer.Option(help="Encoder pair.")] = BackboneName[DEFAULT_BACKBONE],
    clip_path: Annotated[str | None, typer.Option(help="CLIP checkpoint directory or hub id (--backbone clip; "
                                                       "default openai/clip-vit-base-patch32 from the HF cache).")
                         ] = None,
    template: Annotated[str, typer.Option(help=f"Text template: {', '.join(sorted(TEMPLATES))}.")] = "mimic",
    entity_field: Annotated[str | None, typer.Option(help="Entity text field: attributes or description "
                                                          "(default: the template's).")] = None,
    view: Annotated[list[str] | None, typer.Option(
        help=f"A further text view to store, pooled (repeat the option): {', '.join(sorted(TEXT_VIEWS))}; "
             "e.g. DIM reads mention and caption.")] = None,
    max_length: Annotated[int, typer.Option(min=2, help="Max text tokens (the papers use 40).")] = 40,
    dtype: Annotated[StorageDtype, typer.Option(help="Storage precision.")] = StorageDtype.float16,
    batch_size: Annotated[int, typer.Option(min=1, help="Texts per encoder call.")] = 64,
    image_batch_size: Annotated[int | None, typer.Option(min=1, help="Images per encoder call (default: 1 on "
                                                                     "CPU, --batch-size on a GPU).")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="Torch CPU threads (default: torch's).")] = None,
    splits: Annotated[str | None, typer.Option(help="Comma-separated splits to encode (default: all).")] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="Texts per shard (images: 1/8 of it); the unit of "
                                                        "resumption.")] = 2048,
    device: Annotated[str, typer.Option(help="Torch device for the encoders.")] = "cpu",
    text_layer: Annotated[int | None, typer.Option(
        min=1, help="Store the token states after this text layer instead of the last (the cache partial "
                    "fine-tuning trains the layers above from; recipes' backbone.train_text_layers).")] = None,
    model: Annotated[Path | None, typer.Option(
        help="Encode with this checkpoint's backbone, fine-tuned text layers included (instead of --backbone).")
                     ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the build report as JSON here.")
                        ] = None,
    engine: EngineOption = EngineName.local,
    workers: WorkersOption = None,
    ray_address: RayAddressOption = None,
) -> None:
    """Encode a dataset's KB and mentions into the store; a re-run encodes only what changed.

    With --engine ray, workers encode disjoint shards in parallel and write them into the store; the
    view that makes them visible is written once at the end, so a killed run loses only the shards
    in flight and a rerun does the rest.
    """
    from mmel.backbones.text_layers import LowerTextLayers
    from mmel.features.store import build_features
    from mmel.retrieval.index_build import ModelSpec, load_checked_backbone

    started = time.perf_counter()
    with exit_on_user_errors():
        dataset = load_dataset(dataset)
        if model is not None:
            encoder = load_checked_backbone(ModelSpec.read(model))
        else:
            options = {"path": clip_path} if backbone.value == "clip" and clip_path else {}
            encoder = load_backbone(backbone.value, device=device, **options)
        if text_layer is not None:
            encoder = LowerTextLayers(encoder, text_layer)
        loaded = time.perf_counter()
        with open_engine(engine, workers, ray_address) as runner:
            features = build_features(
                dataset, encoder, store, template=template, entity_field=entity_field, max_text_length=max_length,
                dtype=dtype.value, batch_size=batch_size, image_batch_size=image_batch_size, num_threads=threads,
                splits=splits.split(",") if splits else None, shard_size=shard_size, extra_views=view or (),
                engine=runner)
    report = features.report
    typer.echo(f"view {report.view_id} of {report.dataset}: " +
               ", ".join(f"{name} {rows}" for name, rows in report.rows.items()))
    typer.echo(f"texts: {report.texts_encoded} encoded of {report.unique_texts} unique, "
               f"{report.texts_per_second:.1f} texts/s per worker")
    typer.echo(f"images: {report.images_encoded} encoded of {report.unique_images} usable, "
               f"{report.images_per_second:.1f} images/s per worker; {report.image_report.summary()}")
    typer.echo(f"wall time: {report.wall_seconds:.1f} s build on {report.workers} {report.engine} worker(s) + "
               f"{loaded - started:.1f} s loading data and backbone; store size {report.store_bytes / 2**20:.1f} MiB "
               f"at {store}")
    if json_out is not None:
        atomic_write_json(json_out, {**report.to_dict(), "load_seconds": round(loaded - started, 3),
                                     "backbone": features.manifest["backbone"]})


@app.command()
def info(store: Annotated[Path, typer.Option("--store", help="Feature store directory.")],
         as_json: Annotated[bool, typer.Option("--json", help="Print the full description as JSON.")] = False) -> None:
    """Describe a feature store: its views per dataset and its cache namespaces."""
    from mmel.features.views import describe_store

    with exit_on_user_errors():
        description = describe_store(store)
    if as_json:
        typer.echo(json.dumps(description, indent=2))
        return
    typer.echo(f"{description['store']}: {description['total_bytes'] / 2**20:.1f} MiB")
    for view in description["views"]:
        tables = ", ".join(f"{name} {t['rows']} ({t['with_image']} with image)" for name, t in view["tables"].items())
        typer.echo(f"  view {view['dataset']}/{view['view_id']} [{view['dtype']}, L={view['max_text_length']}, "
                   f"template {view['template']}, built {view['created']}]: {tables}")
    for cache in description["caches"]:
        entries = ", ".join(f"{name} {count}" for name, count in cache["entries"].items())
        typer.echo(f"  cache {cache['namespace']}: {entries}; {cache['bytes'] / 2**20:.1f} MiB")


@app.command()
def prune(
    store: Annotated[Path, typer.Option("--store", help="Feature store directory.")],
    drop_views: Annotated[list[str] | None, typer.Option(
        "--drop-view", help="A view to delete, as DATASET/VIEW_ID (see `mmel features info`); repeatable.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only report what would be removed.")] = False,
) -> None:
    """Delete views, then the cache shards no remaining view uses (run it while no build writes to the store)."""
    from mmel.features.prune import prune_store

    with exit_on_user_errors():
        report = prune_store(store, drop_views=drop_views or [], dry_run=dry_run)
    typer.echo(report.summary())
