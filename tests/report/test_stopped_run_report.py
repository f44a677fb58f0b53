"""A stopped run does not look finished (issue 24, item 7): the report of a run whose last segment ended with a
stop signal or an error (``run.json``'s outcome) and that was not resumed says so first, in ``report.html`` and in
``recallk report``'s output, with where ``last.pt`` stands and the command that continues it; once resumed to the
end, neither says it.

The run is real: ``recallk train`` in a child process, stopped by SIGTERM after its epoch-0 evaluation. What the
report says is checked against what the trainer itself said when it stopped (``train.log``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recallk import provenance
from recallk.cli.main import main
from recallk.run_folder import RunFolder
from tests.helpers.image_folders import write_image_folder
from tests.helpers.runs import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
#: a tiny run on the CPU (a small ResNet on 32-pixel images), three short epochs
TINY = tiny_overrides("folder", "train.tensorboard=false", "train.epochs=3", "train.max_steps_per_epoch=2")
NOTICE = "This run did not finish: "


def _image_folder(root: Path) -> Path:
    """``root/{train,test}/<class>/<i>.png``: 8 training and 4 test classes of 8 noisy copies of a colour pattern."""
    return write_image_folder(root, {"train": range(8), "test": range(8, 12)}, per_class=8)


def _stopped_run(tmp_path: Path) -> tuple[list[str], RunFolder]:
    """A tiny ``recallk train`` stopped by SIGTERM once its epoch-0 evaluation is written; (its args, its folder)."""
    data = _image_folder(tmp_path / "data")
    runs = tmp_path / "runs"
    args = ["--name", "r", f"runs_dir={runs}", f"data.root={data}", *TINY]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    folder = RunFolder(runs / "r")
    log = tmp_path / "first-run.txt"
    with log.open("w") as out:
        run = subprocess.Popen([sys.executable, "-m", "recallk", "train", *args], env=env, stdout=out, stderr=out)
    try:
        deadline = time.time() + 240
        while not (folder.metrics.is_file() and folder.metrics.read_text().strip()):
            assert run.poll() is None, f"the run ended early: {log.read_text()[-3000:]}"
            assert time.time() < deadline, "the run wrote no metrics in time"
            time.sleep(0.05)
        os.kill(run.pid, signal.SIGTERM)
        assert run.wait(timeout=240) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    return args, folder


def _said_at_the_stop(folder: RunFolder) -> tuple[str, str]:
    """(position, continue command) of the trainer's own stop line in train.log."""
    line = next(line for line in folder.train_log.read_text().splitlines() if "stopped by SIGTERM: saved " in line)
    match = re.search(r"\((.+\(step \d+\))\); continue with: (.+)$", line)
    assert match, line
    return re.sub(r" of \d+ \(step", " (step", match.group(1)), match.group(2)  # the report knows no batch total


def test_the_report_of_a_stopped_run_says_so_first_and_a_finished_one_does_not(tmp_path, capsys):
    args, folder = _stopped_run(tmp_path)
    position, command = _said_at_the_stop(folder)
    capsys.readouterr()
    assert main(["report", str(folder.root)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(NOTICE + "stopped by SIGTERM at 20"), printed
    assert printed[0].endswith(f", checkpoints/last.pt saved {position}; continue with: {command}"), printed
    assert printed[1] == f"wrote {folder.report_html}"
    page = folder.report_html.read_text()
    assert page.index(f'<p class="note">{NOTICE}stopped by SIGTERM at ') < page.index("<h2>Run record</h2>")
    assert f"{position}; continue with: {command}</p>" in page

    # the same run failing instead (run.json's outcome, written by the real writer) says that it failed
    failed = tmp_path / "failed"
    subprocess.run(["cp", "-r", str(folder.root), str(failed)], check=True)
    provenance.end_segment(failed, "error: RuntimeError: CUDA out of memory")
    assert main(["report", str(failed)]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(NOTICE + "it failed at 20") and " with RuntimeError: CUDA out of memory, " in line, line

    # resumed to the end: finished, nothing said
    assert main(["train", "--resume", *args]) == 0
    assert NOTICE not in folder.report_html.read_text()  # the report recallk train writes at the end
    capsys.readouterr()
    assert main(["report", str(folder.root)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {folder.report_html}"]
    assert NOTICE not in folder.report_html.read_text()


@pytest.mark.parametrize("outcome", [None, "finished"])
def test_a_run_without_a_stop_outcome_gets_no_notice(tmp_path, outcome):
    """A run still running (no outcome yet) or finished: the notice function says nothing."""
    from recallk.report.record import read_run, unfinished_notice

    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "eval", "epoch": 0, "step": 0, "time": 1.0, "map@r": 0.1}\n')
    provenance.start_segment(run, resume=False)
    if outcome is not None:
        provenance.end_segment(run, outcome)
    assert unfinished_notice(read_run(run, baseline=False)) is None
