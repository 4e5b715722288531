"""`mmel link`: link one mention from the command line, or every mention of JSONL/Parquet files (resumable)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mmel.cli.choices import QueryRuntimeName, QueryRuntimeOption
from mmel.cli.engines import EngineName, EngineOption, RayAddressOption, WorkersOption, open_engine
from mmel.cli.errors import exit_on_user_errors
from mmel.core.types import LinkResult


def link(
    index_dir: Annotated[Path, typer.Argument(help="Index directory (from `mmel index build`).")],
    sentence: Annotated[str | None, typer.Option(help="The sentence around the mention.")] = None,
    mention: Annotated[str | None, typer.Option(help="The mention, as it occurs in the sentence.")] = None,
    span: Annotated[str | None, typer.Option(help="The mention as START:END character offsets instead.")] = None,
    image: Annotated[Path | None, typer.Option(help="Optional mention image.")] = None,
    input_path: Annotated[Path | None, typer.Option("--input", help="Mentions file to link instead of one "
                                                                    "--sentence: mmel's JSONL, or the same records "
                                                                    "as Parquet rows, or a directory of such "
                                                                    "files.")] = None,
    output: Annotated[Path | None, typer.Option(help="Results JSONL for --input (a directory for a directory "
                                                     "input, one <name>.jsonl per file); a rerun skips ids "
                                                     "already there.")] = None,
    images_root: Annotated[Path | None, typer.Option(help="With --input: directory image paths are relative to "
                                                          "(default: the dataset of a mentions/<split>.jsonl "
                                                          "file, else the input's directory).")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Entities to return per mention.")] = 5,
    candidates_k: Annotated[int, typer.Option(min=1, help="First-stage candidates to rerank.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One mention: print the result as JSON.")] = False,
    chunk_size: Annotated[int, typer.Option(min=1, help="With --input: mentions per linker call, and per "
                                                        "appended (fsynced) write; the unit of resumption.")] = 256,
    engine: EngineOption = EngineName.local,
    workers: WorkersOption = None,
    ray_address: RayAddressOption = None,
    query_runtime: QueryRuntimeOption = QueryRuntimeName.auto,  # type: ignore[attr-defined]
) -> None:
    """Link a mention (--sentence with --mention or --span) or files of mentions (--input, --output).

    With --input and --engine ray, workers that each open the index link chunks of mentions; the
    results are appended here in input order, so the output equals the local engine's.
    """
    from mmel.backbones.base import BackboneConfig
    from mmel.retrieval.jobs import result_record
    from mmel.retrieval.linker import Linker

    with exit_on_user_errors():
        if input_path is not None:
            if output is None or sentence is not None:
                raise typer.BadParameter("--input needs --output, and no --sentence")
            _link_files(index_dir, input_path, output, images_root, top_k, candidates_k, chunk_size,
                        engine, workers, ray_address, query_runtime.value)
            return
        if sentence is None:
            raise typer.BadParameter("give --sentence (with --mention or --span), or --input with --output")
        with Linker.load(index_dir, backbone_config=BackboneConfig(query_runtime=query_runtime.value)) as linker:
            result = linker.link(sentence, mention=mention, span=_parse_span(span) if span else None,
                                 image=image, top_k=top_k, candidates_k=candidates_k)
        typer.echo(json.dumps(result_record(result), ensure_ascii=False, indent=2) if as_json else _table(result))


def _link_files(index_dir: Path, input_path: Path, output: Path, images_root: Path | None, top_k: int,
                candidates_k: int, chunk_size: int, engine: EngineName, workers: int | None,
                ray_address: str | None, query_runtime: str) -> None:
    from mmel.retrieval.jobs import link_mention_files

    with open_engine(engine, workers, ray_address) as runner:
        report = link_mention_files(index_dir, input_path, output, engine=runner, images_root=images_root,
                                    top_k=top_k, candidates_k=candidates_k, chunk_size=chunk_size,
                                    query_runtime=query_runtime)
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
