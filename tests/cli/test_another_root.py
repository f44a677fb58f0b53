"""A run's dataset options apply only to the run's own data folder: ``recallk embed`` and ``recallk eval
--checkpoint`` with another ``--root`` leave them out (in-process, tiny data on the CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recallk.cli.main import main
from tests.helpers.image_folders import write_image_folder
from tests.helpers.runs import tiny_overrides

TINY = tiny_overrides("folder", "model.pretrained=false", "model.freeze_bn=false")


@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    """A one-epoch run on a flat folder of 8 classes split by data.options.test_classes=0.5 (4 test classes of 4
    images); returns (its best.pt, the flat folder)."""
    base = tmp_path_factory.mktemp("split_run")
    flat = write_image_folder(base / "flat", 8, noise=0.5, seed=2)
    args = ["train", "--name", "run", f"runs_dir={base / 'runs'}", f"data.root={flat}",
            "data.options.test_classes=0.5", "train.epochs=1", *TINY]
    assert main(args) == 0
    return base / "runs" / "run" / "checkpoints" / "best.pt", flat


@pytest.fixture(scope="module")
def other_layout(tmp_path_factory):
    """Another labelled folder, laid out as train/ (4 classes) and test/ (5 classes of 4 images)."""
    return write_image_folder(tmp_path_factory.mktemp("tt"), {"train": range(4), "test": range(4, 9)}, seed=3)


def _embed_count(capsys, checkpoint, out, *extra):
    assert main(["embed", "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress", *extra]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with np.load(out) as npz:
        assert len(npz["labels"]) == printed["count"]
        return printed["count"], len(np.unique(npz["labels"]))


def test_embed_another_root_leaves_out_the_runs_options(split_run, other_layout, tmp_path, capsys):
    checkpoint, flat = split_run
    # another folder of the run's dataset kind: its own layout (test/ = 5 classes of 4), not test_classes=0.5
    count, classes = _embed_count(capsys, checkpoint, tmp_path / "tt.npz", "--dataset", "folder", "--root",
                                  str(other_layout), "--split", "test")
    assert (count, classes) == (20, 5)
    # the run's own folder, named in another spelling: the run's options still apply (4 held-out classes)
    same_root = f"{flat}/../{flat.name}/."
    count, classes = _embed_count(capsys, checkpoint, tmp_path / "own.npz", "--dataset", "folder", "--root",
                                  same_root, "--split", "test")
    assert (count, classes) == (16, 4)
    count, classes = _embed_count(capsys, checkpoint, tmp_path / "default.npz", "--dataset", "folder")
    assert (count, classes) == (16, 4)


def test_eval_another_root_leaves_out_the_runs_options(split_run, other_layout, capsys):
    checkpoint, flat = split_run
    assert main(["eval", "--checkpoint", str(checkpoint), "--root", str(other_layout), "--no-progress"]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(results) == ["test"] and results["test"]["num_queries"] == 20
    assert main(["eval", "--checkpoint", str(checkpoint), "--root", f"{flat}/.", "--no-progress"]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["test"]["num_queries"] == 16  # the run's own folder: its 4 held-out test classes


