"""Numbers in scientific notation (``1e-3``, ``1e3``: no dot, which YAML 1.1 reads as a string) are numbers in a
config file and in ``key=value`` overrides alike, at any depth; where an integer is expected a whole number is that
integer and any other number is a ConfigError naming the key (issue 24, item 3)."""

from __future__ import annotations

import pytest
import torch
import yaml

from recallk.cli.wiring import criterion_from_config
from recallk.config import ConfigError, check_startable, load_config, read_yaml
from recallk.engine import TrainSettings
from recallk.engine.optim import build_scheduler


def test_the_issue_overrides_are_numbers():
    config = load_config(None, ["train.milestones=[1e1,2e1]", "loss.tau_k=[1e0, 5e-1]", "loss.ks=[1, 2]",
                                "train.max_steps=1e3", "train.lr=1e-3", "train.weight_decay=4E-4"])
    train, loss = config["train"], config["loss"]
    assert train["milestones"] == [10, 20] and all(type(m) is int for m in train["milestones"])
    assert train["max_steps"] == 1000 and type(train["max_steps"]) is int
    assert loss["tau_k"] == [1.0, 0.5]
    assert train["lr"] == 1e-3 and train["weight_decay"] == 4e-4
    check_startable(config)
    assert criterion_from_config(config, None).tau_k == (1.0, 0.5)
    # the scheduler gets the epochs as integers (the issue: "invalid literal for int()" naming no key)
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=train["lr"])
    assert build_scheduler(optimizer, train["milestones"]).milestones == {10: 1, 20: 1}


def test_a_config_file_reads_the_same_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 3e-3\n  milestones: [1e1, 2e1]\n  max_steps: 1e3\n"
                    "loss:\n  tau_k: [1e0, 5e-1]\n  ks: [1, 2]\n  tau_rank: 1e-2\n")
    config = load_config(path)
    assert config["train"]["lr"] == 3e-3 and config["loss"]["tau_rank"] == 0.01
    assert config["train"]["milestones"] == [10, 20] and config["train"]["max_steps"] == 1000
    assert config["loss"]["tau_k"] == [1.0, 0.5]
    # what config.yaml writes reads back as the same values with any YAML reader
    assert yaml.safe_load(yaml.safe_dump(config)) == config


@pytest.mark.parametrize(("text", "value"), [
    ("1e-3", 1e-3), ("1e3", 1000.0), ("-2E+2", -200.0), ("5e-1", 0.5), (".5e1", 5.0), ("1.5e3", 1500.0),
    ("1.0e-05", 1e-5), ("0.25", 0.25), (".inf", float("inf")), ("-.inf", float("-inf")),
])
def test_floats_as_yaml_1_2_reads_them(text, value):
    assert read_yaml(text) == value and type(read_yaml(text)) is float
    assert read_yaml(f"[{text}, {{a: {text}}}]") == [value, {"a": value}]


@pytest.mark.parametrize(("text", "value"), [
    ("10", 10), ("-3", -3), ("1_000", 1000), ("0x10", 16), ("true", True), ("auto", "auto"), ("1e", "1e"),
    ("e3", "e3"), ("1.2.3", "1.2.3"), ("recall@1", "recall@1"), ("2026-01-02", yaml.safe_load("2026-01-02")),
])
def test_everything_else_reads_as_before(text, value):
    assert read_yaml(text) == value == yaml.safe_load(text)
    assert type(read_yaml(text)) is type(yaml.safe_load(text))


@pytest.mark.parametrize(("override", "key"), [
    ("train.max_steps=1e-3", "'train.max_steps' must be int"),
    ("train.max_steps=.inf", "'train.max_steps' must be int"),
    ("train.epochs=2.5e0", "'train.epochs' must be int"),
    ("train.milestones=[1e1, 2.5]", "'train.milestones' must be a list of integers"),
    ("loss.ks=[1, 1.5e0]", "'loss.ks' must be a list of integers"),
    ("loss.max_pairs_per_class=2.5", "'loss.max_pairs_per_class' must be int"),
    ("data.options.max_classes=1.5e0", "'data.options.max_classes' must be int"),
])
def test_a_number_that_is_no_integer_where_one_is_expected_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_whole_numbers_are_integers_where_integers_are_expected():
    config = load_config(None, ["train.batch_size=4e2", "train.chunk_size=1e2", "seed=2e0", "eval.ks=[1e0, 1e1]",
                                "model.embed_dim=1.28e2", "loss.max_pairs_per_class=6e0"])
    assert (config["train"]["batch_size"], config["train"]["chunk_size"], config["seed"]) == (400, 100, 2)
    assert config["eval"]["ks"] == [1, 10] and config["model"]["embed_dim"] == 128
    assert config["loss"]["max_pairs_per_class"] == 6
    values = [config["train"]["batch_size"], config["seed"], *config["eval"]["ks"], config["model"]["embed_dim"]]
    assert all(type(v) is int for v in values)
    TrainSettings(**config["train"])  # its own checks take them


def test_dataset_options_follow_the_datasets_own_annotations():
    config = load_config(None, ["data.options.max_classes=1e2", "data.test_options.max_classes=5e1"])
    assert config["data"]["options"] == {"max_classes": 100} and config["data"]["test_options"] == {"max_classes": 50}
    assert type(config["data"]["options"]["max_classes"]) is int
    # the folder's test_classes is a count or a fraction (int | float): 1e1 is the float 10.0, refused by name
    config = load_config(None, ["data.dataset=folder", "data.options.test_classes=1e1", "data.options.test_seed=3e0"])
    assert config["data"]["options"]["test_seed"] == 3 and type(config["data"]["options"]["test_seed"]) is int
    with pytest.raises(ConfigError, match=r"^data\.options\.test_classes=10\.0: give a number of classes"):
        check_startable(config)


def test_floats_stay_floats_where_floats_are_expected():
    config = load_config(None, ["train.gamma=1e0", "loss.tau_rank=1e-2", "train.lr=1e-1"])
    assert type(config["train"]["gamma"]) is float and config["train"]["gamma"] == 1.0
    assert type(config["loss"]["tau_rank"]) is float and config["train"]["lr"] == 0.1
