"""The training-curve figure of a run: training loss per step and per epoch, dev MRR and Hits@1 per epoch.

Reads the CSV that Lightning's CSVLogger writes and draws with matplotlib's object API (no pyplot
global state), writing the PNG atomically.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mmel.core.paths import atomic_write_bytes


def read_metric_series(metrics_csvs: list[Path]) -> dict[str, list[tuple[float, float]]]:
    """Column -> [(x, value)] sorted by x; x is the global step for training metrics, the epoch (1-based)
    for validation metrics. Files are read in order (one per session of a resumed run); a later
    session's value replaces an earlier one at the same x, since a resume repeats the interrupted epoch."""
    merged: dict[str, dict[float, float]] = {}
    for metrics_csv in metrics_csvs:
        with Path(metrics_csv).open(encoding="utf-8", newline="") as handle:
            for record in csv.DictReader(handle):
                for column, cell in record.items():
                    if column in ("epoch", "step") or not cell:
                        continue
                    x = float(record["step"]) if column.startswith("train/") else float(record["epoch"]) + 1
                    merged.setdefault(column, {})[x] = float(cell)
    return {column: sorted(points.items()) for column, points in merged.items()}


def plot_training_curve(metrics_csvs: list[Path], out_png: Path, *, title: str = "") -> Path:
    """Draw the loss and dev-metric curves of a run's CSV logs (in session order) into `out_png`."""
    series = read_metric_series(metrics_csvs)
    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    loss_axis, dev_axis = figure.subplots(1, 2)
    for column, label, marker in (("train/loss_step", "logged steps", "."), ("train/loss_epoch", "epoch mean", "o")):
        _draw(loss_axis, series.get(column, []), label, marker=marker)
    loss_axis.set(xlabel="step", ylabel="training loss", title="unit-consistency loss")
    for column in ("val/mrr", "val/hits@1"):
        _draw(dev_axis, series.get(column, []), column.removeprefix("val/"), marker="o")
    dev_axis.set(xlabel="epoch", ylabel="dev metric", title="dev (full-KB ranking)")
    for axis in (loss_axis, dev_axis):
        if axis.lines:
            axis.legend()
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(Path(out_png), buffer.getvalue())
    return Path(out_png)


def _draw(axis, points: list[tuple[float, float]], label: str, **style: str) -> None:
    if points:
        xs, ys = zip(*points, strict=True)
        axis.plot(xs, ys, label=label, **style)


__all__ = ["plot_training_curve", "read_metric_series"]
