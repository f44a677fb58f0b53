"""Training curves: metrics.jsonl parsing, epoch placement and what the figure actually draws."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from recallk.report import plot_history, read_metrics
from recallk.report.plots import comparison_figure, eval_splits, history_figure, recall_ks, step_position, train_points
from tests.helpers.report_runs import metrics_lines


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_read_metrics_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(ValueError, match=r"metrics\.jsonl"):
        read_metrics(tmp_path / "metrics.jsonl")
    path = write_lines(tmp_path / "metrics.jsonl", [{"kind": "train", "epoch": 1}, "", "{not json"])
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3 is not valid JSON"):
        read_metrics(path)
    write_lines(path, [{"kind": "train"}])
    with pytest.raises(ValueError, match=r"metrics\.jsonl:1 .*'epoch'"):
        read_metrics(path)


def test_read_metrics_skips_blank_lines_and_keeps_order(tmp_path):
    lines = metrics_lines(epochs=2)
    path = write_lines(tmp_path / "m.jsonl", [lines[0], "", "  ", *lines[1:]])
    assert read_metrics(path) == lines


def test_train_points_on_fractional_epochs():
    records = [
        {"kind": "train", "epoch": 1, "loss": 3.0},
        {"kind": "eval", "epoch": 1, "loss": 99.0},
        {"kind": "train", "epoch": 1, "loss": 2.0},
        {"kind": "train", "epoch": 2, "loss": 1.0},
        {"kind": "train", "epoch": 3, "lr": 0.1},
    ]
    assert train_points(records, "loss") == ([0.5, 1.0, 2.0], [3.0, 2.0, 1.0])
    assert train_points(records, "lr") == ([3.0], [0.1])


def test_eval_helpers():
    records = [*metrics_lines(1), {"kind": "eval", "epoch": 1, "split": "val", "recall@16": 0.5}]
    assert eval_splits(records) == ["test", "val"]
    assert recall_ks(records) == [1, 2, 4, 8, 16]


def test_figure_draws_the_logged_values():
    records = metrics_lines(epochs=3)
    fig = history_figure(records)
    ax_loss, ax_lr, ax_recall, ax_map = fig.axes
    evals = [r for r in records if r["kind"] == "eval"]
    trains = [r for r in records if r["kind"] == "train"]
    (loss_line,) = ax_loss.lines
    np.testing.assert_allclose(loss_line.get_ydata(), [r["loss"] for r in trains])
    np.testing.assert_allclose(loss_line.get_xdata(), [0.5, 1, 1.5, 2, 2.5, 3])
    np.testing.assert_allclose(ax_lr.lines[0].get_ydata(), [r["lr"] for r in trains])
    by_label = {line.get_label(): line for line in ax_recall.lines + ax_map.lines}
    assert set(by_label) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision"}
    for key, line in by_label.items():
        np.testing.assert_array_equal(line.get_xdata(), [0, 1, 2, 3])
        np.testing.assert_allclose(line.get_ydata(), [100 * r[key] for r in evals])  # percent, as the CLI prints
    assert ax_recall.get_ylabel() == ax_map.get_ylabel() == "% (mean over queries)"


def test_plot_history_writes_a_png(tmp_path):
    metrics = write_lines(tmp_path / "metrics.jsonl", metrics_lines())
    out = plot_history(metrics, tmp_path / "plots" / "history.png")
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (750, 1100, 3)
    assert (image < 200).any(axis=2).mean() > 0.01  # axes, text and lines, not a blank canvas


def test_plot_history_without_eval_or_train_records(tmp_path):
    metrics = write_lines(tmp_path / "metrics.jsonl", [{"kind": "other", "epoch": 0}])
    fig = history_figure(read_metrics(metrics))
    assert all(not ax.lines for ax in fig.axes)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "no evaluation records" in texts and "no training records" in texts
    assert plot_history(metrics, tmp_path / "h.png").is_file()


def scoped_lines(epochs: int = 3, intervals: bool = True) -> list[dict]:
    """metrics.jsonl as the trainer writes it: per epoch two interval lines (when ``intervals``) then the epoch
    summary line (their mean), then the eval line."""
    lines: list[dict] = [{"kind": "eval", "epoch": 0, "step": 0, "split": "test", "recall@1": 0.1, "map@r": 0.05}]
    step = 0
    for epoch in range(1, epochs + 1):
        losses = [1.0 - 0.2 * epoch, 0.9 - 0.2 * epoch]
        for loss in losses:
            step += 5
            if intervals:
                lines.append({"kind": "train", "epoch": epoch, "step": step, "scope": "interval", "loss": loss,
                              "lr": 0.1 * epoch, "images_per_s": 50.0})
        lines.append({"kind": "train", "epoch": epoch, "step": step, "scope": "epoch", "loss": sum(losses) / 2,
                      "lr": 0.1 * epoch, "images_per_s": 50.0})
        lines.append({"kind": "eval", "epoch": epoch, "step": step, "split": "test", "recall@1": 0.1 + 0.2 * epoch,
                      "map@r": 0.05 + 0.2 * epoch})
    return lines


def test_loss_curve_uses_interval_lines_else_epoch_lines_never_both():
    with_intervals = scoped_lines(intervals=True)
    intervals = [r for r in with_intervals if r.get("scope") == "interval"]
    assert train_points(with_intervals, "loss") == ([0.5, 1.0, 1.5, 2.0, 2.5, 3.0], [r["loss"] for r in intervals])
    epoch_only = scoped_lines(intervals=False)
    summaries = [r for r in epoch_only if r.get("scope") == "epoch"]
    assert train_points(epoch_only, "loss") == ([1.0, 2.0, 3.0], [r["loss"] for r in summaries])
    for records, expected in ((with_intervals, intervals), (epoch_only, summaries)):
        ax_loss, ax_lr, _, _ = history_figure(records).axes
        (loss_line,) = ax_loss.lines
        np.testing.assert_allclose(loss_line.get_ydata(), [r["loss"] for r in expected])
        np.testing.assert_allclose(ax_lr.lines[0].get_ydata(), [r["lr"] for r in expected])
        ax_cmp_loss = comparison_figure([("a", records, [])]).axes[0]
        np.testing.assert_allclose(ax_cmp_loss.lines[0].get_ydata(), [r["loss"] for r in expected])
    # a resume after step 15 (the first interval line of epoch 2) sits where that line is drawn
    assert step_position(with_intervals, 15, 1) == 1.5
    assert step_position(epoch_only, 15, 1) == 1.0


def test_comparison_figure_draws_metrics_in_percent():
    records = scoped_lines()
    evals = [r for r in records if r["kind"] == "eval"]
    _, ax_recall, ax_map, _ = comparison_figure([("a", records, [])]).axes
    np.testing.assert_allclose(ax_recall.lines[0].get_ydata(), [100 * r["recall@1"] for r in evals])
    np.testing.assert_allclose(ax_map.lines[0].get_ydata(), [100 * r["map@r"] for r in evals])
    assert ax_recall.get_ylabel() == ax_map.get_ylabel() == "% (mean over queries)"
