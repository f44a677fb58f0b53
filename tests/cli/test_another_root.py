"""Fixes from a new-user trial of the CLI, checked where the user meets them (``recallk ...`` in-process, tiny data
on the CPU): a run's dataset options apply only to the run's own data folder (``embed`` and ``eval --checkpoint``
with another ``--root``), unreadable images are explained in the command line's words, and ``--no-progress``
silences the dataset-building bars too."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recallk.cli.main import main
from tests.helpers.image_folders import write_image_folder

TINY = ["data.image_size=32", "model.name=resnet10t", "model.pretrained=false", "model.embed_dim=16",
        "model.freeze_bn=false", "train.batch_size=16", "train.chunk_size=8", "train.device=cpu", "eval.ks=[1, 2]",
        "eval.pixel_baseline=false", "--no-progress"]


def _truncate(path: Path) -> Path:
    """Cut a PNG file to half its bytes: it opens, but its pixels cannot be decoded."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    """A one-epoch run on a flat folder of 8 classes split by data.options.test_classes=0.5 (4 test classes of 4
    images); returns (its best.pt, the flat folder)."""
    base = tmp_path_factory.mktemp("split_run")
    flat = write_image_folder(base / "flat", 8, noise=0.5, seed=2)
    args = ["train", "--name", "run", f"runs_dir={base / 'runs'}", "data.dataset=folder", f"data.root={flat}",
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


@pytest.fixture()
def bad_folder(tmp_path):
    """10 classes of 4 images, one of them truncated."""
    root = write_image_folder(tmp_path / "bad", 10, noise=0.5, seed=4)
    return root, _truncate(root / "class02" / "1.png")


def test_bad_image_advice_in_cli_words(bad_folder, tmp_path, capsys):
    root, bad = bad_folder
    code = main(["train", "--name", "bad", f"runs_dir={tmp_path / 'runs'}", "data.dataset=folder",
                 f"data.root={root}", "data.options.test_classes=0.5", "train.epochs=1", *TINY])
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("recallk train: error:")]
    assert code == 2 and len(line) == 1, err
    assert f"cannot decode image {bad}" in line[0]
    assert "data.options.skip_bad_images=true" in line[0] and "skip_bad_images=True" not in line[0]

    # embed has no skip option: the advice is to fix the file, and names no option
    good = write_image_folder(tmp_path / "good", 8, noise=0.5, seed=4)
    assert main(["train", "--name", "good", f"runs_dir={tmp_path / 'runs'}", "data.dataset=folder",
                 f"data.root={good}", "data.options.test_classes=0.5", "train.epochs=1", *TINY]) == 0
    capsys.readouterr()
    checkpoint = tmp_path / "runs" / "good" / "checkpoints" / "best.pt"
    code = main(["embed", "--checkpoint", str(checkpoint), "--root", str(root), "--out", str(tmp_path / "e.npz"),
                 "--no-progress"])
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("recallk embed: error:")]
    assert code == 2 and len(line) == 1, err
    assert f"cannot decode image {bad}" in line[0] and "Replace or delete the file" in line[0]
    assert "skip_bad_images" not in line[0] and "has no option to skip unreadable images" in line[0]


def test_python_message_keeps_python_words(bad_folder):
    from recallk.data import BadImageError, build_dataset

    root, bad = bad_folder
    dataset = build_dataset("folder", root, None)
    with pytest.raises(BadImageError, match=r"or pass skip_bad_images=True to skip unreadable images") as info:
        dataset[dataset.paths.index(str(bad))]
    assert info.value.path == str(bad)


def test_no_progress_silences_the_image_check(bad_folder, tmp_path, capsys):
    root, bad = bad_folder
    args = ["train", "--name", "quiet", f"runs_dir={tmp_path / 'runs'}", "data.dataset=folder", f"data.root={root}",
            "data.options.test_classes=0.5", "data.options.skip_bad_images=true", "train.epochs=1", *TINY]
    with pytest.warns(UserWarning, match="skipped 1 unreadable image") as caught:
        assert main(args) == 0
    assert any(str(bad) in str(w.message) for w in caught)
    err = capsys.readouterr().err
    # the splits the run builds (train, and the test split of its evaluations) check their images without a bar;
    # the report written after training builds the test split once more (recallk.report: no progress setting yet)
    assert "checking" not in err, err
