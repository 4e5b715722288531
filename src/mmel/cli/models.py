"""`mmel models ...`: list the registered models and shipped checkpoints, import official checkpoints.

A thin shell over `mmel.models` (the `MODELS` table) and `mmel.models.convert_official` (the
`OFFICIAL_RELEASES` table). torch is imported inside the commands, so `mmel --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from mmel.cli.errors import exit_on_user_errors

app = typer.Typer(help="List models and checkpoints; import official MIMIC / M3EL checkpoints.", no_args_is_help=True)


@app.command(name="list")
def list_models(
    checkpoints: Annotated[Path, typer.Option(help="Directory of shipped checkpoints to list, when present.")
                           ] = Path("checkpoints"),
) -> None:
    """Registered models (text views, unit names, config fields with defaults) and shipped checkpoints."""
    from mmel.core.checkpoint import read_checkpoint_header
    from mmel.models import MODELS

    with exit_on_user_errors():
        for name in MODELS.names():
            model_class = MODELS.get(name)
            model = model_class(model_class.config_class())
            views = model.feature_views()
            typer.echo(f"{name}: {model_class.__name__}")
            further = ", ".join(views.mention_extra + views.entity_extra)
            typer.echo(f"  views: mention={views.mention} entity={views.entity}"
                       + (f"; further (pooled): {further}" if further else ""))
            typer.echo(f"  units: {', '.join(model.unit_names) or '-'}")
            typer.echo("  config: " + ", ".join(f"{key}={value}" for key, value in model.config.to_dict().items()))
        shipped = sorted(path for path in checkpoints.glob("*/config.json")) if checkpoints.is_dir() else []
        if shipped:
            typer.echo(f"checkpoints in {checkpoints}:")
        for config_path in shipped:
            header = read_checkpoint_header(config_path.parent)
            typer.echo(f"  {config_path.parent.name}: {header['model_type']}")


@app.command(name="import-official")
def import_official(
    release: Annotated[str, typer.Argument(help="Which release the file comes from: mimic or m3el.")],
    file: Annotated[Path, typer.Argument(help="The official checkpoint (.ckpt from the release, or a .pth state "
                                              "dict). Read without executing any pickled code.")],
    out: Annotated[Path, typer.Option("--out", help="mmel checkpoint directory to write.")],
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Config value of the imported model, e.g. --set bidirectional=true (an M3EL WikiDiverse "
                      "checkpoint) or --set entity_text=attr (repeatable).")] = None,
    clip_out: Annotated[Path | None, typer.Option(help="Also write the file's fine-tuned encoder.clip.* weights "
                                                       "as a Hugging Face CLIP directory here.")] = None,
    clip_base: Annotated[Path | None, typer.Option(help="Local openai/clip-vit-base-patch32 directory whose config "
                                                        "and tokenizer files go with --clip-out.")] = None,
) -> None:
    """Import an official checkpoint as an mmel checkpoint; prints what was loaded and what the model does not use."""
    from mmel.models.convert_official import export_official_clip
    from mmel.models.convert_official import import_official as run_import

    with exit_on_user_errors():
        report = run_import(release, file, out, parse_overrides(overrides or []))
        typer.echo(report.summary())
        if clip_out is not None:
            typer.echo(f"fine-tuned CLIP written to {export_official_clip(file, clip_out, clip_dir=clip_base)}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings -> {key: value}; values are read as JSON (true, 3, "x") and otherwise kept as text."""
    values: dict[str, Any] = {}
    for item in items:
        key, separator, text = item.partition("=")
        if not separator or not key:
            raise typer.BadParameter(f"expected key=value, got {item!r}", param_hint="--set")
        try:
            values[key] = json.loads(text)
        except json.JSONDecodeError:
            values[key] = text
    return values
