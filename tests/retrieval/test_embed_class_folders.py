"""`recallk embed --root` of a `<class>/<image>` folder writes the class folders' labels, and a run trained with
`test_classes` can embed its whole labelled folder (`--dataset folder --split all`) (issue 24, item 9c)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from recallk.cli.main import main
from recallk.config import dump_config, load_config
from recallk.engine.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from recallk.models import build_model

CLASSES = ("cat", "ant", "bee", "dog")  # folder names; class ids follow their sorted order


def write_images(folder: Path, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")


def class_folder(root: Path) -> Path:
    for c, name in enumerate(CLASSES):
        write_images(root / name, 3, seed=c)
    return root


def untrained_run(folder: Path, data_root: Path, *overrides: str) -> Path:
    """A run folder (config.yaml + checkpoints/best.pt) of an untrained tiny model on the folder dataset."""
    config = load_config(None, ["model.name=resnet10t", "model.embed_dim=8", "data.image_size=32",
                                "data.dataset=folder", f"data.root={data_root}", "model.pretrained=false",
                                *overrides])
    folder.mkdir(parents=True)
    dump_config(config, folder / "config.yaml")
    torch.manual_seed(0)
    net = build_model("resnet10t", embed_dim=8)
    save_checkpoint({"format": CHECKPOINT_FORMAT, "model": net.state_dict()}, folder / "checkpoints" / "best.pt")
    return folder / "checkpoints" / "best.pt"


def embed(capsys, checkpoint: Path, out: Path, *args: str) -> tuple[dict, np.lib.npyio.NpzFile]:
    assert main(["embed", "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu", "--no-progress",
                 *args]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return printed, np.load(out)


def expected_labels(paths) -> list[int]:
    names = sorted(CLASSES)
    return [names.index(Path(p).parent.name) for p in paths]


def test_embed_root_of_class_folders_writes_their_labels(tmp_path, capsys):
    root = class_folder(tmp_path / "photos")
    checkpoint = untrained_run(tmp_path / "run", root)
    printed, npz = embed(capsys, checkpoint, tmp_path / "e.npz", "--root", str(root))
    assert printed["count"] == 12 and printed["classes"] == 4
    assert npz["labels"].tolist() == expected_labels(npz["paths"])
    assert npz["classes"].tolist() == ["ant", "bee", "cat", "dog"]
    assert len(set(npz["labels"].tolist())) == 4


def test_embed_root_of_a_flat_folder_stays_unlabelled(tmp_path, capsys):
    root = tmp_path / "flat"
    write_images(root, 4, seed=9)
    write_images(root / "more", 2, seed=8)  # an image directly in root: not a <class>/<image> folder
    checkpoint = untrained_run(tmp_path / "run", class_folder(tmp_path / "data"))
    printed, npz = embed(capsys, checkpoint, tmp_path / "e.npz", "--root", str(root))
    assert printed["classes"] == 0 and npz["labels"].tolist() == [-1] * 6 and npz["classes"].tolist() == []


def test_a_test_classes_run_embeds_its_whole_labelled_folder(tmp_path, capsys):
    root = class_folder(tmp_path / "photos")
    checkpoint = untrained_run(tmp_path / "run", root, "data.options.test_classes=2", "data.train_split=train",
                               "data.test_split=test")
    _, test = embed(capsys, checkpoint, tmp_path / "test.npz", "--dataset", "folder")  # the run's test classes
    assert len(test["labels"]) == 6
    _, whole = embed(capsys, checkpoint, tmp_path / "all.npz", "--dataset", "folder", "--split", "all")
    assert len(whole["labels"]) == 12 and sorted(set(whole["labels"].tolist())) == [0, 1, 2, 3]
    assert whole["labels"].tolist() == expected_labels(whole["paths"])
    _, by_root = embed(capsys, checkpoint, tmp_path / "root.npz", "--root", str(root))  # the same items
    assert by_root["paths"].tolist() == whole["paths"].tolist()
    assert by_root["labels"].tolist() == whole["labels"].tolist()
    np.testing.assert_allclose(by_root["embeddings"], whole["embeddings"], atol=1e-6)
