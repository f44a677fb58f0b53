"""Training curves from a run's ``metrics.jsonl``: loss, learning rate and eval metrics per epoch.

Figures are drawn with matplotlib's Agg canvas directly (no pyplot), so nothing global is changed.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from recallk.run_folder import read_metrics, write_atomic

Record = dict[str, Any]

_RECALL_KEY = re.compile(r"^recall@(\d+)$")
PERCENT_LABEL = "% (mean over queries)"  # the eval panels: 100 * the value of metrics.jsonl


def plotted_train_lines(records: Sequence[Record], key: str) -> list[Record]:
    """The train records the curves draw for ``key``, grouped by epoch in file order: the per-interval lines
    (``"scope": "interval"``) when the run logged any carrying ``key``, else the per-epoch summary lines
    (``"scope": "epoch"``, or no ``scope``: runs made before it was recorded). Never both: an epoch line repeats
    the mean of its epoch's interval lines, and drawing both made a staircase of duplicated values."""
    lines = [r for r in records if r["kind"] == "train" and r.get(key) is not None]
    intervals = [r for r in lines if r.get("scope") == "interval"]
    chosen = intervals or [r for r in lines if r.get("scope", "epoch") != "interval"]
    per_epoch: dict[int, list[Record]] = {}
    for r in chosen:
        per_epoch.setdefault(int(r["epoch"]), []).append(r)
    return [r for epoch in sorted(per_epoch) for r in per_epoch[epoch]]


def train_points(records: Sequence[Record], key: str) -> tuple[list[float], list[float]]:
    """Values of ``key`` from the train records (:func:`plotted_train_lines`: interval lines when logged, else
    epoch lines), placed on a fractional-epoch axis.

    A train record of epoch e (1-based; epoch 0 is before training) is logged during that epoch. With one
    record per epoch it sits at x = e; with n records in epoch e, record j (0-based) sits at
    x = e - 1 + (j + 1) / n. Records without ``key`` are skipped. Returns (x, y) lists of equal length.
    """
    lines = plotted_train_lines(records, key)
    counts: dict[int, int] = {}
    for r in lines:
        counts[int(r["epoch"])] = counts.get(int(r["epoch"]), 0) + 1
    xs: list[float] = []
    ys: list[float] = []
    seen: dict[int, int] = {}
    for r in lines:
        epoch = int(r["epoch"])
        j = seen.get(epoch, 0)
        seen[epoch] = j + 1
        xs.append(epoch - 1 + (j + 1) / counts[epoch])
        ys.append(float(r[key]))
    return xs, ys


def eval_splits(records: Sequence[Record]) -> list[str]:
    """Names of the evaluated splits, in order of first appearance (no ``split`` key counts as "")."""
    splits: list[str] = []
    for r in records:
        if r["kind"] == "eval":
            split = str(r.get("split", ""))
            if split not in splits:
                splits.append(split)
    return splits


def eval_records(records: Sequence[Record], split: str) -> list[Record]:
    """Eval records of one split, in file order."""
    return [r for r in records if r["kind"] == "eval" and str(r.get("split", "")) == split]


def recall_ks(records: Sequence[Record], prefix: str = "") -> list[int]:
    """Sorted k values of every ``<prefix>recall@k`` key found in the eval records (prefix ``"val/"``: the
    validation metrics logged next to the test ones)."""
    ks = {int(m.group(1)) for r in records if r["kind"] == "eval" for key in r
          if key.startswith(prefix) and (m := _RECALL_KEY.match(key[len(prefix):]))}
    return sorted(ks)


def step_position(records: Sequence[Record], step: int, epoch: int = 0) -> float:
    """The x (fractional epoch, as :func:`train_points` places the train lines) of the optimiser step ``step``:
    that of the last train line at or before it, at least ``epoch`` (a resume from the end of an epoch sits
    at that epoch)."""
    xs, _ = train_points(records, "loss")
    steps = [int(r["step"]) for r in plotted_train_lines(records, "loss")]
    before = [x for x, s in zip(xs, steps) if s <= step]
    return max([float(epoch), *before])


def _eval_series(records: Sequence[Record], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values in percent) of ``key``: ``100 * value`` of metrics.jsonl, as the CLI prints metrics."""
    xs, ys = [], []
    for r in records:
        if r.get(key) is not None:
            xs.append(int(r["epoch"]))
            ys.append(100.0 * float(r[key]))
    return xs, ys


def _empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def history_figure(
    records: Sequence[Record], resumes: Sequence[float] = (), best_epoch: int | None = None
) -> Figure:
    """A 2x2 figure: train loss, learning rate, recall@k per k, and map@r (+ r_precision) against epoch.

    Each eval split gets its own line style, and so do the validation metrics (``val/...`` keys); epoch 0 is the
    evaluation before training. Evaluation metrics are drawn in percent (``100 * value``), as the CLI prints them;
    loss and learning rate from the interval lines when the run logged them, else the epoch lines
    (:func:`plotted_train_lines`). ``resumes``: x positions (fractional epochs, :func:`step_position`) where a
    resumed segment continued, drawn as grey dashed vertical lines on every panel; ``best_epoch``: the epoch of
    best.pt, a green dotted line on the evaluation panels.
    """
    fig = Figure(figsize=(11, 7.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_lr, ax_recall, ax_map = fig.subplots(2, 2).ravel()

    xs, ys = train_points(records, "loss")
    if xs:
        ax_loss.plot(xs, ys, marker="o" if len(xs) <= 50 else None, markersize=3, color="tab:blue")
        ax_loss.set_title("training loss")
    else:
        _empty(ax_loss, "no training records")
        ax_loss.set_title("training loss")

    xs, ys = train_points(records, "lr")
    ax_lr.set_title("learning rate")
    if xs:
        ax_lr.plot(xs, ys, color="tab:purple")
        positive = [y for y in ys if y > 0 and math.isfinite(y)]
        if positive and len(positive) == len(ys) and max(positive) / min(positive) > 20:
            ax_lr.set_yscale("log")
    else:
        _empty(ax_lr, "no learning-rate records")

    styles = ["-", "--", ":", "-."]
    splits = eval_splits(records)
    series = []  # (eval records, key prefix, legend suffix)
    with_val = bool(recall_ks(records, "val/")) or any("val/map@r" in r for r in records)
    for split in splits:
        rows = eval_records(records, split)
        series.append((rows, "", f" ({split})" if (len(splits) > 1 or with_val) and split else ""))
        if with_val:
            series.append((rows, "val/", " (validation)"))
    ks = sorted(set(recall_ks(records)) | set(recall_ks(records, "val/")))
    colours = [f"C{i % 10}" for i in range(len(ks))]
    ax_recall.set_title("recall@k (%)")
    ax_map.set_title("map@r and r-precision (%)")
    for s, (rows, prefix, suffix) in enumerate(series):
        style = styles[s % len(styles)]
        for k, colour in zip(ks, colours):
            ex, ey = _eval_series(rows, f"{prefix}recall@{k}")
            if ex:
                ax_recall.plot(ex, ey, style, marker="o", markersize=4, color=colour, label=f"recall@{k}{suffix}")
        for key, colour in (("map@r", "tab:red"), ("r_precision", "tab:gray")):
            ex, ey = _eval_series(rows, prefix + key)
            if ex:
                ax_map.plot(ex, ey, style, marker="o", markersize=4, color=colour, label=f"{key}{suffix}")
    if best_epoch is not None:
        for ax in (ax_recall, ax_map):
            if ax.lines:
                ax.axvline(best_epoch, color="tab:green", linestyle=":", linewidth=1.5,
                           label=f"best.pt (epoch {best_epoch})")
    for ax in (ax_loss, ax_lr, ax_recall, ax_map):
        if ax.lines:  # an empty panel keeps its "no records" text
            for i, x in enumerate(resumes):
                ax.axvline(x, color="0.45", linestyle="--", linewidth=1, label="resumed" if i == 0 else None)
    if resumes and ax_loss.lines:
        ax_loss.legend(fontsize=8, loc="best")
    for ax in (ax_recall, ax_map):
        if ax.lines:
            ax.legend(fontsize=8, loc="best")
            ax.set_ylabel(PERCENT_LABEL)
        else:
            _empty(ax, "no evaluation records")
    for ax in (ax_loss, ax_lr, ax_recall, ax_map):
        ax.set_xlabel("epoch (0 = before training)")
        ax.grid(alpha=0.3)
    return fig


def comparison_figure(runs: Sequence[tuple[str, Sequence[Record], Sequence[float]]]) -> Figure:
    """Curves of several runs overlaid, one colour per run: training loss, recall@k (smallest k logged by any
    run), map@r and r-precision of each run's test split (solid) and validation metrics (``val/...``, dashed),
    against epoch; metrics in percent (``100 * value``), as the CLI prints them; the loss from the interval lines
    when the run logged them, else the epoch lines (:func:`plotted_train_lines`). ``runs``: (label, metrics
    records, resume x positions (:func:`step_position`)) per run; resumes are drawn as dotted vertical lines in
    the run's colour."""
    fig = Figure(figsize=(11, 7.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_recall, ax_map, ax_rp = fig.subplots(2, 2).ravel()
    ks = sorted({k for _, records, _ in runs for k in recall_ks(records)})
    recall_key = f"recall@{ks[0]}" if ks else "recall@1"
    ax_loss.set_title("training loss")
    ax_recall.set_title(recall_key)
    ax_map.set_title("map@r")
    ax_rp.set_title("r_precision")
    for i, (label, records, resumes) in enumerate(runs):
        colour = f"C{i % 10}"
        xs, ys = train_points(records, "loss")
        if xs:
            ax_loss.plot(xs, ys, color=colour, marker="o" if len(xs) <= 50 else None, markersize=3, label=label)
        splits = eval_splits(records)
        rows = eval_records(records, splits[-1] if splits else "")
        for ax, key in ((ax_recall, recall_key), (ax_map, "map@r"), (ax_rp, "r_precision")):
            for prefix, style, suffix in (("", "-", ""), ("val/", "--", " (validation)")):
                ex, ey = _eval_series(rows, prefix + key)
                if ex:
                    ax.plot(ex, ey, style, color=colour, marker="o", markersize=4, label=label + suffix)
        for ax in (ax_loss, ax_recall, ax_map, ax_rp):
            for x in resumes if ax.lines else ():  # an empty panel keeps its "no records" text
                ax.axvline(x, color=colour, linestyle=":", linewidth=1)
    for ax in (ax_loss, ax_recall, ax_map, ax_rp):
        if ax.lines:
            ax.legend(fontsize=8, loc="best")
            if ax is not ax_loss:
                ax.set_ylabel(PERCENT_LABEL)
        else:
            _empty(ax, "no records")
        ax.set_xlabel("epoch (0 = before training)")
        ax.grid(alpha=0.3)
    return fig


def figure_png(fig: Figure) -> bytes:
    """Encode a matplotlib figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def plot_history(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Plot the curves of ``metrics_path`` (see :func:`history_figure`) into the PNG file ``out_png``.

    Returns the path written. Raises ValueError when the metrics file is missing or malformed.
    """
    return write_atomic(out_png, figure_png(history_figure(read_metrics(metrics_path))))
