"""Unreadable images, where the user meets them (``recallk ...`` in-process, tiny data on the CPU): the error says
what to do in the command line's words (the Python error in Python's), and ``--no-progress`` silences the
dataset-building bars of the image check too."""

from __future__ import annotations

from pathlib import Path

import pytest

from recallk.cli.main import main
from tests.helpers.image_folders import write_image_folder
from tests.helpers.runs import tiny_overrides

TINY = tiny_overrides("folder", "model.pretrained=false", "model.freeze_bn=false")


def _truncate(path: Path) -> Path:
    """Cut a PNG file to half its bytes: it opens, but its pixels cannot be decoded."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture()
def bad_folder(tmp_path):
    """10 classes of 4 images, one of them truncated."""
    root = write_image_folder(tmp_path / "bad", 10, noise=0.5, seed=4)
    return root, _truncate(root / "class02" / "1.png")


def test_bad_image_advice_in_cli_words(bad_folder, tmp_path, capsys):
    root, bad = bad_folder
    code = main(["train", "--name", "bad", f"runs_dir={tmp_path / 'runs'}",
                 f"data.root={root}", "data.options.test_classes=0.5", "train.epochs=1", *TINY])
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("recallk train: error:")]
    assert code == 2 and len(line) == 1, err
    assert f"cannot decode image {bad}" in line[0]
    assert "data.options.skip_bad_images=true" in line[0] and "skip_bad_images=True" not in line[0]

    # embed has no skip option: the advice is to fix the file, and names no option
    good = write_image_folder(tmp_path / "good", 8, noise=0.5, seed=4)
    assert main(["train", "--name", "good", f"runs_dir={tmp_path / 'runs'}",
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
    args = ["train", "--name", "quiet", f"runs_dir={tmp_path / 'runs'}", f"data.root={root}",
            "data.options.test_classes=0.5", "data.options.skip_bad_images=true", "train.epochs=1", *TINY]
    with pytest.warns(UserWarning, match="skipped 1 unreadable image") as caught:
        assert main(args) == 0
    assert any(str(bad) in str(w.message) for w in caught)
    err = capsys.readouterr().err
    # the splits the run builds (train, and the test split of its evaluations) check their images without a bar;
    # the report written after training builds the test split once more (recallk.report: no progress setting yet)
    assert "checking" not in err, err
