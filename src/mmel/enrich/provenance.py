"""Writing an enriched copy of a dataset, with a provenance file that says how it was made.

The source dataset is never touched: the output is a new mmel JSONL dataset whose image files are
hard links to the source's (a copy only across file systems), so a "+" variant costs no image
space. `enrichment.json` lists every enrichment step (descriptions, then captions, ...) with its
model, prompt and counts, carried over from the source when it already had one. It holds no
API key and no URL credentials.
"""

from __future__ import annotations

import json
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mmel.core.errors import DataError
from mmel.core.types import Dataset
from mmel.data.jsonl_format import DATASET_FILE, read_dataset_info, write_dataset
from mmel.data.validate import ENRICHMENT_FILE, read_enrichment


def check_distinct_output(source: Path, out: Path) -> None:
    """Refuse an output that is the source or lies inside it: enrichment never rewrites its input."""
    source_dir = Path(source).resolve()
    if source_dir.is_file():
        source_dir = source_dir.parent
    out_dir = Path(out).resolve()
    if out_dir == source_dir or source_dir in out_dir.parents:
        raise DataError(f"the output must be a new directory outside the source dataset {source_dir}", path=out)


def write_enriched(dataset: Dataset, source: Path, out: Path, *, name: str, step: dict[str, Any]) -> Path:
    """Write `dataset` (already enriched) to `out` with `step` appended to the source's enrichment steps."""
    check_distinct_output(source, out)
    earlier = previous_provenance(source)
    note = earlier.get("source_note", _dataset_note(source))
    steps = [*earlier.get("steps", []), {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **step}]
    provenance = {"source_dataset": earlier.get("source_dataset", str(Path(source).resolve())),
                  "source_note": note, "steps": steps}
    made = " + ".join(f"{s['step']} by {s['model']}" for s in steps)
    summary = f"{note + ' + ' if note else ''}{made} (mmel enrich, see {ENRICHMENT_FILE})"
    return write_dataset(Dataset(name, dataset.kb, dataset.splits, dataset.root), out, source=summary,
                         extra_files={ENRICHMENT_FILE: json.dumps(provenance, ensure_ascii=False, indent=2) + "\n"})


def previous_provenance(source: Path) -> dict[str, Any]:
    """The provenance of the source dataset when it is itself an enriched one, else {}."""
    return read_enrichment(Path(source))


def public_url(url: str) -> str:
    """`url` without user:password, query or fragment: what may go into a provenance file."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _dataset_note(source: Path) -> str:
    source = Path(source)
    return read_dataset_info(source).source if (source / DATASET_FILE).is_file() else ""


__all__ = ["check_distinct_output", "previous_provenance", "public_url", "write_enriched"]
