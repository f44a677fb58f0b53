"""The one builder of the trained-vs-raw-pixels columns (the CLI's final table, report.html, the several-runs page)."""

from __future__ import annotations

import math

import pytest

from recallk.report.comparison import comparison_columns

NAMES = {"last": "after", "best": "best", "baseline": "pixels", "gain": "gain", "before": "before"}


def line(epoch, recall, map_r):
    return {"kind": "eval", "epoch": epoch, "step": 10 * epoch, "split": "test", "recall@1": recall, "map@r": map_r,
            "positive_recall@1": 0.5, "num_queries": 9, "val/map@r": 0.9}


def test_columns_in_reading_order_with_summary_metrics_and_the_gain_in_fractions():
    before, best, last = line(0, 0.25, 0.125), line(1, 0.75, 0.5), line(2, 0.625, 0.375)
    pixels = {"recall@1": 0.5, "map@r": 0.25, "r_precision": 0.2, "num_queries": 9}
    columns = comparison_columns(NAMES, last, best=best, baseline=pixels, before=before)
    assert list(columns) == ["after", "best", "pixels", "gain", "before"]
    assert columns["after"] == {"recall@1": 0.625, "map@r": 0.375}  # no counts, no val/, no positive_recall
    assert columns["pixels"] == {"recall@1": 0.5, "map@r": 0.25, "r_precision": 0.2}
    assert columns["gain"] == {"recall@1": 0.125, "map@r": 0.125}  # r_precision: the model has none
    assert columns["best"]["recall@1"] == 0.75 and columns["before"]["map@r"] == 0.125


def test_best_is_left_out_when_it_is_the_last_evaluation_and_gain_needs_a_name_and_a_model():
    last = line(2, 0.5, 0.5)
    assert list(comparison_columns(NAMES, last, best=last, before=line(0, 0.1, 0.1))) == ["after", "before"]
    no_gain = {k: v for k, v in NAMES.items() if k != "gain"}
    assert list(comparison_columns(no_gain, last, baseline={"recall@1": 0.4})) == ["after", "pixels"]
    assert list(comparison_columns(NAMES, None, baseline={"recall@1": 0.4})) == ["pixels"]


def test_a_nan_metric_keeps_a_nan_gain():
    gain = comparison_columns(NAMES, {"map@r": float("nan")}, baseline={"map@r": 0.5})["gain"]
    assert math.isnan(gain["map@r"])
    assert comparison_columns(NAMES, {"map@r": 0.75}, baseline={"map@r": 0.5})["gain"] == {"map@r": pytest.approx(0.25)}
