"""``recallk report RUN_A RUN_B ...`` / ``write_comparison``: runs side by side in one self-contained page."""

from __future__ import annotations

import re

import numpy as np
import pytest

from recallk.cli.main import main
from recallk.report import write_comparison
from recallk.report.compare import differing_keys
from recallk.testing.retrieval import reference_retrieval_metrics
from tests.helpers.report_runs import clustered_embeddings, metrics_lines


def config(name: str, lr: float, model: str) -> dict:
    return {"name": name, "data": {"dataset": "no-such-dataset", "root": "/data", "test_split": "test"},
            "model": {"name": model, "embed_dim": 8}, "train": {"lr": lr, "epochs": 3, "best_metric": "map@r"}}


def scaled_lines(factor: float) -> list[dict]:
    lines = metrics_lines()
    for r in lines:
        if r["kind"] == "eval":
            for key in ("recall@1", "recall@2", "map@r", "r_precision"):
                r[key] = round(r[key] * factor, 6)
    return lines


@pytest.fixture
def two_runs(make_run):
    a, _, _, labels = make_run(name="run-a", config=config("run-a", 0.01, "resnet18"), metrics=scaled_lines(1.0))
    b, _, _, _ = make_run(name="run-b", config=config("run-b", 0.002, "resnet18"), metrics=scaled_lines(0.9))
    pixels, _ = clustered_embeddings(seed=3, noise=2.0)
    (b / "embeddings" / "raw_pixels").mkdir()
    np.savez(b / "embeddings" / "raw_pixels" / "test.npz", embeddings=pixels, labels=labels)
    return a, b, pixels, labels


def rows_of(text: str, run: str) -> dict[str, list[str]]:
    """{evaluation: cells} of one run in the metrics table (the run's name spans its rows)."""
    table = text[text.index("<h2>Test metrics (%)</h2>"):text.index("<h2>Configuration differences</h2>")]
    rows, current = {}, None
    for row in re.findall(r"<tr>(.*?)</tr>", table):
        named = re.match(r'<td class="label" rowspan="\d+">([^<]*)</td>', row)
        if named:
            current = named.group(1)
            row = row[named.end():]
        values = re.findall(r"<td[^>]*>([^<]*)</td>", row)
        if current == run and values:
            rows[values[0]] = values[1:]
    return rows


def test_comparison_lists_both_runs_and_the_differing_config_keys(two_runs, tmp_path):
    a, b, pixels, labels = two_runs
    out = write_comparison([a, b], tmp_path / "cmp" / "compare.html")
    text = out.read_text(encoding="utf-8")
    assert "recallk: 2 run(s) compared" in text
    head = re.search(r"<thead><tr><th>run</th><th>evaluation</th>(.*?)</tr></thead>", text).group(1)
    keys = re.findall(r"<th>([^<]*)</th>", head)
    assert keys == ["recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision"]
    for run, factor in (("run-a", 1.0), ("run-b", 0.9)):
        last = scaled_lines(factor)[-1]
        rows = rows_of(text, run)
        assert rows["last epoch (3) = best.pt"] == [f"{100 * last[k]:.2f}" for k in keys]
        assert rows["untrained (epoch 0)"] == [f"{100 * scaled_lines(factor)[0][k]:.2f}" for k in keys]
    reference = reference_retrieval_metrics(pixels, labels, (1, 2, 4, 8))
    assert rows_of(text, "run-b")["raw pixels"] == [f"{100 * reference[k]:.2f}" for k in keys]
    assert "raw pixels" not in rows_of(text, "run-a")
    # the config keys that differ, with both values; equal keys are not listed
    diff = text[text.index("<h2>Configuration differences</h2>"):text.index("<h2>Run records</h2>")]
    assert re.search(r"<tr><td>train.lr</td><td><code>0.01</code></td><td><code>0.002</code></td></tr>", diff)
    assert re.search(r"<tr><td>name</td><td><code>&quot;run-a&quot;</code></td>", diff)
    assert "model.name" not in diff and "data.dataset" not in diff and "train.epochs" not in diff
    # records and curves
    records = text[text.index("<h2>Run records</h2>"):text.index("<h2>Training curves</h2>")]
    assert records.count("not recorded") >= 2 * 4  # two runs older than run.json
    assert re.search(r'<img class="plot" [^>]*src="data:image/png;base64,', text)
    assert not re.search(r"https?://", text) and "<script" not in text


def test_differing_keys():
    diff = differing_keys([{"a": {"b": 1, "c": [1, 2]}, "d": None, "e": 1},
                           {"a": {"b": 1.0, "c": [1, 3]}, "e": True}])
    assert diff == {"a.c": [[1, 2], [1, 3]], "d": [None, diff["d"][1]], "e": [1, True]}
    assert len(diff["d"]) == 2 and diff["d"][1] is not None  # absent, not null


def test_cli_compares_several_runs_and_keeps_one_run_reports(two_runs, tmp_path, monkeypatch, capsys):
    a, b, _, _ = two_runs
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(a), str(b)]) == 0
    assert (tmp_path / "report-compare.html").is_file()
    assert "report-compare.html" in capsys.readouterr().out
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "x.html")]) == 0
    assert "train.lr" in (tmp_path / "x.html").read_text(encoding="utf-8")
    assert main(["report", str(a)]) == 0  # one run: its own report.html, as before
    assert (a / "report.html").is_file() and "recallk run: run-a" in (a / "report.html").read_text("utf-8")


def test_a_folder_that_is_not_a_run_is_a_clear_error(two_runs, tmp_path, capsys):
    a, _, _, _ = two_runs
    (tmp_path / "empty").mkdir()
    assert main(["report", str(a), str(tmp_path / "empty"), "--out", str(tmp_path / "y.html")]) == 2
    err = capsys.readouterr().err
    assert "is not a run folder: it has no metrics.jsonl" in err and "Traceback" not in err
    assert not (tmp_path / "y.html").exists()
    assert main(["report", str(a), str(tmp_path / "missing")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    with pytest.raises(ValueError, match="more than once"):
        write_comparison([a, a], tmp_path / "z.html")
