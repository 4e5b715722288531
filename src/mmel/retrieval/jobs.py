"""Linking data files: every mention of a JSONL file, resumable, one output line per mention."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mmel.core.crashpoints import crash_point
from mmel.core.errors import DataError
from mmel.core.images import ImageReport
from mmel.core.types import LinkResult, Mention
from mmel.data.jsonl_format import DATASET_FILE, KB_FILE, MENTIONS_DIR, read_mentions_jsonl
from mmel.retrieval.linker import Linker
from mmel.retrieval.queries import QueryError


@dataclass
class LinkFileReport:
    """What `link_jsonl` did: mentions linked now, skipped (already in the output), failed (error lines)."""

    linked: int = 0
    skipped: int = 0
    failed: int = 0
    dropped_partial_line: bool = False
    image_report: ImageReport = field(default_factory=ImageReport)

    def summary(self) -> str:
        partial = "; dropped an unfinished last line of the previous run" if self.dropped_partial_line else ""
        return (f"{self.linked} linked, {self.skipped} already done, {self.failed} failed (see their 'error')"
                f"{partial}; {self.image_report.summary()}")


def link_jsonl(linker: Linker, input_path: Path, output_path: Path, *, images_root: Path | None = None,
               top_k: int = 10, candidates_k: int = 100, chunk_size: int = 256,
               progress: bool = True) -> LinkFileReport:
    """Link every mention of a mentions JSONL file into `output_path`, one JSON line per mention.

    Resumable: mentions whose id is already in the output are skipped, and each chunk is appended
    with a single write followed by fsync, so an interrupted run leaves whole lines (a torn last
    line is detected and dropped on the next run). Mention ids are unique here even when the file
    repeats one (the reader renames repeats "<id>#<n>"), so resuming never skips an unlinked mention.
    Input format: mmel's mentions JSONL (docs/DATA_FORMAT.md); images are relative to `images_root`
    (default: `default_images_root`).
    """
    input_path, output_path = Path(input_path), Path(output_path)
    images_root = Path(images_root) if images_root is not None else default_images_root(input_path)
    mentions = read_mentions_jsonl(input_path, images_root)
    report = LinkFileReport()
    done, report.dropped_partial_line = _finished_ids(output_path)
    pending = [mention for mention in mentions if mention.id not in done]
    report.skipped = len(mentions) - len(pending)
    with tqdm(total=len(pending), desc="linking", unit="mention", disable=not progress) as bar:
        for start in range(0, len(pending), chunk_size):
            chunk = pending[start:start + chunk_size]
            outcomes = linker.link_mentions(chunk, images_root, top_k=top_k, candidates_k=candidates_k,
                                            report=report.image_report)
            lines = [json.dumps(_output_record(m, o), ensure_ascii=False) for m, o in zip(chunk, outcomes, strict=True)]
            crash_point("link_file.chunk_linked")
            _append_lines(output_path, lines)
            crash_point("link_file.chunk_written")
            report.failed += sum(isinstance(outcome, QueryError) for outcome in outcomes)
            report.linked += sum(not isinstance(outcome, QueryError) for outcome in outcomes)
            bar.update(len(chunk))
    return report


def default_images_root(input_path: Path) -> Path:
    """Where a mentions file's image paths start: its dataset's directory when it is a dataset's
    `mentions/<split>.jsonl` (paths are relative to the dataset, docs/DATA_FORMAT.md), else its own folder."""
    folder = Path(input_path).parent
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


__all__ = ["LinkFileReport", "default_images_root", "link_jsonl", "result_record"]
