import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from recallk.cli.wiring import criterion_from_config
from recallk.config import DEFAULTS, ConfigError, load_config, parse_override

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_without_file():
    cfg = load_config()
    assert cfg == DEFAULTS
    assert cfg is not DEFAULTS and cfg["train"] is not DEFAULTS["train"]


def test_overrides_are_parsed_as_yaml(tmp_path):
    cfg = load_config(None, ["train.batch_size=512", "train.lr=2e-4", "train.milestones=[3, 5]",
                             "model.pretrained=/w.pth", "loss.tau_k=[1, 1, 2, 2, 2]", "train.amp=bf16"])
    assert cfg["train"]["batch_size"] == 512
    assert cfg["train"]["lr"] == pytest.approx(2e-4)
    assert cfg["train"]["milestones"] == [3, 5]
    assert cfg["model"]["pretrained"] == "/w.pth"
    assert cfg["loss"]["tau_k"] == [1, 1, 2, 2, 2]
    assert cfg["train"]["amp"] == "bf16"


def test_free_form_options_merge():
    cfg = load_config(None, ["data.options.max_classes=20", "data.options.fonts=[a, b]"])
    assert cfg["data"]["options"] == {"max_classes": 20, "fonts": ["a", "b"]}


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "train": {"batch_size": 64, "chunk_size": 16}}))
    cfg = load_config(path, ["train.batch_size=128"])
    assert cfg["name"] == "x"
    assert cfg["train"]["batch_size"] == 128
    assert cfg["train"]["chunk_size"] == 16
    assert cfg["train"]["per_class"] == DEFAULTS["train"]["per_class"]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.batchsize=4", "valid keys here: amp, batch_size"),
        ("trian.lr=1", "did you mean 'train'"),
        ("train.lrr=1", "did you mean 'train.lr'"),  # spelt as an override, with its section
        ("data.val_clases=2", "did you mean 'data.val_classes'"),
        ("train.batch_size=abc", "'train.batch_size' must be int"),
        ("train.batch_size=10", "divisible by train.per_class"),
        ("train.amp=fp8", "train.amp must be"),
        ("train", "key=value"),
        ("=3", "empty key"),
        ("train=3", "must be a mapping"),
        ("loss.simix=maybe", "'loss.simix' must be bool"),
    ],
)
def test_bad_overrides(override, needle):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, [override])
    assert needle in str(info.value)


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_parse_override_keeps_strings():
    assert parse_override("model.name=resnet50") == (["model", "name"], "resnet50")
    assert parse_override("data.root=") == (["data", "root"], None)


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_preset_loads(preset):
    cfg = load_config(CONFIGS / preset)
    assert cfg["train"]["batch_size"] % cfg["train"]["per_class"] == 0


def test_presets_cover_the_authors_table():
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    for ds in ("sop", "inaturalist", "vehicleid", "cars196", "cub"):
        for bb in ("resnet50", "vit_b32", "vit_b16"):
            assert f"{ds}_{bb}" in names
    assert "kanji" in names
    sop = load_config(CONFIGS / "sop_resnet50.yaml")
    assert (sop["train"]["batch_size"], sop["train"]["chunk_size"], sop["train"]["lr"]) == (4000, 200, 2e-4)
    assert sop["train"]["milestones"] == [25, 50] and sop["train"]["epochs"] == 55
    cars = load_config(CONFIGS / "cars196_vit_b16.yaml")
    assert (cars["train"]["batch_size"], cars["train"]["lr"], cars["train"]["optimizer"]) == (392, 1e-5, "adamw")


def test_loss_memory_and_backend_reach_the_loss(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\n")
    config = load_config(path, ["loss.memory=recompute", "loss.backend=torch"])
    criterion = criterion_from_config(config, np.arange(8))
    assert (criterion.memory, criterion.backend) == ("recompute", "torch")
    config = load_config(path, ["loss.memory=tiles"])
    with pytest.raises(ValueError, match="memory must be one of"):
        criterion_from_config(config, np.arange(8))
    for old, new in (("loss.similarity=matrix", "loss.memory"), ("loss.options.margin=0.1", "keys of loss")):
        with pytest.raises(ConfigError, match=re.escape(new)):  # the command line takes the current spelling only
            load_config(path, [old])


def test_every_loss_takes_its_own_arguments_as_keys_of_loss():
    """``loss: {name, <that loss's own arguments>}``: the named loss's defaults filled in, any other key refused
    with the loss, a close key and the valid ones; pml's own defaults (written here by hand) for a baseline."""
    assert load_config(None, ["loss.name=contrastive", "loss.pos_margin=0.1"])["loss"] == {
        "name": "contrastive", "pos_margin": 0.1, "neg_margin": 1}
    assert load_config(None, ["loss.name=proxy_anchor"])["loss"] == {"name": "proxy_anchor", "margin": 0.1,
                                                                     "alpha": 32}
    with pytest.raises(ConfigError, match=re.escape(
            "loss.neg_margn=1 is not an argument of loss 'contrastive' (did you mean 'loss.neg_margin'?): drop "
            "loss.neg_margn; loss 'contrastive' takes ['pos_margin', 'neg_margin']")):
        load_config(None, ["loss.name=contrastive", "loss.neg_margn=1"])
    with pytest.raises(ConfigError, match=re.escape("loss.margin=0.2 is not an argument of loss 'rsk' (an argument "
                                                    "of loss 'proxy_anchor': loss.name=proxy_anchor)")):
        load_config(None, ["loss.margin=0.2"])


def test_a_typo_in_a_files_loss_section_is_refused_not_dropped(tmp_path, capsys):
    """Only another loss's arguments that a file sets are dropped (with a note) when the loss named differs; a key
    of no loss is an error wherever it comes from."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"loss": {"name": "rsk", "simx": True}}))
    with pytest.raises(ConfigError, match=re.escape("loss.simx=true is not an argument of loss 'rsk' (did you mean "
                                                    "'loss.simix'?)")):
        load_config(path)
    path.write_text(yaml.safe_dump({"loss": {"name": "contrastive", "pos_margin": 0.1}}))
    assert load_config(path, ["loss.name=rsk"])["loss"] == DEFAULTS["loss"]
    assert "loss.pos_margin: 0.1 of" in capsys.readouterr().err


def test_old_config_files_load_through_the_converter(tmp_path):
    """Files of the older format (another loss's arguments under loss.options, RS@k's keys kept at their defaults
    for every loss, loss.similarity) load as the current format, the config.yaml of a run included."""
    from recallk.config import upgrade_config

    old = {"name": "x", "loss": {"name": "contrastive", "ks": [1, 2, 4, 8, 16], "simix": False, "backend": "auto",
                                 "memory": "auto", "options": {"pos_margin": 0.0, "neg_margin": 0.9}}}
    assert upgrade_config(old)["loss"] == {"name": "contrastive", "pos_margin": 0.0, "neg_margin": 0.9}
    assert old["loss"]["options"]  # the input is left as it was
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    assert load_config(path)["loss"] == {"name": "contrastive", "pos_margin": 0.0, "neg_margin": 0.9}
    path.write_text(yaml.safe_dump({"loss": {"name": "rsk", "ks": [1, 2], "similarity": "recompute",
                                             "options": {}}}))
    loss = load_config(path)["loss"]
    assert (loss["ks"], loss["memory"], "similarity" in loss, "options" in loss) == ([1, 2], "recompute", False,
                                                                                     False)
    current = load_config(None, ["loss.name=smooth_ap"])
    assert upgrade_config(current) == current
    # --resume of such a run: its config.yaml read twice through the converter, only the asked change differs
    from recallk.config import resume_changes

    path.write_text(yaml.safe_dump(old))
    assert resume_changes(load_config(path), load_config(path, ["train.epochs=30"])) == {"train.epochs": (10, 30)}


@pytest.mark.parametrize(("overrides", "needle"), [
    (["data.val_classes=0"], "data.val_classes=0: give a number of training classes"),
    (["data.val_classes=1.5"], "data.val_classes=1.5"),
    (["data.val_classes=true"], "data.val_classes=True"),
    (["data.val_classes=some"], "data.val_classes='some'"),
    (["data.val_seed=0.5"], "'data.val_seed' must be int"),
    (["data.dataset=folder", "data.options.test_classes=0"], "data.options.test_classes=0: give a number"),
    (["data.dataset=folder", "data.options.test_classes=2", "data.options.test_seed=x"],
     "data.options.test_seed must be an integer"),
    (["data.dataset=folder", "data.options.test_classes=2", "data.test_options.test_classes=3"],
     "data.test_options changes the folder's class split"),
    (["data.dataset=folder", "data.options.test_classes=2", "data.train_split=all"],
     "set data.train_split=train and data.test_split=test"),
])
def test_class_split_keys_are_checked_before_start(overrides, needle):
    from recallk.config import check_startable

    with pytest.raises(ConfigError, match=re.escape(needle)):
        check_startable(load_config(None, overrides))


def test_class_split_keys_accepted():
    from recallk.config import check_startable

    for overrides in (["data.val_classes=10"], ["data.val_classes=0.2", "data.val_seed=3"],
                      ["data.dataset=folder", "data.options.test_classes=0.5", "data.options.test_seed=2"]):
        check_startable(load_config(None, overrides))
    assert DEFAULTS["data"]["val_classes"] is None and DEFAULTS["data"]["val_seed"] == 0
