"""Runs of the Python Trainer (no CLI) are as usable as ``recallk train`` runs (issue 19): their config.yaml records
the training set's dataset, absolute root, split and options, so that ``recallk eval --checkpoint`` evaluates the
held-out test classes of a folder split by ``test_classes``; the file is a valid CLI config; ``Trainer(config=)``
is merged over what the trainer knows; evaluating a whole folder says on stderr that trained classes inflate it."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

import recallk
from recallk.cli.evaluate import evaluate_checkpoint
from recallk.config import DEFAULTS, check_startable, load_config
from recallk.data.transforms import transforms_for_model
from recallk.engine import Trainer, TrainSettings
from recallk.engine.run_config import merge_run_config
from recallk.losses import RecallAtKSurrogate
from recallk.models import build_model
from tests.helpers.image_folders import write_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = dict(batch_size=8, chunk_size=8, per_class=2, epochs=1, lr=1e-3, device="cpu", progress=False,
                tensorboard=False, max_steps_per_epoch=1)


def _trainer(train_set, run_dir, **kwargs):
    torch.manual_seed(0)
    model = build_model("resnet10t", embed_dim=8, freeze_bn=True)
    train_set.transform = transforms_for_model(model, "train", image_size=40)
    criterion = RecallAtKSurrogate(ks=(1, 2), tau_rank=0.02, simix=True, block_size=64)  # block_size: no config key
    return Trainer(model, criterion, train_set, run_dir, TrainSettings(**SETTINGS), **kwargs)


@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    """A Trainer run on the train side of a flat folder split by ``test_classes=0.5``, the root given relative to
    the working directory then; returns (run folder, data folder)."""
    top = tmp_path_factory.mktemp("api_split")
    data = write_image_folder(top / "data", 8, cell=(13, 9))
    cwd = os.getcwd()
    os.chdir(top)
    try:
        train_set = recallk.build_dataset("folder", "data", "train", test_classes=0.5)
        _trainer(train_set, top / "run").fit()
    finally:
        os.chdir(cwd)
    return top / "run", data


def test_config_yaml_records_root_split_and_options_of_the_training_set(split_run):
    run, data = split_run
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"] == {"dataset": "folder", "root": str(data), "train_split": "train", "image_size": 40,
                              "num_workers": 0, "options": {"test_classes": 0.5, "test_seed": 0}}
    assert os.path.isabs(config["data"]["root"])
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["config"] == config


def test_eval_of_an_api_checkpoint_evaluates_the_held_out_test_classes(split_run, tmp_path, monkeypatch, capsys):
    run, data = split_run
    model, transform = recallk.load_model(run / "checkpoints" / "last.pt")
    test_set = recallk.build_dataset("folder", data, "test", transform=transform, test_classes=0.5)
    train_set = recallk.build_dataset("folder", data, "train", test_classes=0.5)
    assert not set(test_set.classes) & set(train_set.classes) and len(test_set.classes) == 4
    embeddings, labels = recallk.embed_dataset(model, test_set, batch_size=32, device="cpu", progress=False)
    expected = recallk.retrieval_metrics(embeddings, labels, (1, 2, 4, 8))
    monkeypatch.chdir(tmp_path)  # elsewhere: the recorded root is absolute
    for args in ({"dataset": "folder", "root": str(data)}, {}):  # as the issue typed it, and the checkpoint alone
        got = evaluate_checkpoint(run / "checkpoints" / "last.pt", device="cpu", progress=False, **args)
        assert list(got) == ["test"]
        assert got["test"]["num_queries"] == len(test_set) == 16  # not the 32 images of all 8 classes
        assert got["test"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert "inflate" not in capsys.readouterr().err


def test_the_api_config_yaml_is_a_valid_cli_config(split_run):
    run, data = split_run
    config = load_config(run / "config.yaml")  # before: unknown config key 'loss.block_size'
    check_startable(config)
    assert config["data"]["options"] == {"test_classes": 0.5, "test_seed": 0} and config["data"]["root"] == str(data)
    assert config["loss"]["tau_rank"] == 0.02 and config["train"]["max_steps_per_epoch"] == 1
    written = yaml.safe_load((run / "config.yaml").read_text())
    for section in ("data", "model", "loss", "train"):
        assert set(written[section]) <= set(DEFAULTS[section]), section


def test_a_whole_folder_is_evaluated_with_a_note_on_stderr(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data", 4, cell=(13, 9))
    train_set = recallk.build_dataset("folder", data, None)
    _trainer(train_set, tmp_path / "run").fit()
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["data"]["root"] == str(data) and config["data"]["options"] == {}
    load_config(tmp_path / "run" / "config.yaml")
    capsys.readouterr()
    got = evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", device="cpu", progress=False)
    assert list(got) == ["all"] and got["all"]["num_queries"] == 16
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "leave-one-out" in err and "inflate" in err and "test_classes" in err


def test_config_given_to_the_trainer_is_merged_over_what_it_knows(tmp_path):
    data = write_image_folder(tmp_path / "data", 4, cell=(13, 9))
    train_set = recallk.build_dataset("folder", data, None)
    given = {"name": "mine", "data": {"image_size": 48}, "eval": {"ks": [1, 2]}, "train": {"epochs": 7}}
    config = _trainer(train_set, tmp_path / "run", config=given).run_config
    assert config["name"] == "mine" and config["eval"] == {"ks": [1, 2]}
    assert config["data"]["image_size"] == 48 and config["train"]["epochs"] == 7  # the given values win
    assert config["data"]["dataset"] == "folder" and config["data"]["root"] == str(data)  # the derived ones stay
    assert config["model"]["name"] == "resnet10t" and config["loss"]["tau_rank"] == 0.02
    assert config["train"]["batch_size"] == 8 and config["seed"] == 1
    # a section naming another loss replaces the derived one whole
    other = merge_run_config(config, {"loss": {"name": "contrastive", "pos_margin": 0.0}})
    assert other["loss"] == {"name": "contrastive", "pos_margin": 0.0}
    # the CLI's whole config comes back as given, in its order
    cli = load_config(None, [f"data.root={data}", "data.dataset=folder", "data.train_split=all"])
    assert merge_run_config(config, cli) == cli and list(merge_run_config(config, cli)) == list(cli)


def test_a_validation_split_made_in_python_is_recorded_and_reproduced_by_the_cli(tmp_path, capsys):
    """``recallk.data.validation_split`` (the CLI's ``data.val_classes``) in a Trainer API run: config.yaml names
    the dataset, split, options and ``val_classes``/``val_seed``; ``recallk eval --checkpoint`` evaluates the
    folder's test classes; the CLI's wiring rebuilds the same training items from the file."""
    from recallk.cli.wiring import split_datasets_from_config

    data = write_image_folder(tmp_path / "data", 12, cell=(13, 9))
    base = recallk.build_dataset("folder", data, "train", transform=None, test_classes=0.5)
    train_set, val_set = recallk.data.validation_split(base, 2, seed=3)
    assert not set(train_set.classes) & set(val_set.classes) and len(val_set.classes) == 2
    _trainer(train_set, tmp_path / "run").fit()

    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["data"] == {"dataset": "folder", "root": str(data), "train_split": "train", "image_size": 40,
                              "num_workers": 0, "options": {"test_classes": 0.5, "test_seed": 0},
                              "val_classes": 2, "val_seed": 3}
    resolved = load_config(tmp_path / "run" / "config.yaml")
    check_startable(resolved)
    model = build_model("resnet10t", embed_dim=8)
    cli_train, cli_val, cli_test = split_datasets_from_config(resolved, model)
    assert cli_train.paths == train_set.paths and cli_val.paths == val_set.paths
    assert len(cli_test.classes) == 6 and not set(cli_test.classes) & set(base.classes)

    got = evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", device="cpu", progress=False)
    assert list(got) == ["test"] and got["test"]["num_queries"] == 24  # the 6 test classes x 4 images
    got = evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", splits=["validation"], device="cpu",
                              progress=False)
    assert list(got) == ["validation"] and got["validation"]["num_queries"] == 8  # 2 held-out classes x 4


def test_validation_split_of_a_run_without_one_is_refused(split_run):
    run, _ = split_run
    with pytest.raises(ValueError, match=r"held out no validation classes \(data.val_classes\)"):
        evaluate_checkpoint(run / "checkpoints" / "last.pt", splits=["validation"], device="cpu", progress=False)
