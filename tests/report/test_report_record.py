"""The report as a research record (issue 19): best.pt's epoch and the split that chose it, the test numbers of the
last and of the best.pt epoch in percent, wall time, images/s, device, versions, git commit, command line and the
resumed segments; "not recorded" for runs older than run.json."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import torch

from recallk import provenance
from recallk.report import read_run, write_report
from recallk.report.plots import history_figure
from recallk.report.record import resume_marks

T0 = 1.7e9


def _eval(epoch: int, step: int, time: float, test: float, val: float | None) -> dict:
    record = {"kind": "eval", "epoch": epoch, "step": step, "time": time, "split": "test",
              "recall@1": test, "recall@2": test + 0.05, "map@r": test / 2, "r_precision": test / 1.5,
              "num_queries": 30, "num_excluded_queries": 0}
    if val is not None:
        record.update({"val/recall@1": val, "val/recall@2": val + 0.03, "val/map@r": val / 2,
                       "val/num_queries": 12})
    return record


def _train(epoch: int, step: int, time: float, rate: float | None, scope: str = "interval") -> dict:
    record = {"kind": "train", "epoch": epoch, "step": step, "time": time, "scope": scope, "loss": 1.0 / step,
              "lr": 0.01}
    if rate is not None:
        record["images_per_s"] = rate
    return record


def validated_lines(val: bool = True) -> list[dict]:
    """Epoch 0..2: validation prefers epoch 1, the test split epoch 2; segment 1 ends after epoch 1 (at T0 + 125),
    the resume starts at T0 + 1000 and ends at T0 + 1010. Intervals of 5 and 10 steps at 100 and 300 images/s."""
    return [
        _eval(0, 0, T0 + 1, 0.2034, 0.2511 if val else None),
        _train(1, 5, T0 + 10, 100.0), _train(1, 15, T0 + 20, 300.0), _train(1, 15, T0 + 21, None, "epoch"),
        _eval(1, 15, T0 + 125, 0.5123, 0.8046 if val else None),
        _train(2, 20, T0 + 1003, 100.0), _train(2, 30, T0 + 1006, 300.0), _train(2, 30, T0 + 1007, None, "epoch"),
        _eval(2, 30, T0 + 1010, 0.6217, 0.7031 if val else None),
    ]


def git_head() -> str | None:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def write_record(run: Path) -> list[dict]:
    """run.json of two segments (start, then a resume) with fixed times, and best.json choosing epoch 1 on val."""
    provenance.start_segment(run, resume=False, device="cpu")
    provenance.end_segment(run, "stopped by SIGTERM")
    provenance.start_segment(run, resume=True, device="cpu")
    provenance.end_segment(run, "finished")
    data = json.loads((run / "run.json").read_text())
    for segment, (start, end) in zip(data["segments"], ((T0, T0 + 125), (T0 + 1000, T0 + 1010))):
        segment["time"], segment["end_time"] = start, end
    (run / "run.json").write_text(json.dumps(data))
    (run / "best.json").write_text(json.dumps({"metric": "val/recall@1", "split": "validation", "value": 0.8046,
                                               "epoch": 1, "step": 15}))
    return data["segments"]


def cells(text: str, key: str) -> list[str]:
    row = re.search(rf"<tr><td>{re.escape(key)}</td>(.*?)</tr>", text)
    assert row, key
    return re.findall(r"<td[^>]*>([^<]*)</td>", row.group(1))


def test_report_is_a_research_record(make_run):
    lines = validated_lines()
    run, dataset, _, _ = make_run(metrics=lines)
    segments = write_record(run)
    text = write_report(run, dataset=dataset).read_text(encoding="utf-8")

    # best.pt: its epoch, the metric (percent) and the split that chose it
    assert ("epoch 1, step 15, chosen by <code>val/recall@1</code> = 80.46 on the <b>validation</b> split "
            "<small>(from best.json)</small>") in text
    assert "test-set feedback" not in text
    # the test numbers of the last epoch and of the best.pt epoch, in percent as the CLI prints them
    e0, e1, e2 = (r for r in lines if r["kind"] == "eval")
    assert "<th>best.pt (epoch 1)</th><th>last epoch (2)</th>" in text
    for key in ("recall@1", "recall@2", "map@r", "r_precision", "val/recall@1", "val/map@r"):
        assert cells(text, key) == [f"{100 * e0[key]:.2f}", f"{100 * e1[key]:.2f}", f"{100 * e2[key]:.2f}",
                                    f"{100 * (e2[key] - e0[key]):+.2f}"]
    assert cells(text, "val/num_queries")[:3] == ["12", "12", "12"]
    assert "best.pt (epoch 1, chosen on validation)" in text  # a column of the lead table too
    # wall time (the pause between the stop and the resume not counted), images/s (weighted by time)
    assert "2m15s over 2 segment(s)" in text
    assert "180.0 images/s" in text  # 30 steps in 5/100 + 10/300 + 5/100 + 10/300 s
    # where it was made
    env = segments[0]
    commit = git_head()
    assert (f"<code>{commit}</code>" in text) if commit else "is not a git checkout" in text
    assert f"<code>{env['command']}</code>" in text and env["command"]
    assert f"torch {torch.__version__.split('+')[0]}" in text
    assert f"recallk {env['versions']['recallk']}" in text and env["versions"]["recallk"]
    assert "cpu (" in text and "1 process(es)" in text
    # the resume: in the record and on the curves
    assert "<th>resumed</th><td>1 time(s)</td>" in text
    assert "<td>2 (resume)</td>" in text and "<td>epoch 1, step 15</td>" in text
    assert "stopped by SIGTERM" in text
    assert "not recorded" not in text


def test_resume_is_marked_on_the_curves(make_run):
    run, _, _, _ = make_run(metrics=validated_lines())
    write_record(run)
    record = read_run(run)
    assert resume_marks(record) == [1.0]  # continued from the end of epoch 1
    fig = history_figure(record.records, resume_marks(record), best_epoch=record.best.epoch)
    for ax in fig.axes:
        xs = {float(line.get_xdata()[0]) for line in ax.lines if line.get_linestyle() == "--"
              and line.get_label() == "resumed"}
        assert xs == {1.0}, ax.get_title()
    recall_ax = next(ax for ax in fig.axes if ax.get_title().startswith("recall@k"))
    labels = [line.get_label() for line in recall_ax.lines]
    assert "best.pt (epoch 1)" in labels and "recall@1 (validation)" in labels and "recall@1 (test)" in labels


def test_old_run_says_not_recorded_and_recomputes_best(make_run):
    config = {"name": "old", "data": {"dataset": "no-such-dataset", "test_split": "test"},
              "train": {"best_metric": "recall@1"}}
    lines = validated_lines(val=False)
    lines[-1]["recall@1"] = 0.5123  # a tie with epoch 1: the trainer keeps the first
    run, dataset, _, _ = make_run(metrics=lines, config=config)
    (run / "train.log").write_text("2026-11-30 05:00:57 run folder   runs/old (new run)\n"
                                   "2026-11-30 05:00:57 device       cpu, 2 process(es)\n")
    text = write_report(run, dataset=dataset).read_text(encoding="utf-8")
    for label in ("versions", "git commit", "command line"):
        assert f"<th>{label}</th><td>not recorded</td>" in text
    assert "cpu, 2 process(es) <small>(from train.log)</small>" in text
    assert ("epoch 1, step 15, chosen by <code>recall@1</code> = 51.23 on the <b>test</b> split "
            "<small>(from metrics.jsonl)</small>") in text
    assert "test-set feedback" in text
    assert "checkpoints/best.pt is not in the run folder" in text
    # without run.json the wall time comes from the metrics lines: the whole span, as no resume is known
    assert "16m49s" in text  # T0 + 1 .. T0 + 1010


def test_best_from_the_checkpoint_of_an_old_run(make_run):
    run, dataset, _, _ = make_run(metrics=validated_lines(val=False))
    (run / "checkpoints").mkdir()
    torch.save({"best": {"metric": "map@r", "value": 0.25615, "epoch": 1}, "step": 15, "epoch": 1},
               run / "checkpoints" / "best.pt")
    (run / "resumes.jsonl").write_text(json.dumps({"time": T0 + 1000, "argv": ["train", "--resume"],
                                                   "changes": {}}) + "\n")
    text = write_report(run, dataset=dataset).read_text(encoding="utf-8")
    assert ("epoch 1, step 15, chosen by <code>map@r</code> = 25.61 on the <b>test</b> split "
            "<small>(from checkpoints/best.pt)</small>") in text
    # the resume of resumes.jsonl: a segment, its command line, the wall time of both segments
    assert "<td>2 (resume)</td>" in text and "<code>recallk train --resume</code>" in text
    assert "2m14s over 2 segment(s)" in text  # (T0 + 125) - (T0 + 1), then (T0 + 1010) - (T0 + 1000)


def test_resume_of_a_run_older_than_run_json(make_run):
    run, dataset, _, _ = make_run(metrics=validated_lines(val=False))
    provenance.start_segment(run, resume=True, device="cpu")  # the first start was not recorded
    data = json.loads((run / "run.json").read_text())
    data["segments"][1]["time"] = T0 + 1000
    (run / "run.json").write_text(json.dumps(data))
    record = read_run(run)
    first, resumed = record.segments
    assert (first.start, first.end, first.resume, first.command) == (T0 + 1, T0 + 125, False, None)
    assert resumed.resume and (resumed.from_epoch, resumed.from_step) == (1, 15)
    assert record.environment["command"] == data["segments"][1]["command"]  # the recorded segment's
    text = write_report(run, dataset=dataset).read_text(encoding="utf-8")
    assert "<td>1 (start)</td>" in text and "<td>2 (resume)</td>" in text
    assert "running when this report was written" in text  # no end_time: the last segment is still running
