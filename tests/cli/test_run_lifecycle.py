"""``recallk train`` lifecycle (issue 19): cheap checks before the run folder exists, overrides anywhere, progress
lines with --no-progress, SIGTERM saves and --resume continues to the uninterrupted run's weights, with the run's
own config (a changing override is refused with a diff) and metrics.jsonl without duplicated lines; the resume
command names torchrun under torchrun, a second Ctrl-C exits 130 saying interrupted, and a pretrained weights
error advises in config words."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import recallk
from recallk.cli.main import build_parser, main, parse_args
from recallk.cli.run import resume_command
from tests.helpers.runs import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
TINY = tiny_overrides("kanji", "train.epochs=2", "train.max_steps_per_epoch=3")


# one torch thread (the subprocess: OMP_NUM_THREADS=1): 6x faster on a shared 2-core machine, and the same
# arithmetic in both processes, so that their weights can be compared bit for bit
pytestmark = pytest.mark.usefixtures("one_thread")


def test_overrides_are_accepted_anywhere():
    args = parse_args(build_parser(), ["train", "-c", "x.yaml", "a.b=1", "--no-progress", "c.d=2", "--name", "n",
                                       "e.f=3"])
    assert args.overrides == ["a.b=1", "c.d=2", "e.f=3"] and args.no_progress and args.name == "n"
    with pytest.raises(SystemExit):
        parse_args(build_parser(), ["train", "a.b=1", "--no-progress", "--bogus"])


@pytest.mark.parametrize(("override", "message"), [
    ("data.root=/no/such/folder", "data.root=/no/such/folder is not a folder"),
    ("train.best_metric=recall@3", "train.best_metric='recall@3' is not a metric this run produces"),
    ("train.best_metric=num_queries", "choose one of ['recall@1', 'recall@2', 'recall@4', 'recall@8', "
     "'positive_recall@1', 'positive_recall@2', 'positive_recall@4', 'positive_recall@8', 'map@r', 'r_precision']"),
    ("train.amp=fp16", "train.amp=fp16 cannot train on the CPU"),
    ("train.device=cuda:3", "train.device='cuda:3'"),
    ("train.device=gpu", "train.device='gpu' is not a device name"),
    ("data.train_split=validation", "data.train_split='validation' is not a split"),
    ("data.options.max_classes=2", "classes"),  # found by the sampler, after the model is built
])
def test_a_failed_start_leaves_no_run_folder(tmp_path, capsys, override, message):
    code = main(["train", *TINY, f"runs_dir={tmp_path}", "--name", "r", "--no-progress", override])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


def _keys(run: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["kind"], r.get("scope"), r.get("split"), r["epoch"], r["step"]) for r in records]


def test_sigterm_saves_and_resume_continues_exactly(tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "recallk.cli", "train", *TINY, f"runs_dir={tmp_path}",
                             "--name", "cut", "--no-progress"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # wait for the first completed step
        if (cut / "metrics.jsonl").is_file() and '"scope": "interval"' in (cut / "metrics.jsonl").read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err, err
    # one stop message (stdout and train.log), naming the run and the command that continues it
    said = [line for line in (out + err).splitlines() if "SIGTERM" in line]
    assert len(said) == 1 and f"continue with: recallk train --name cut --resume runs_dir={tmp_path}" in said[0], said
    assert "run folder" in out and "evaluation after epoch 0" in out  # progress lines without bars
    step = torch.load(cut / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert 1 <= step < 6

    saved = (cut / "config.yaml").read_bytes()
    code = main(["train", f"runs_dir={tmp_path}", "--name", "cut", "--resume", "train.lr=0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "train.lr: 0.003 -> 0.5" in err
    assert (cut / "config.yaml").read_bytes() == saved  # refused: nothing rewritten

    # resume from the run's own config.yaml (no -c, no overrides but safe ones), flags and overrides mixed
    assert main(["train", f"runs_dir={tmp_path}", "--name", "cut", "--resume", "eval.batch_size=128",
                 "--no-progress", "train.eval_every=1"]) == 0
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and "resume: eval.batch_size 512 -> 128" in out
    assert (cut / "config.yaml").read_text() == saved.decode().replace("batch_size: 512", "batch_size: 128")
    history = [json.loads(line) for line in (cut / "resumes.jsonl").read_text().splitlines()]
    assert [h["changes"] for h in history] == [{"eval.batch_size": [512, 128]}]
    assert main(["train", *TINY, f"runs_dir={tmp_path}", "--name", "full", "--no-progress"]) == 0
    capsys.readouterr()
    resumed = torch.load(cut / "checkpoints" / "last.pt", weights_only=False)["model"]
    full = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(resumed[k], full[k]) for k in full)
    assert _keys(cut) == _keys(tmp_path / "full")  # no line missing or duplicated
    log = (cut / "train.log").read_text()
    assert "stopped by SIGTERM" in log and "epoch 2/2" in log
    assert re.search(r"\(resumed (after epoch 1 \(step 3\): continuing with epoch 2|in epoch 1 after batch "
                     r"[12] of 3 \(step [12]\): continuing with batch [23])\)", log), log


def test_resume_of_a_run_that_saved_no_checkpoint_says_overwrite(tmp_path, capsys):
    """A run that failed before its first last.pt (here: only metrics and config) cannot resume, and starting it
    again without --resume is refused because the folder exists: the resume error names the way out."""
    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"kind": "eval", "epoch": 0, "step": 0}\n')
    assert main(["train", *TINY, f"runs_dir={tmp_path}", "--name", "r", "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at" in err and "--overwrite" in err and "Traceback" not in err
    assert main(["train", *TINY, f"runs_dir={tmp_path}", "--name", "new", "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "start without --resume" in err and "--overwrite" not in err


def test_a_gpu_only_loss_backend_on_the_cpu_is_refused_before_the_run_folder(tmp_path, capsys, monkeypatch):
    """loss.backend=triton on a CPU (no interpreter: the tests' conftest turns it on) fails before anything is
    built or written, not at the first step after the epoch-0 evaluation."""
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    code = main(["train", *TINY, f"runs_dir={tmp_path}", "--name", "r", "--no-progress", "loss.backend=triton"])
    err = capsys.readouterr().err
    assert code == 2 and "loss.backend=triton: backend='triton' cannot run on cpu" in err, err
    assert "use loss.backend=torch" in err and not (tmp_path / "r").exists()


def test_a_run_stopped_by_max_steps_does_not_call_the_untrained_model_trained(tmp_path, capsys):
    """train.max_steps stops inside an epoch, after the last evaluation (here: the one before training): the table
    says which evaluation its columns show, and how to evaluate the final weights (a trial read "after training
    (epoch 0)" with the untrained model's numbers)."""
    assert main(["train", *TINY, f"runs_dir={tmp_path}", "--name", "r", "--no-progress", "train.max_steps=1",
                 "eval.pixel_baseline=true"]) == 0
    out = capsys.readouterr().out
    assert "after training" not in out and "last evaluation (epoch 0, step 0)" in out
    assert f"recallk eval --checkpoint {tmp_path / 'r' / 'checkpoints' / 'last.pt'}" in out
    assert "after - raw pixels" in out  # the gain column still follows the lead column


def test_resume_command_under_torchrun(monkeypatch):
    config = {"name": "x", "runs_dir": "runs"}
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert resume_command(config) == "recallk train --name x --resume"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resume_command(config) == ("torchrun --nproc-per-node 2 -m recallk train --name x --resume (with the same "
                                      "torchrun options as before)")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resume_command({"name": "x", "runs_dir": "/r"}, "train.epochs=9").startswith(
        "torchrun --nnodes 2 --nproc-per-node 4 -m recallk train --name x --resume runs_dir=/r train.epochs=9")


def test_pretrained_advice_is_in_config_words(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(recallk.__file__).parents[1]), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    for value, advice in (("true", "set model.pretrained=/path/to/weights.pth or model.pretrained=false"),
                          (str(tmp_path / "none.pth"), "e.g. model.pretrained=/path/to/weights.pth")):
        proc = subprocess.run([sys.executable, "-m", "recallk", "train", *tiny_overrides("kanji"),
                               f"runs_dir={tmp_path}", "--name", "w", "--no-progress", f"model.pretrained={value}"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and advice in proc.stderr, proc.stderr
        assert "pretrained='path/to/weights.pth'" not in proc.stderr and "pretrained= takes" not in proc.stderr


def test_a_second_ctrl_c_exits_130_saying_interrupted(monkeypatch, capsys):
    from recallk.cli import commands
    from recallk.cli.main import main

    def aborted(args):
        raise KeyboardInterrupt  # what a second Ctrl-C raises: the run aborts without saving

    monkeypatch.setattr(commands, "run", aborted)
    assert main(["train", "--name", "x", "--no-progress"]) == 130
    assert "recallk train: interrupted" in capsys.readouterr().err
