"""Evaluation reports: every number with its provenance (benchmarks.md: protocol, KB size, split,
mention count, model, backbone), as JSON for machines and a Markdown table row for docs/RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmel.core.errors import DataError
from mmel.core.paths import atomic_write_json, atomic_write_text, read_json
from mmel.evaluation.metrics import DEFAULT_TIE_POLICY, HITS_AT, TiePolicy, check_tie_policy
from mmel.evaluation.protocols import RankingResult

REPORT_FORMAT_VERSION = 1
_MARKDOWN_COLUMNS = ("Dataset", "Split", "Protocol", "KB size", "Mentions", "Excluded NIL / missing gold",
                     "Model", "Backbone", "Ties", *(f"H@{k}" for k in HITS_AT), "MRR", "MR", "Time (s)")


@dataclass
class EvalReport:
    """One evaluation run. `metrics` holds fractions (hits@k, mrr) and the mean rank (mr)."""

    protocol: str              # 'full-kb' or 'candidates-<k>'
    kb_size: int
    dataset: str
    split: str
    mention_count: int         # mentions that were ranked
    excluded_nil: int          # NIL mentions: counted, not ranked (the published protocol drops them)
    excluded_missing_gold: int  # gold QID absent from the KB: counted, not ranked
    model: str
    backbone: str
    tie_policy: TiePolicy
    metrics: dict[str, float]
    wall_time_s: float
    extra: dict[str, Any] = field(default_factory=dict)
    mmel_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": REPORT_FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: object = "report") -> EvalReport:
        known = {item.name for item in dataclasses.fields(cls)}
        body = {key: value for key, value in values.items() if key != "format_version"}
        unknown = sorted(set(body) - known)
        missing = sorted(name for name in known - set(body) if name not in ("extra", "mmel_version"))
        if unknown or missing:
            raise DataError(f"not an mmel evaluation report (unknown keys: {unknown or 'none'}; "
                            f"missing keys: {missing or 'none'})", path=source)
        if values.get("format_version") != REPORT_FORMAT_VERSION:
            raise DataError(f"report format_version {values.get('format_version')!r} is not "
                            f"{REPORT_FORMAT_VERSION}", path=source)
        report = cls(**body)
        check_tie_policy(report.tie_policy)
        return report

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to `<name>.json` (NaN metrics, e.g. of an empty split, become null)."""
        payload = self.to_dict()
        payload["metrics"] = {key: _finite_or_none(value) for key, value in self.metrics.items()}
        return payload

    def to_markdown(self) -> str:
        """A Markdown table (header + this report's row) carrying every provenance field."""
        return render_comparison_table([self])

    def default_name(self) -> str:
        """File stem such as 'wikimel-test-bm25-full-kb'."""
        stem = f"{self.dataset}-{self.split}-{self.model}-{self.protocol}"
        return re.sub(r"[^A-Za-z0-9._+-]+", "_", stem)


def build_report(result: RankingResult, *, protocol: str, kb_size: int, dataset: str, split: str, model: str,
                 backbone: str, wall_time_s: float, tie_policy: TiePolicy = DEFAULT_TIE_POLICY,
                 extra: dict[str, Any] | None = None) -> EvalReport:
    """An EvalReport from a RankingResult; the excluded counts and the gold-added count come with it."""
    from mmel import __version__

    details = dict(extra or {})
    if result.gold_added:
        details["gold_added_to_candidates"] = result.gold_added
    return EvalReport(protocol=protocol, kb_size=kb_size, dataset=dataset, split=split,
                      mention_count=result.mention_count, excluded_nil=result.excluded_nil,
                      excluded_missing_gold=result.excluded_missing_gold, model=model, backbone=backbone,
                      tie_policy=check_tie_policy(tie_policy), metrics=result.metrics(tie_policy),
                      wall_time_s=round(float(wall_time_s), 3), extra=details, mmel_version=__version__)


def render_comparison_table(reports: Sequence[EvalReport]) -> str:
    """Several reports as one Markdown table (Hits@k and MRR in %, as the papers print them)."""
    header = "| " + " | ".join(_MARKDOWN_COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in _MARKDOWN_COLUMNS) + "|"
    return "\n".join([header, rule, *(_markdown_row(report) for report in reports)]) + "\n"


def _markdown_row(report: EvalReport) -> str:
    metrics = report.metrics
    cells = [report.dataset, report.split, report.protocol, f"{report.kb_size:,}", f"{report.mention_count:,}",
             f"{report.excluded_nil:,} / {report.excluded_missing_gold:,}", report.model, report.backbone,
             report.tie_policy, *(_percent(metrics.get(f"hits@{k}")) for k in HITS_AT),
             _percent(metrics.get("mrr")), _plain(metrics.get("mr")), f"{report.wall_time_s:.1f}"]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def write_report(report: EvalReport, target: Path) -> tuple[Path, Path]:
    """Write `<name>.json` and `<name>.md` atomically; returns (json_path, markdown_path).

    `target` is either a directory (files named by `EvalReport.default_name`) or a path ending in
    `.json` / `.md` (its sibling of the other kind is written too).
    """
    target = Path(target)
    base = target.with_suffix("") if target.suffix in (".json", ".md") else target / report.default_name()
    # appended, not with_suffix: a default name may hold dots (a weight such as name-prior-8.28)
    json_path, markdown_path = base.with_name(base.name + ".json"), base.with_name(base.name + ".md")
    atomic_write_json(json_path, report.to_json())
    atomic_write_text(markdown_path, report.to_markdown())
    return json_path, markdown_path


def read_report(path: Path) -> EvalReport:
    """Read a report written by `write_report` (null metrics come back as NaN)."""
    values = read_json(Path(path))
    if not isinstance(values, dict):
        raise DataError("an evaluation report must be a JSON object", path=path)
    metrics = values.get("metrics")
    if isinstance(metrics, dict):
        values["metrics"] = {key: math.nan if value is None else float(value) for key, value in metrics.items()}
    return EvalReport.from_dict(values, source=path)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _percent(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"


def _plain(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}"


__all__ = ["EvalReport", "build_report", "read_report", "render_comparison_table", "write_report"]
