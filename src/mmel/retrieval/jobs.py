"""Linking data files: every mention of a JSONL or Parquet file (or a directory of them), resumable.

One output line per mention, keyed by its id: a rerun skips the ids already written, so after a
kill no mention is lost and none is linked twice. The mentions still to do are cut into chunks
(shards) that an engine (`mmel.core.engine`) links, in this process or on Ray workers that each
open the index themselves; this process alone appends the results, in input order, one fsynced
write per chunk. Either engine writes the same lines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmel.backbones.base import BackboneConfig
from mmel.core.crashpoints import crash_point
from mmel.core.engine import Engine, LocalEngine, WorkerFactory, split_into_shards
from mmel.core.errors import DataError, UsageError
from mmel.core.images import ImageReport
from mmel.core.types import LinkResult, Mention
from mmel.data.jsonl_format import DATASET_FILE, KB_FILE, MENTIONS_DIR
from mmel.data.mention_files import mention_files, read_mentions_file
from mmel.retrieval.linker import Linker
from mmel.retrieval.queries import QueryError

OUTPUT_SUFFIX = ".jsonl"


@dataclass
class LinkFileReport:
    """What a linking job did: mentions linked now, skipped (already in the output), failed (error lines)."""

    linked: int = 0
    skipped: int = 0
    failed: int = 0
    dropped_partial_line: bool = False
    files: int = 1
    image_report: ImageReport = field(default_factory=ImageReport)

    def add(self, other: LinkFileReport) -> None:
        """Count another file's job into this one."""
        self.linked += other.linked
        self.skipped += other.skipped
        self.failed += other.failed
        self.dropped_partial_line |= other.dropped_partial_line
        self.files += other.files
        self.image_report.merge(other.image_report)

    def summary(self) -> str:
        partial = "; dropped an unfinished last line of the previous run" if self.dropped_partial_line else ""
        files = f" in {self.files} files" if self.files != 1 else ""
        return (f"{self.linked} linked, {self.skipped} already done, {self.failed} failed (see their 'error')"
                f"{files}{partial}; {self.image_report.summary()}")


@dataclass
class LinkedChunk:
    """A worker's answer for one chunk: the output lines (input order) and what they hold."""

    lines: list[str]
    failed: int
    image_report: ImageReport


@dataclass(frozen=True)
class ChunkLinker:
    """Worker factory for `Engine.map_shards`: opens the index once per worker, then links chunks of mentions.

    Picklable: a cluster worker opens `index_dir` itself (the same path on every node; the files
    are memory-mapped where the index allows, so workers on one node share them in the page cache).
    """

    index_dir: Path
    images_root: Path
    top_k: int = 10
    candidates_k: int = 100
    num_threads: int | None = None   # torch threads per worker; None keeps the process's setting
    query_runtime: str = "auto"      # BackboneConfig.query_runtime of the workers' linkers

    def __call__(self) -> _LoadedChunkLinker:
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        linker = Linker.load(self.index_dir, read_only=True,   # FAISS vectors shared through the page cache
                             backbone_config=BackboneConfig(query_runtime=self.query_runtime))
        return _LoadedChunkLinker(linker, self.images_root, self.top_k, self.candidates_k, owns_linker=True)


@dataclass
class _LoadedChunkLinker:
    """A worker: links chunks with a loaded Linker (closed with the worker when it opened it)."""

    linker: Linker
    images_root: Path
    top_k: int
    candidates_k: int
    owns_linker: bool = False

    def __call__(self, chunk: Sequence[Mention]) -> LinkedChunk:
        report = ImageReport()
        outcomes = self.linker.link_mentions(chunk, self.images_root, top_k=self.top_k,
                                             candidates_k=self.candidates_k, report=report)
        lines = [json.dumps(_output_record(m, o), ensure_ascii=False) for m, o in zip(chunk, outcomes, strict=True)]
        return LinkedChunk(lines, sum(isinstance(outcome, QueryError) for outcome in outcomes), report)

    def close(self) -> None:
        if self.owns_linker:
            self.linker.close()


def link_jsonl(linker: Linker, input_path: Path, output_path: Path, *, images_root: Path | None = None,
               top_k: int = 10, candidates_k: int = 100, chunk_size: int = 256,
               progress: bool = True) -> LinkFileReport:
    """Link every mention of a mentions file (JSONL or Parquet) into `output_path` with a loaded `linker`.

    Resumable: mentions whose id is already in the output are skipped, and each chunk is appended
    with a single write followed by fsync, so an interrupted run leaves whole lines (a torn last
    line is detected and dropped on the next run). Mention ids are unique here even when the file
    repeats one (the reader renames repeats "<id>#<n>"), so resuming never skips an unlinked mention.
    Input format: mmel's mentions JSONL (docs/DATA_FORMAT.md) or the same records as Parquet rows;
    images are relative to `images_root` (default: `default_images_root`).
    """
    input_path = Path(input_path)
    images_root = Path(images_root) if images_root is not None else default_images_root(input_path)
    worker = _LoadedChunkLinker(linker, images_root, top_k, candidates_k)
    return _link_file(LocalEngine(), lambda: worker, input_path, Path(output_path), images_root, chunk_size, progress)


def link_mention_files(index_dir: Path, input_path: Path, output_path: Path, *, engine: Engine | None = None,
                       images_root: Path | None = None, top_k: int = 10, candidates_k: int = 100,
                       chunk_size: int = 256, num_threads: int | None = None, query_runtime: str = "auto",
                       progress: bool = True) -> LinkFileReport:
    """Link a mentions file, or every mentions file of a directory, with the index at `index_dir`, on `engine`.

    A file's results go to the file `output_path`; a directory's to the directory `output_path`,
    one `<input name without suffix>.jsonl` per input file (names must not collide). Each output
    resumes as `link_jsonl` does. `engine` (default: this process) runs `ChunkLinker` workers, one
    chunk of `chunk_size` mentions at a time; the results are appended here in input order, so
    the output is the same whichever engine linked it.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    engine = engine or LocalEngine()
    images_root = Path(images_root) if images_root is not None else default_images_root(input_path)
    worker = ChunkLinker(Path(index_dir), images_root, top_k, candidates_k, num_threads, query_runtime)
    reports = [_link_file(engine, worker, source, target, images_root, chunk_size, progress)
               for source, target in _input_output_pairs(input_path, output_path)]
    for other in reports[1:]:
        reports[0].add(other)
    return reports[0]


def _input_output_pairs(input_path: Path, output_path: Path) -> list[tuple[Path, Path]]:
    """(mentions file, results file) pairs: one for a file, one per mention file of a directory."""
    if not input_path.is_dir():
        return [(input_path, output_path)]
    if output_path.exists() and not output_path.is_dir():
        raise UsageError(f"--input {input_path} is a directory, so --output must be a directory too "
                         f"(one results file per input file); {output_path} is a file")
    sources = mention_files(input_path)
    stems = [source.name.removesuffix(source.suffix) for source in sources]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise UsageError(f"{input_path}: input files {', '.join(repeated)} differ only in their suffix and would "
                         "write the same results file; keep one of each")
    return [(source, output_path / f"{stem}{OUTPUT_SUFFIX}") for source, stem in zip(sources, stems, strict=True)]


def _link_file(engine: Engine, make_worker: WorkerFactory[Sequence[Mention], LinkedChunk], input_path: Path,
               output_path: Path, images_root: Path, chunk_size: int, progress: bool) -> LinkFileReport:
    """Link the mentions of `input_path` that `output_path` lacks, appending chunk results in input order."""
    mentions = read_mentions_file(input_path, images_root)
    report = LinkFileReport()
    done, report.dropped_partial_line = _finished_ids(output_path)
    pending = [mention for mention in mentions if mention.id not in done]
    report.skipped = len(mentions) - len(pending)
    chunks = split_into_shards(pending, chunk_size)
    with tqdm(total=len(pending), desc=f"linking {input_path.name}", unit="mention", disable=not progress) as bar:
        for position, linked in engine.map_shards(make_worker, chunks, ordered=True):
            crash_point("link_file.chunk_linked")
            _append_lines(output_path, linked.lines)
            crash_point("link_file.chunk_written")
            report.failed += linked.failed
            report.linked += len(linked.lines) - linked.failed
            report.image_report.merge(linked.image_report)
            bar.update(len(chunks[position]))
    return report


def default_images_root(input_path: Path) -> Path:
    """Where a mentions file's image paths start: its dataset's directory when it is a dataset's
    `mentions/<split>.jsonl` (paths are relative to the dataset, docs/DATA_FORMAT.md), else its own folder.
    For a directory of mention files: the dataset's directory when it is a dataset's `mentions/`, else itself."""
    folder = Path(input_path) if Path(input_path).is_dir() else Path(input_path).parent
    dataset = folder.parent
    if folder.name == MENTIONS_DIR and ((dataset / DATASET_FILE).is_file() or (dataset / KB_FILE).is_file()):
        return dataset
    return folder


def result_record(result: LinkResult) -> dict[str, Any]:
    """A LinkResult as JSON: the mention, NIL decision and ranked candidates with unit scores."""
    return {"id": result.mention.id, "surface": result.mention.surface, "span": result.mention.span,
            "nil": result.nil, "nil_threshold": result.nil_threshold, "nil_statistic": result.nil_statistic,
            "candidates": [{"rank": c.rank, "qid": c.qid, "name": c.name, "score": c.score,
                            "unit_scores": c.unit_scores, "retrieval_score": c.retrieval_score}
                           for c in result.candidates]}


def _output_record(mention: Mention, outcome: LinkResult | QueryError) -> dict[str, Any]:
    if isinstance(outcome, QueryError):
        return {"id": mention.id, "error": str(outcome)}
    return result_record(outcome)


def _finished_ids(output_path: Path) -> tuple[set[str], bool]:
    """Ids already in the output; a torn last line (no newline, or not JSON) is cut off first."""
    if not output_path.is_file():
        return set(), False
    data = output_path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    done: set[str] = set()
    for number, line in enumerate(complete.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            done.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError("not a line written by `mmel link` (no JSON object with an 'id'); use another output file",
                            path=output_path, record=f"line {number}") from None
    torn = len(complete) != len(data)
    if torn:
        with output_path.open("r+b") as handle:
            handle.truncate(len(complete))
    return done, torn


def _append_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as handle:
        handle.write("".join(line + "\n" for line in lines).encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


__all__ = ["ChunkLinker", "LinkFileReport", "LinkedChunk", "default_images_root", "link_jsonl", "link_mention_files",
           "result_record"]
