"""``recallk train`` records where and how a run was made in ``runs/<name>/run.json`` (contract 3): one segment per
start, a resume appends one, and the report shows them."""

from __future__ import annotations

import json
import signal
import sys
from html import escape
from pathlib import Path

import pytest

from recallk.cli.main import main
from tests.helpers.runs import tiny_overrides

TINY = tiny_overrides("kanji", drop=("train.epochs",))  # the config's epochs: each test sets its own


pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_writes_run_json_and_resume_adds_a_segment(tmp_path, monkeypatch):
    argv = ["train", *TINY, f"runs_dir={tmp_path}", "--name", "r", "--no-progress", "train.epochs=1"]
    monkeypatch.setattr(sys, "argv", ["recallk", *argv])
    assert main(argv) == 0
    run = tmp_path / "r"
    data = json.loads((run / "run.json").read_text())
    (first,) = data["segments"]
    assert first["argv"] == ["recallk", *argv] and first["command"].startswith("recallk train -c ")
    assert first["resume"] is False and first["outcome"] == "finished" and first["end_time"] >= first["time"]
    assert first["device"] == "cpu" and first["world_size"] == 1
    assert first["versions"]["torch"] and first["versions"]["timm"] and first["versions"]["python"]

    argv = ["train", f"runs_dir={tmp_path}", "--name", "r", "--resume", "--no-progress", "train.epochs=2"]
    monkeypatch.setattr(sys, "argv", ["recallk", *argv])
    assert main(argv) == 0
    segments = json.loads((run / "run.json").read_text())["segments"]
    assert len(segments) == 2 and segments[0] == first  # appended, the first one untouched
    assert segments[1]["resume"] is True and segments[1]["argv"] == ["recallk", *argv]
    assert segments[1]["time"] >= first["end_time"] and segments[1]["outcome"] == "finished"

    text = (run / "report.html").read_text(encoding="utf-8")  # written by the resumed run
    assert "<th>resumed</th><td>1 time(s)</td>" in text and "<td>2 (resume)</td>" in text
    assert "<td>epoch 1, step 2</td>" in text  # where the resume continued from
    assert text.count("<td>finished</td>") == 2  # the report is written after the segment's end
    assert "running when this report was written" not in text
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["kind"] == "train" and r["scope"] == "epoch"]
    assert len(epochs) == 2 and all(r["images_per_s"] > 0 for r in epochs)  # the speed the report shows
    assert " images/s <small>" in text and "not logged" not in text
    assert f"<code>{escape(segments[1]['command'])}</code>" in text


def test_a_failed_start_leaves_no_run_json(tmp_path, capsys):
    code = main(["train", *TINY, f"runs_dir={tmp_path}", "--name", "bad", "--no-progress",
                 "data.options.max_classes=2"])  # too few classes: found after the run folder is created
    assert code == 2 and not (tmp_path / "bad").exists()


def test_outcome_words():
    from recallk.cli.commands import outcome
    from recallk.engine import Stopped

    def stopped(signum):
        return Stopped(signum, Path("runs/r/checkpoints/last.pt"), 1, 3, "after epoch 1 (step 3)", "recallk train")

    assert outcome(stopped(signal.SIGTERM)) == "stopped by SIGTERM"
    assert outcome(stopped(signal.SIGUSR1)) == "stopped by SIGUSR1"
    assert outcome(stopped(signal.SIGINT)) == "interrupted (Ctrl-C)"
    assert outcome(KeyboardInterrupt()) == "interrupted (Ctrl-C)"  # a second Ctrl-C: nothing saved
    assert outcome(ValueError("bad")) == "error: ValueError: bad"
