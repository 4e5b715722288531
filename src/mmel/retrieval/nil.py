"""NIL threshold calibration: answer "no entity" when the best candidate scores below a threshold.

Inputs, one value per dev mention:
- `top1_scores`: the statistic the threshold applies to (`NIL_STATISTICS`): the linker's score of
  its best candidate ('score'), or how far that score is ahead of the runner-up's ('margin');
- `top1_correct`: whether that candidate is the gold entity (always False for a NIL mention);
- `is_nil`: whether the mention has no entity in the KB.

The published MEL datasets drop NIL mentions, so a dev split has few or none. Simulate them:
`choose_simulated_nil` picks a random subset of dev mentions; the caller ranks those with their
gold entity removed from the KB, so their best candidate is some other entity, and marks them
`is_nil=True`. A threshold fit that way learns how a confident wrong answer scores.

The decision at threshold t: link to the top-1 candidate if statistic >= t, else answer NIL. A raw
score says how well the best candidate fits; the margin says whether it fits better than the
others, which is what a wrong answer (a near tie among similar names) lacks.
Metrics at each t (over linkable mentions L, NIL mentions Z, all mentions M = L + Z):
    link precision = correct links / answered
    link recall    = correct links / |L|
    NIL precision  = NIL mentions abstained / abstained
    NIL recall     = NIL mentions abstained / |Z|
    accuracy       = (correct links + NIL mentions abstained) / |M|
A ratio with an empty denominator is 1.0 (e.g. NIL recall when the dev split has no NIL mention).
Criteria: 'accuracy' takes the threshold with the best accuracy; 'precision' takes the one with
the best link recall among those whose link precision reaches `target_precision`. Ties go to the
lower threshold (answer more). Thresholds are midpoints between consecutive distinct dev scores,
so the chosen one sits in the gap rather than on a dev score.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmel.core.errors import DataError, UsageError
from mmel.core.paths import atomic_write_bytes, atomic_write_json, read_json

NIL_CRITERIA = ("accuracy", "precision")
NIL_STATISTICS = ("score", "margin")
FORMAT_NAME = "mmel-nil-calibration"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)     # version 1 predates `statistic` and always meant 'score'


def nil_statistic(ranked_scores: list[float] | np.ndarray, statistic: str) -> float:
    """The value a NIL threshold applies to, from one mention's candidate scores (best first).

    'margin' of a lone candidate is +inf (nothing competes with it); no candidate gives -inf.
    """
    if statistic not in NIL_STATISTICS:
        raise UsageError(f"unknown NIL statistic {statistic!r}; available: {', '.join(NIL_STATISTICS)}")
    if len(ranked_scores) == 0:
        return float("-inf")
    if statistic == "score":
        return float(ranked_scores[0])
    return float(ranked_scores[0] - ranked_scores[1]) if len(ranked_scores) > 1 else float("inf")
MARKDOWN_PRECISIONS = (0.8, 0.9, 0.95, 0.99)


@dataclass(frozen=True)
class NilCurvePoint:
    """The outcome of answering only when the top-1 score is >= `threshold`."""

    threshold: float
    answered: int          # mentions linked to an entity
    correct_links: int     # linkable mentions linked to their gold entity
    abstained_nil: int     # NIL mentions answered NIL
    link_precision: float
    link_recall: float
    link_f1: float
    nil_precision: float
    nil_recall: float
    accuracy: float


@dataclass
class NilCalibration:
    """A fitted NIL threshold with the whole trade-off curve it was chosen from."""

    threshold: float
    criterion: str
    target_precision: float | None
    num_mentions: int
    num_linkable: int
    num_nil: int
    chosen: NilCurvePoint
    curve: list[NilCurvePoint]
    metadata: dict[str, Any] = field(default_factory=dict)  # e.g. model fingerprint, dev split, NIL simulation
    statistic: str = "score"   # what the threshold applies to (NIL_STATISTICS)

    def is_nil(self, value: float | np.ndarray) -> bool | np.ndarray:
        """True where `value` (the statistic of one mention, or an array of them) falls below the threshold."""
        below = np.asarray(value) < self.threshold
        return bool(below) if below.ndim == 0 else below

    def is_nil_ranking(self, ranked_scores: list[float] | np.ndarray) -> bool:
        """The decision for one mention from its candidates' scores, best first."""
        return bool(self.is_nil(nil_statistic(ranked_scores, self.statistic)))

    # --- persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: object = "NIL calibration") -> NilCalibration:
        if values.get("format") != FORMAT_NAME or values.get("format_version") not in READABLE_VERSIONS:
            raise DataError(f"not an mmel NIL calibration (format {values.get('format')!r}, "
                            f"version {values.get('format_version')!r}; this mmel reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))})", path=source)
        try:
            fields = {key: value for key, value in values.items() if key not in ("format", "format_version")}
            fields["chosen"] = NilCurvePoint(**fields["chosen"])
            fields["curve"] = [NilCurvePoint(**point) for point in fields["curve"]]
            return cls(**fields)
        except (KeyError, TypeError) as error:
            raise DataError(f"malformed NIL calibration: {error}", path=source) from None

    def save(self, path: Path) -> Path:
        atomic_write_json(Path(path), self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> NilCalibration:
        values = read_json(Path(path))
        if not isinstance(values, dict):
            raise DataError("expected a JSON object", path=path)
        return cls.from_dict(values, source=path)

    # --- reporting --------------------------------------------------------------------------
    def operating_points(self, precisions: tuple[float, ...] = MARKDOWN_PRECISIONS) -> list[tuple[str, NilCurvePoint]]:
        """Named rows for a report: answer everything, the chosen point, and the first point reaching each precision."""
        rows = [("answer all (no NIL)", self.curve[0]), (f"chosen ({self.criterion})", self.chosen)]
        for precision in precisions:
            reaching = [point for point in self.curve if point.link_precision >= precision]
            if reaching:
                rows.append((f"link precision >= {precision:g}", reaching[0]))
        return rows

    def to_markdown(self, precisions: tuple[float, ...] = MARKDOWN_PRECISIONS) -> str:
        header = (f"NIL threshold {self.threshold:.4g} on the top-1 {self.statistic} ({self.criterion}"
                  + (f", target precision {self.target_precision:g}" if self.target_precision is not None else "")
                  + f"); {self.num_mentions} dev mentions: {self.num_linkable} linkable, {self.num_nil} NIL\n\n")
        lines = ["| operating point | threshold | answered | link P | link R | link F1 | NIL P | NIL R | accuracy |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, point in self.operating_points(precisions):
            lines.append(f"| {name} | {point.threshold:.4g} | {point.answered} | {point.link_precision:.3f} | "
                         f"{point.link_recall:.3f} | {point.link_f1:.3f} | {point.nil_precision:.3f} | "
                         f"{point.nil_recall:.3f} | {point.accuracy:.3f} |")
        return header + "\n".join(lines) + "\n"

    def plot(self, path: Path) -> Path:
        """Write a PNG: link precision vs recall, and the metrics against the threshold, chosen point marked."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(10, 4), layout="constrained")
        FigureCanvasAgg(figure)
        trade_off, by_threshold = figure.subplots(1, 2)
        trade_off.plot([p.link_recall for p in self.curve], [p.link_precision for p in self.curve])
        trade_off.scatter([self.chosen.link_recall], [self.chosen.link_precision], color="red", zorder=3,
                          label=f"chosen, t={self.threshold:.3g}")
        trade_off.set(xlabel="link recall", ylabel="link precision", title=f"answer only when {self.statistic} >= t")
        trade_off.legend()
        thresholds = [p.threshold for p in self.curve]
        for name in ("accuracy", "link_precision", "link_recall", "nil_recall"):
            by_threshold.plot(thresholds, [getattr(p, name) for p in self.curve], label=name.replace("_", " "))
        by_threshold.axvline(self.threshold, color="red", linestyle="--")
        by_threshold.set(xlabel="threshold t", title="metrics by threshold")
        by_threshold.legend()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=120)
        atomic_write_bytes(Path(path), buffer.getvalue())
        return Path(path)


def nil_curve(top1_scores: np.ndarray, top1_correct: np.ndarray, is_nil: np.ndarray) -> list[NilCurvePoint]:
    """Every distinct operating point, from 'answer all' (lowest threshold) to 'answer none' (highest)."""
    scores, correct, nil = _checked_inputs(top1_scores, top1_correct, is_nil)
    thresholds = _candidate_thresholds(scores)                                   # [T]
    answered = len(scores) - np.searchsorted(np.sort(scores), thresholds, side="left")
    correct_links = correct.sum() - np.searchsorted(np.sort(scores[correct]), thresholds, side="left")
    abstained_nil = np.searchsorted(np.sort(scores[nil]), thresholds, side="left")
    return [_point(float(t), int(a), int(c), int(z), num_linkable=int((~nil).sum()), num_nil=int(nil.sum()))
            for t, a, c, z in zip(thresholds, answered, correct_links, abstained_nil, strict=True)]


def calibrate_nil(top1_scores: np.ndarray, top1_correct: np.ndarray, is_nil: np.ndarray, *,
                  criterion: str = "accuracy", target_precision: float | None = None,
                  metadata: dict[str, Any] | None = None, statistic: str = "score") -> NilCalibration:
    """Fit a NIL threshold on dev mentions by `criterion` ('accuracy', or 'precision' with `target_precision`).

    `top1_scores` holds each mention's `statistic` (see the module doc).
    """
    if statistic not in NIL_STATISTICS:
        raise UsageError(f"unknown NIL statistic {statistic!r}; available: {', '.join(NIL_STATISTICS)}")
    if criterion not in NIL_CRITERIA:
        raise UsageError(f"unknown NIL criterion {criterion!r}; available: {', '.join(NIL_CRITERIA)}")
    if (criterion == "precision") != (target_precision is not None):
        raise UsageError("target_precision is required with criterion 'precision' and meaningless otherwise")
    if target_precision is not None and not 0.0 < target_precision <= 1.0:
        raise UsageError(f"target_precision must be in (0, 1], got {target_precision}")
    curve = nil_curve(top1_scores, top1_correct, is_nil)
    chosen = _choose(curve, criterion, target_precision)
    nil = np.asarray(is_nil, dtype=bool)
    return NilCalibration(threshold=chosen.threshold, criterion=criterion, target_precision=target_precision,
                          num_mentions=len(nil), num_linkable=int((~nil).sum()), num_nil=int(nil.sum()),
                          chosen=chosen, curve=curve, metadata=dict(metadata or {}), statistic=statistic)


def choose_simulated_nil(num_mentions: int, nil_fraction: float, *, seed: int = 0) -> np.ndarray:
    """A [num_mentions] bool mask of mentions to treat as NIL (rank them with their gold entity removed)."""
    if not 0.0 < nil_fraction < 1.0:
        raise UsageError(f"nil_fraction must be between 0 and 1 (exclusive), got {nil_fraction}")
    mask = np.zeros(num_mentions, dtype=bool)
    chosen = np.random.default_rng(seed).choice(num_mentions, size=round(num_mentions * nil_fraction), replace=False)
    mask[chosen] = True
    return mask


def _checked_inputs(top1_scores: np.ndarray, top1_correct: np.ndarray,
                    is_nil: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scores = np.asarray(top1_scores, dtype=np.float64)
    correct = np.asarray(top1_correct)
    nil = np.asarray(is_nil)
    if scores.ndim != 1 or correct.shape != scores.shape or nil.shape != scores.shape:
        raise UsageError(f"top1_scores, top1_correct and is_nil must be 1-D of one length, got shapes "
                         f"{scores.shape}, {correct.shape}, {nil.shape}")
    if len(scores) == 0:
        raise UsageError("cannot calibrate a NIL threshold on zero mentions")
    if correct.dtype != bool or nil.dtype != bool:
        raise UsageError(f"top1_correct and is_nil must be bool arrays, got {correct.dtype} and {nil.dtype}")
    if not np.isfinite(scores).all():
        raise UsageError(f"top1_scores rows {np.flatnonzero(~np.isfinite(scores))[:5].tolist()} are NaN or inf")
    contradictory = np.flatnonzero(correct & nil)
    if len(contradictory):
        raise UsageError(f"mentions {contradictory[:5].tolist()} are NIL yet have a correct top-1 candidate")
    return scores, correct, nil


def _candidate_thresholds(scores: np.ndarray) -> np.ndarray:
    """Lowest score (answer all), midpoints between distinct scores, and just above the highest (answer none)."""
    distinct = np.unique(scores)                                                   # ascending
    midpoints = (distinct[:-1] + distinct[1:]) / 2
    above_all = np.nextafter(distinct[-1], np.inf)
    return np.concatenate([distinct[:1], midpoints, [above_all]])


def _point(threshold: float, answered: int, correct_links: int, abstained_nil: int, *,
           num_linkable: int, num_nil: int) -> NilCurvePoint:
    abstained = num_linkable + num_nil - answered
    precision = _ratio(correct_links, answered)
    recall = _ratio(correct_links, num_linkable)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return NilCurvePoint(
        threshold=threshold, answered=answered, correct_links=correct_links, abstained_nil=abstained_nil,
        link_precision=precision, link_recall=recall, link_f1=f1, nil_precision=_ratio(abstained_nil, abstained),
        nil_recall=_ratio(abstained_nil, num_nil), accuracy=(correct_links + abstained_nil) / (num_linkable + num_nil))


def _ratio(hits: int, total: int) -> float:
    """hits / total, and 1.0 for an empty total (nothing answered is nothing wrong; nothing to find, nothing missed)."""
    return hits / total if total else 1.0


def _choose(curve: list[NilCurvePoint], criterion: str, target_precision: float | None) -> NilCurvePoint:
    """First (lowest-threshold) point maximising the criterion."""
    if criterion == "accuracy":
        return max(curve, key=lambda point: point.accuracy)
    answering = [point for point in curve if point.answered]  # curve[0] answers every mention
    reaching = [point for point in answering if point.link_precision >= target_precision]
    if not reaching:
        best = max(point.link_precision for point in answering)
        raise UsageError(f"no threshold reaches link precision {target_precision:g} on these dev mentions "
                         f"(best: {best:.3f}); lower the target or use criterion 'accuracy'")
    return max(reaching, key=lambda point: point.link_recall)


__all__ = ["NIL_CRITERIA", "NIL_STATISTICS", "NilCalibration", "NilCurvePoint", "calibrate_nil",
           "choose_simulated_nil", "nil_curve", "nil_statistic"]
