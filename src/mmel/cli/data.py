"""`mmel data ...`: prepare, validate and convert datasets (a thin shell over `mmel.data`)."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from mmel.cli.errors import exit_on_user_errors
from mmel.core.paths import atomic_write_json
from mmel.data import convert_dataset, load_dataset, validate_dataset
from mmel.data.raw_release import (
    RICHPEDIAMEL_DEV_FRACTION,
    RICHPEDIAMEL_SEED,
    PreparationReport,
    default_images_dir,
    prepare_richpediamel,
    prepare_wikimel,
)

app = typer.Typer(help="Prepare, validate and convert MEL datasets.", no_args_is_help=True)


class RawRelease(str, Enum):
    wikimel = "wikimel"
    richpediamel = "richpediamel"


class TargetFormat(str, Enum):
    jsonl = "jsonl"
    mimic = "mimic"


@app.command()
def prepare(
    name: Annotated[RawRelease, typer.Argument(help="Which raw release to prepare.")],
    raw: Annotated[Path, typer.Option("--raw", help="Raw data root holding wikimel/, richpediamel/ and images/.")],
    out: Annotated[Path, typer.Option("--out", help="Output dataset directory (mmel JSONL format).")],
    images: Annotated[Path | None, typer.Option("--images", help="Mention images folder (default: RAW/images/NAME "
                                                                 "when it exists).")] = None,
    dev_fraction: Annotated[float, typer.Option(min=0.0, max=0.99, help="RichpediaMEL: share of train carved "
                                                                        "out as dev.")] = RICHPEDIAMEL_DEV_FRACTION,
    seed: Annotated[int, typer.Option(help="RichpediaMEL: seed of the dev split.")] = RICHPEDIAMEL_SEED,
) -> None:
    """Build an mmel dataset from a raw WikiMEL or RichpediaMEL release."""
    images_dir = images if images is not None else default_images_dir(raw, name.value)
    report = PreparationReport(name.value)
    started = time.perf_counter()
    with exit_on_user_errors():
        if name is RawRelease.wikimel:
            prepare_wikimel(raw, out, images_dir, report=report)
        else:
            prepare_richpediamel(raw, out, images_dir, dev_fraction=dev_fraction, seed=seed, report=report)
    typer.echo(report.to_markdown())
    typer.echo(f"Wrote {out} in {time.perf_counter() - started:.1f} s.")


@app.command()
def validate(
    dataset: Annotated[Path, typer.Argument(help="Dataset directory (mmel JSONL or MIMIC layout) or a kb.jsonl file.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON here.")] = None,
    decode_images: Annotated[bool, typer.Option("--decode-images/--no-decode-images",
                                                help="Decode every image, or only check that files exist.")] = True,
    strict: Annotated[bool, typer.Option("--strict", help="Exit with code 1 when the report lists errors.")] = False,
) -> None:
    """Print a Markdown report of a dataset's counts and problems."""
    with exit_on_user_errors():
        report = validate_dataset(load_dataset(dataset), decode_images=decode_images)
        if json_out is not None:
            atomic_write_json(json_out, report.to_dict())
    typer.echo(report.to_markdown())
    if strict and report.errors():
        raise typer.Exit(1)


@app.command()
def convert(
    dataset: Annotated[Path, typer.Argument(help="Dataset to convert (mmel JSONL or MIMIC layout).")],
    to: Annotated[TargetFormat, typer.Option("--to", help="Target format.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory.")],
    prefix: Annotated[str, typer.Option("--prefix", help="MIMIC layout: mention file prefix.")] = "WIKIMEL",
) -> None:
    """Convert a dataset between the MIMIC layout and mmel's JSONL format."""
    with exit_on_user_errors():
        convert_dataset(dataset, out, to.value, prefix=prefix)
    typer.echo(f"Wrote {out} ({to.value}).")


@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", help="Output directory (mmel JSONL format).")],
    entities: Annotated[int, typer.Option(min=2, help="KB size.")] = 1000,
    group_size: Annotated[int, typer.Option(min=1, help="Entities sharing one ambiguous name.")] = 4,
    train: Annotated[int, typer.Option(min=0, help="Train mentions.")] = 800,
    dev: Annotated[int, typer.Option(min=0, help="Dev mentions.")] = 100,
    test: Annotated[int, typer.Option(min=0, help="Test mentions.")] = 100,
    cue_mix: Annotated[str, typer.Option(help="Shares of mentions by cue, image:text:both:none.")
                       ] = "0.3333:0.3333:0.3334:0",
    nil_fraction: Annotated[float, typer.Option(min=0.0, max=0.99, help="Share of NIL mentions.")] = 0.0,
    images: Annotated[bool, typer.Option(help="Render PNG images (off: specs only, for very large KBs).")] = True,
    seed: Annotated[int, typer.Option(help="Seed (the KB depends only on size, group size and seed).")] = 0,
) -> None:
    """Generate a seeded synthetic MEL dataset: namesake groups told apart only by picture and/or text cues."""
    from mmel.data.synthetic import CUE_KINDS, CueMix, generate_dataset

    with exit_on_user_errors():
        shares = cue_mix.split(":")
        if len(shares) != len(CUE_KINDS):
            raise typer.BadParameter(f"--cue-mix needs {len(CUE_KINDS)} shares ({':'.join(CUE_KINDS)}), "
                                     f"got {cue_mix!r}")
        try:
            mix = CueMix(**{kind: float(share) for kind, share in zip(CUE_KINDS, shares, strict=True)})
        except ValueError as error:
            raise typer.BadParameter(f"--cue-mix: {error}") from None
        dataset = generate_dataset(entities, group_size=group_size, cue_mix=mix, nil_fraction=nil_fraction,
                                   seed=seed, mentions_per_split={"train": train, "dev": dev, "test": test},
                                   out_dir=out, render_images=images, progress=True)
    counts = ", ".join(f"{len(dataset.split(name))} {name}" for name in ("train", "dev", "test"))
    typer.echo(f"Wrote {out}: {len(dataset.kb)} entities, {counts} mentions.")
