"""The "pretrained, zero-shot" column of the report: its place among the comparison columns, read from
``embeddings/zero_shot/<split>.npz`` by the run record, and shown on the several-runs page only for the run that
has it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recallk.report import write_comparison
from recallk.report.comparison import comparison_columns
from recallk.report.record import read_run
from recallk.run_folder import RunFolder, write_embeddings_npz
from recallk.testing.retrieval import reference_retrieval_metrics

NAMES = {"last": "after", "baseline": "pixels", "gain": "gain", "zero_shot": "zero-shot", "before": "before"}


def test_zero_shot_sits_after_raw_pixels_and_their_gain_and_before_the_untrained_model():
    last, before = {"recall@1": 0.75, "map@r": 0.5}, {"recall@1": 0.25, "map@r": 0.125}
    zero = {"recall@1": 0.5, "map@r": 0.25, "num_queries": 9, "positive_recall@1": 0.1}
    columns = comparison_columns(NAMES, last, baseline={"recall@1": 0.6}, before=before, zero_shot=zero)
    assert list(columns) == ["after", "pixels", "gain", "zero-shot", "before"]
    assert columns["zero-shot"] == {"recall@1": 0.5, "map@r": 0.25}  # summary metrics only
    assert "zero-shot" not in comparison_columns(NAMES, last, before=before)  # a run from random weights


def _run(folder, name, zero_shot):
    folder.mkdir()
    lines = [{"kind": "eval", "epoch": e, "step": e, "time": float(e), "split": "test", "recall@1": r, "map@r": m}
             for e, r, m in ((0, 0.25, 0.125), (1, 0.75, 0.5))]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (folder / "config.yaml").write_text(f"name: {name}\ndata:\n  test_split: test\n")
    if zero_shot is not None:
        write_embeddings_npz(RunFolder(folder).zero_shot("test"), *zero_shot)
    return folder


def test_the_record_reads_the_zero_shot_file_and_the_comparison_page_shows_it(tmp_path):
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((12, 5)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    labels = np.repeat(np.arange(4), 3)
    pretrained = _run(tmp_path / "a", "from_lite0", (embeddings, labels))
    scratch = _run(tmp_path / "b", "from_scratch", None)

    record = read_run(pretrained)
    expected = reference_retrieval_metrics(embeddings.astype(np.float64), labels, (1,))
    assert record.zero_shot["recall@1"] == pytest.approx(expected["recall@1"])
    assert record.zero_shot["map@r"] == pytest.approx(expected["map@r"])
    assert read_run(scratch).zero_shot is None

    page = write_comparison([pretrained, scratch], tmp_path / "compare.html").read_text()
    assert page.count("pretrained, zero-shot") == 1  # one row, the pretrained run's
    assert f"<td>{100 * expected['map@r']:.2f}</td>" in page
