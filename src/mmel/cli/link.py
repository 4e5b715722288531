"""`mmel link`: link one mention from the command line, or every mention of a JSONL file (resumable)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mmel.cli.errors import exit_on_user_errors
from mmel.core.types import LinkResult


def link(
    index_dir: Annotated[Path, typer.Argument(help="Index directory (from `mmel index build`).")],
    sentence: Annotated[str | None, typer.Option(help="The sentence around the mention.")] = None,
    mention: Annotated[str | None, typer.Option(help="The mention, as it occurs in the sentence.")] = None,
    span: Annotated[str | None, typer.Option(help="The mention as START:END character offsets instead.")] = None,
    image: Annotated[Path | None, typer.Option(help="Optional mention image.")] = None,
    input_path: Annotated[Path | None, typer.Option("--input", help="Mentions JSONL file (mmel format) to link "
                                                                    "instead of one --sentence.")] = None,
    output: Annotated[Path | None, typer.Option(help="Results JSONL for --input; a rerun skips ids already "
                                                     "there.")] = None,
    images_root: Annotated[Path | None, typer.Option(help="With --input: directory image paths are relative to "
                                                          "(default: the dataset of a mentions/<split>.jsonl "
                                                          "file, else the input's directory).")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Entities to return per mention.")] = 5,
    candidates_k: Annotated[int, typer.Option(min=1, help="First-stage candidates to rerank.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One mention: print the result as JSON.")] = False,
) -> None:
    """Link a mention (--sentence with --mention or --span) or a file of mentions (--input, --output)."""
    from mmel.retrieval.jobs import result_record
    from mmel.retrieval.linker import Linker

    with exit_on_user_errors():
        if input_path is not None:
            _link_file(index_dir, input_path, output, images_root, top_k, candidates_k, sentence)
            return
        if sentence is None:
            raise typer.BadParameter("give --sentence (with --mention or --span), or --input with --output")
        with Linker.load(index_dir) as linker:
            result = linker.link(sentence, mention=mention, span=_parse_span(span) if span else None,
                                 image=image, top_k=top_k, candidates_k=candidates_k)
        typer.echo(json.dumps(result_record(result), ensure_ascii=False, indent=2) if as_json else _table(result))


def _link_file(index_dir: Path, input_path: Path, output: Path | None, images_root: Path | None, top_k: int,
               candidates_k: int, sentence: str | None) -> None:
    from mmel.retrieval.jobs import link_jsonl
    from mmel.retrieval.linker import Linker

    if output is None or sentence is not None:
        raise typer.BadParameter("--input needs --output, and no --sentence")
    with Linker.load(index_dir) as linker:
        report = link_jsonl(linker, input_path, output, images_root=images_root, top_k=top_k,
                            candidates_k=candidates_k)
    typer.echo(f"{output}: {report.summary()}")


def _parse_span(text: str) -> tuple[int, int]:
    start, separator, end = text.partition(":")
    if not separator or not start.strip().isdigit() or not end.strip().isdigit():
        raise typer.BadParameter(f"--span must be START:END (two character offsets), got {text!r}")
    return int(start), int(end)


def _table(result: LinkResult) -> str:
    header = f"{result.mention.surface!r}" + (f"  NIL (top-1 {result.nil_statistic} under {result.nil_threshold:.4g})"
                                              if result.nil else "")
    lines = [header]
    for candidate in result.candidates:
        units = ", ".join(f"{name} {value:.3f}" for name, value in candidate.unit_scores.items())
        lines.append(f"{candidate.rank:>3}. {candidate.qid:<12} {candidate.score:>9.3f}  {candidate.name}"
                     + (f"  ({units})" if units else ""))
    return "\n".join(lines)
