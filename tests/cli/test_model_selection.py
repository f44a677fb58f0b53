"""Model selection without test-set feedback: a seeded class-disjoint validation split (data.val_classes) chooses
best.pt; best.json says which split and epoch; the flat folder's train/test split; the same-images warning; a
one-class validation split is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recallk.cli.main import main
from recallk.cli.wiring import model_from_config, split_datasets_from_config
from recallk.config import load_config
from recallk.engine import Trainer, load_checkpoint
from tests.helpers.image_folders import write_image_folder
from tests.helpers.runs import tiny_overrides

TINY = tiny_overrides("folder", "model.freeze_bn=false")


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory):
    """12 class folders of 4 noisy copies of a coarse colour pattern, directly under the root (no train/test)."""
    return write_image_folder(tmp_path_factory.mktemp("flat"), 12, noise=0.9, seed=1)


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_validation_split_chooses_best(flat_folder, tmp_path, capsys):
    args = ["train", "--name", "val", f"runs_dir={tmp_path}", f"data.root={flat_folder}",
            "data.options.test_classes=4", "data.val_classes=3", "train.epochs=2", "train.lr=3e-2",
            "train.best_metric=recall@1", *TINY]
    assert main(args) == 0
    out = capsys.readouterr().out
    run = tmp_path / "val"
    evals = [r for r in _records(run) if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1, 2]
    for r in evals:  # contract 1: the test metrics under their keys, the validation metrics under val/<key>
        assert {"recall@1", "map@r", "val/recall@1", "val/map@r", "val/num_queries"} <= r.keys()
        assert r["val/num_queries"] == 12 and r["num_queries"] == 16  # 3 validation, 4 test classes of 4 images
    chosen = max(evals, key=lambda r: r["val/recall@1"])  # the first of equal values, as the trainer keeps
    best = json.loads((run / "best.json").read_text())
    assert best == {"metric": "val/recall@1", "split": "validation", "value": chosen["val/recall@1"],
                    "epoch": chosen["epoch"], "step": chosen["step"]}
    entry = load_checkpoint(run / "checkpoints" / "best.pt")["best"]
    assert (entry["metric"], entry["split"], entry["epoch"]) == ("val/recall@1", "validation", chosen["epoch"])
    log = (run / "train.log").read_text()
    assert "validation   12 images, 3 classes held out of train (data.val_classes=3, data.val_seed=0)" in log
    assert f"best.pt = epoch {chosen['epoch']} (val/recall@1" in log and "on the validation split)" in log
    assert "validation split)" in out
    last_epoch = evals[-1]["epoch"]
    assert (f"best.pt (epoch {chosen['epoch']}, chosen on validation)" in out) == (chosen["epoch"] != last_epoch)

    # best.pt holds the weights of the chosen epoch: evaluating it gives that epoch's test numbers (the folder's
    # test classes, not the whole folder)
    assert main(["eval", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["test"]
    assert result["num_queries"] == 16
    assert result["map@r"] == pytest.approx(chosen["map@r"]) and result["recall@1"] == pytest.approx(chosen["recall@1"])
    # --split validation: the held-out training classes, rebuilt from the checkpoint's config, give the val/ numbers
    assert main(["eval", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--split", "validation", "test",
                 "--no-progress"]) == 0
    both = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(both) == ["validation", "test"] and both["test"] == result
    assert both["validation"]["num_queries"] == 12
    for key in ("recall@1", "recall@2", "map@r"):
        assert both["validation"][key] == pytest.approx(chosen[f"val/{key}"])

    # the three splits are class-disjoint, and the validation split depends on data.val_seed only
    config = load_config(run / "config.yaml")
    model = model_from_config(config)
    train, val, test = split_datasets_from_config(config, model)
    train2, val2, _ = split_datasets_from_config(config, model)
    assert (len(train.classes), len(val.classes), len(test.classes)) == (5, 3, 4)
    assert set(train.classes).isdisjoint(val.classes) and set(val.classes).isdisjoint(test.classes)
    assert set(train.classes).isdisjoint(test.classes)
    assert val.classes == val2.classes and train.paths == train2.paths
    config["data"]["val_seed"] = 4
    _, val4, _ = split_datasets_from_config(config, model)
    assert set(val4.classes) <= set(train.classes) | set(val.classes) and val4.classes != val.classes
    image, label = val[0]  # the test transform: a centre crop of data.image_size, no augmentation
    assert tuple(image.shape) == (3, 32, 32) and torch.equal(image, val[0][0]) and label == 0


def test_too_few_training_classes_left_is_a_clear_error(flat_folder, tmp_path, capsys):
    args = ["train", "--name", "few", f"runs_dir={tmp_path}", f"data.root={flat_folder}",
            "data.options.test_classes=4", "data.val_classes=0.6", "train.epochs=1", *TINY]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert ("data.val_classes=0.6 holds out 5 of the 8 classes of folder/train and leaves 3 training classes with "
            "at least 4 images (per_class), but a batch of 16 images needs 4") in err
    assert not (tmp_path / "few").exists()  # a failed start leaves no run folder


def test_same_images_warns_loudly(flat_folder, tmp_path, capsys):
    args = ["train", "--name", "same", f"runs_dir={tmp_path}", f"data.root={flat_folder}",
            "data.train_split=all", "data.test_split=all", "train.epochs=1", "train.max_steps=1", *TINY]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "WARNING: training and testing on the same images" in err
    assert "data.options.test_classes=0.5" in err
    log = (tmp_path / "same" / "train.log").read_text()
    assert "WARNING: training and testing on the same images" in log
    best = json.loads((tmp_path / "same" / "best.json").read_text())
    assert best["split"] == "test" and best["metric"] == "map@r"


class _Vectors(torch.utils.data.Dataset):
    """8 classes x 4 items of 6-d vectors."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.labels = np.repeat(np.arange(8), 4)
        self.x = torch.randn(8, 6, generator=generator)[self.labels] + 0.3 * torch.randn(32, 6, generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.x[i], int(self.labels[i])


def _loss(embeddings, labels):
    same = (labels[:, None] == labels[None, :]).float() - torch.eye(len(labels))
    return -(embeddings @ embeddings.T * same).sum() / same.sum()


@pytest.mark.parametrize("with_validation", [True, False])
def test_trainer_selects_on_validation_when_the_evaluation_has_it(tmp_path, with_validation):
    """A scripted evaluation whose validation and test metrics peak at different epochs: best.pt (and best.json)
    follow val/map@r when it is there, map@r of the test split otherwise."""
    test_curve, val_curve = [0.1, 0.2, 0.6, 0.3], [0.1, 0.5, 0.2, 0.4]

    def eval_fn(model, epoch):
        metrics = {"map@r": test_curve[epoch], "recall@1": 0.0}
        if with_validation:
            metrics.update({"val/map@r": val_curve[epoch], "val/recall@1": 0.0})
        return metrics

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Flatten())
    model.forward = lambda x, inner=model.forward: F.normalize(inner(x), dim=1)  # L2-normalised embeddings
    trainer = Trainer(model, _loss, _Vectors(), tmp_path, batch_size=8, per_class=4, chunk_size=8, epochs=3,
                      device="cpu", progress=False, tensorboard=False, eval_fn=eval_fn, lr=1e-2)
    result = trainer.fit()
    best = json.loads((tmp_path / "best.json").read_text())
    steps = {r["epoch"]: r["step"] for r in _records(tmp_path) if r["kind"] == "eval"}
    if with_validation:
        assert best == {"metric": "val/map@r", "split": "validation", "value": 0.5, "epoch": 1, "step": steps[1]}
        assert result["best_val/map@r"] == 0.5
    else:
        assert best == {"metric": "map@r", "split": "test", "value": 0.6, "epoch": 2, "step": steps[2]}
        assert result["best_map@r"] == 0.6
    entry = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert entry["best"]["epoch"] == best["epoch"] and entry["best"]["split"] == best["split"]
    assert entry["epoch"] == best["epoch"]


def test_a_one_class_validation_split_is_refused(flat_folder, tmp_path, capsys):
    # 6 training classes; 0.2 of them rounds to 1 class: every neighbour would be a positive (100 at every epoch)
    args = ["train", "--name", "one", f"runs_dir={tmp_path}", f"data.root={flat_folder}",
            "data.options.test_classes=6", "data.val_classes=0.2", "train.epochs=1", *TINY, "train.tensorboard=false"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "data.val_classes=0.2 holds out 1 class of the 6 classes of folder/train" in err, err
    assert "at least 2 such classes" in err and "data.val_classes=2" in err and "Traceback" not in err
    assert not (tmp_path / "one").exists()  # a failed start leaves no run folder
