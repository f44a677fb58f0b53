"""``recallk eval --checkpoint`` on a checkpoint copied anywhere, alone (issue 19, "Evaluate anywhere"): a tiny run
trained with the CLI, its best.pt copied out, the run folder deleted, the data moved; the copy gives the metrics of
the evaluation in place. Also: what every checkpoint carries, best.pt weights-only, group-readable files, and an
older checkpoint (no config inside) still evaluated through its run folder's config.yaml. A run on a flat folder
given by a relative root stores ``data.root`` absolute: its checkpoint evaluates from another directory, --resume
with the same relative root continues it (of a finished run: says so and records nothing), and a checkpoint whose
data is not here says to pass --root."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import yaml

import recallk
from recallk.cli.main import main
from tests.helpers.image_folders import write_image_folder
from tests.helpers.runs import tiny_overrides

TINY = tiny_overrides("folder", "train.epochs=1", "train.lr=1e-3", "train.tensorboard=false")
# a flat folder split by the run (BatchNorm training, the default lr; each run sets its epochs)
TINY_FLAT = tiny_overrides("folder", "model.freeze_bn=false", "train.tensorboard=false")


# one torch thread: faster on the shared 2-core machine, and the same arithmetic in every evaluation
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run folder, data folder) of a one-epoch CLI run."""
    top = tmp_path_factory.mktemp("anywhere")
    # train/ (8 classes) and test/ (4 classes) of 4 noisy copies of a coarse colour pattern per class
    data = write_image_folder(top / "data", {"train": range(8), "test": range(8, 12)})
    torch.set_num_threads(1)
    assert main(["train", "--name", "tiny", f"runs_dir={top / 'runs'}", f"data.root={data}", *TINY]) == 0
    return top / "runs" / "tiny", data


def evaluate(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["eval", "--no-progress", "--device", "cpu", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_checkpoints_carry_config_model_spec_and_version(trained):
    run, _ = trained
    config = yaml.safe_load((run / "config.yaml").read_text())
    for name in ("best.pt", "last.pt"):
        state = torch.load(run / "checkpoints" / name, weights_only=True)
        assert state["config"] == config, name
        assert state["recallk_version"] == recallk.__version__
        spec = state["model_spec"]
        assert (spec["name"], spec["embed_dim"], spec["pretrained"], spec["pooling"]) == ("resnet10t", 16, False,
                                                                                         "gem")
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    # best.pt is weights-only: no optimizer, scheduler, scaler, random state or criterion
    assert set(best) == {"format", "model", "config", "model_spec", "recallk_version", "best", "epoch", "step"}
    assert {"optimizer", "scheduler", "rng"} <= set(last)
    assert best["best"]["epoch"] == best["epoch"] and best["best"]["metric"] == "map@r"


def test_checkpoints_are_group_readable_like_the_other_files(trained):
    run, _ = trained
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    assert stat.S_IMODE((run / "config.yaml").stat().st_mode) == expected  # how the run's other files are made
    for name in ("best.pt", "last.pt"):
        assert stat.S_IMODE((run / "checkpoints" / name).stat().st_mode) == expected, name
    if not umask & stat.S_IRGRP:
        assert (run / "checkpoints" / "best.pt").stat().st_mode & stat.S_IRGRP


def test_eval_of_a_checkpoint_copied_anywhere_alone(trained, tmp_path, capsys):
    run, data = trained
    in_place = evaluate(capsys, "--checkpoint", str(run / "checkpoints" / "best.pt"))
    # the run folder gone, the data moved: only the copied file and the data's new folder are left
    copy = tmp_path / "elsewhere" / "copy.pt"
    copy.parent.mkdir()
    shutil.copy(run / "checkpoints" / "best.pt", copy)
    saved_run = tmp_path / "saved_run"
    shutil.copytree(run, saved_run)  # the module's other tests still use the run: put it back afterwards
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    shutil.rmtree(run)
    hidden = data.with_name("data.hidden")
    data.rename(hidden)
    try:
        capsys.readouterr()
        assert main(["eval", "--no-progress", "--checkpoint", str(copy)]) == 2
        err = capsys.readouterr().err
        assert f"data root {data}" in err and "pass --root" in err and "Traceback" not in err
        anywhere = evaluate(capsys, "--checkpoint", str(copy), "--root", str(moved))
    finally:
        hidden.rename(data)
        shutil.copytree(saved_run, run)
    assert anywhere.keys() == in_place.keys() == {"test"}
    assert anywhere["test"] == pytest.approx(in_place["test"], rel=1e-6, abs=1e-9)
    assert {"recall@1", "recall@2", "map@r"} <= anywhere["test"].keys()


def test_an_older_checkpoint_still_uses_its_run_folders_config(trained, capsys):
    run, _ = trained
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    old = run / "checkpoints" / "old.pt"  # as written before checkpoints carried their config
    torch.save({k: v for k, v in state.items() if k not in ("config", "model_spec", "recallk_version")}, old)
    try:
        before = evaluate(capsys, "--checkpoint", str(last))
        assert evaluate(capsys, "--checkpoint", str(old)) == before
        alone = old.parent.parent.parent / "old_alone.pt"
        shutil.copy(old, alone)
        capsys.readouterr()
        assert main(["eval", "--no-progress", "--checkpoint", str(alone)]) == 2
        assert "carries no config of its own" in capsys.readouterr().err
    finally:
        old.unlink()
        alone.unlink(missing_ok=True)


def test_resume_never_reads_best_pt(trained, tmp_path):
    from recallk.engine import Trainer

    run, data = trained
    model, transform = recallk.load_model(run / "checkpoints" / "best.pt")
    dataset = recallk.build_dataset("folder", data, "train", transform=transform)
    trainer = Trainer(model, recallk.build_loss("rsk", ks=(1, 2)), dataset, tmp_path, batch_size=8, chunk_size=8,
                      per_class=2, epochs=1, device="cpu", progress=False, tensorboard=False)
    with pytest.raises(ValueError, match=r"weights-only checkpoint.*resume from .*last\.pt"):
        trainer.fit(resume=run / "checkpoints" / "best.pt")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """``photos/``: 12 class folders of 4 noisy copies of a coarse colour pattern, directly under the root (no
    train/test)."""
    return write_image_folder(tmp_path_factory.mktemp("flat") / "photos", 12, noise=0.9, seed=1)


def _segments(run: Path) -> list[dict]:
    return json.loads((run / "run.json").read_text())["segments"]


def test_relative_root_resume_and_eval_anywhere(photos, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(photos.parent)
    runs = tmp_path / "runs"
    common = [f"runs_dir={runs}", "data.root=photos", "data.options.test_classes=4", *TINY_FLAT]
    assert main(["train", "--name", "rel", *common, "train.epochs=1", "train.max_steps_per_epoch=1"]) == 0
    out = capsys.readouterr().out
    run = runs / "rel"
    absolute = os.path.abspath(photos)
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
    monkeypatch.chdir(photos.parent)
    assert main(["train", "--name", "rel", "--resume", *common, "train.epochs=2", "train.max_steps_per_epoch=1"]) == 0
    out = capsys.readouterr().out
    assert "(resumed after epoch 1 (step 1): continuing with epoch 2)" in out and "epoch 2/2" in out
    assert len(_segments(run)) == len(segments) + 1
