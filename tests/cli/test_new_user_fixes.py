"""What a new user met with ``recallk train`` on a flat folder (issue 19): a one-class validation split is refused,
``data.root`` is stored absolute (eval from another directory; resume with the same relative root), ``--resume``
of a finished run says so and records nothing, the start block names the loss, train.log ends with the final
table, ``python -m recallk.cli`` runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recallk.cli.main import main
from tests.helpers.image_folders import write_image_folder

REPO = Path(__file__).resolve().parents[2]
TINY = ["data.image_size=32", "model.name=resnet10t", "model.embed_dim=16", "model.freeze_bn=false",
        "train.batch_size=16", "train.chunk_size=8", "train.device=cpu", "eval.ks=[1, 2]", "--no-progress",
        "train.tensorboard=false"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory):
    """12 class folders of 4 noisy copies of a coarse colour pattern, directly under the root (no train/test)."""
    return write_image_folder(tmp_path_factory.mktemp("flat") / "photos", 12, noise=0.9, seed=1)


def test_a_one_class_validation_split_is_refused(flat_folder, tmp_path, capsys):
    # 6 training classes; 0.2 of them rounds to 1 class: every neighbour would be a positive (100 at every epoch)
    args = ["train", "--name", "one", f"runs_dir={tmp_path}", "data.dataset=folder", f"data.root={flat_folder}",
            "data.options.test_classes=6", "data.val_classes=0.2", "train.epochs=1", *TINY]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "data.val_classes=0.2 holds out 1 class of the 6 classes of folder/train" in err, err
    assert "at least 2 such classes" in err and "data.val_classes=2" in err and "Traceback" not in err
    assert not (tmp_path / "one").exists()  # a failed start leaves no run folder


def _segments(run: Path) -> list[dict]:
    return json.loads((run / "run.json").read_text())["segments"]


def test_relative_root_resume_and_eval_anywhere(flat_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(flat_folder.parent)
    runs = tmp_path / "runs"
    common = [f"runs_dir={runs}", "data.dataset=folder", "data.root=photos", "data.options.test_classes=4", *TINY]
    assert main(["train", "--name", "rel", *common, "train.epochs=1", "train.max_steps_per_epoch=1"]) == 0
    out = capsys.readouterr().out
    run = runs / "rel"
    absolute = os.path.abspath(flat_folder)
    assert f"root: {absolute}" in (run / "config.yaml").read_text()
    for name in ("best.pt", "last.pt"):
        assert torch.load(run / "checkpoints" / name, weights_only=False)["config"]["data"]["root"] == absolute
    log = (run / "train.log").read_text()
    assert "loss         rsk (ks [1, 2, 4, 8, 16], SiMix off)" in log and "loss         rsk" in out
    assert "after training (epoch 1)" in out and "after training (epoch 1)" in log  # the final table, in both

    # --resume of a finished run (the same relative root): says so, trains nothing, records no segment
    segments, saved = _segments(run), (run / "config.yaml").read_bytes()
    assert main(["train", "--name", "rel", "--resume", *common, "train.epochs=1", "train.max_steps_per_epoch=1"]) == 0
    out = capsys.readouterr().out
    assert ("run rel already finished 1/1 epochs: nothing to train; raise train.epochs to continue") in out, out
    assert _segments(run) == segments and not (run / "resumes.jsonl").exists()
    assert (run / "config.yaml").read_bytes() == saved

    # a checkpoint evaluated from another directory finds its data
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["test"]["num_queries"] == 16

    # a checkpoint whose data root is not here: the error says what to pass, in plain words
    state = torch.load(run / "checkpoints" / "best.pt", weights_only=False)
    state["config"]["data"]["root"] = "photos2"
    torch.save(state, tmp_path / "moved.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "moved.pt"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pass --root with the data folder of dataset 'folder' on this machine" in err and "folder folder" not in err

    # raising train.epochs continues, with an unambiguous resume line
    monkeypatch.chdir(flat_folder.parent)
    assert main(["train", "--name", "rel", "--resume", *common, "train.epochs=2", "train.max_steps_per_epoch=1"]) == 0
    out = capsys.readouterr().out
    assert "(resumed after epoch 1 (step 1): continuing with epoch 2)" in out and "epoch 2/2" in out
    assert len(_segments(run)) == len(segments) + 1


def test_python_m_recallk_cli_runs():
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-m", "recallk.cli", "--version"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("recallk "), done.stderr


def test_a_second_ctrl_c_exits_130_saying_interrupted(monkeypatch, capsys):
    from recallk.cli import commands
    from recallk.cli.main import main

    def aborted(args):
        raise KeyboardInterrupt  # what a second Ctrl-C raises: the run aborts without saving

    monkeypatch.setattr(commands, "run", aborted)
    assert main(["train", "--name", "x", "--no-progress"]) == 130
    assert "recallk train: interrupted" in capsys.readouterr().err
