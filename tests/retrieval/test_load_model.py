"""``recallk.load_model`` on checkpoints of runs made through the Trainer API (no CLI, no config given): the run
writes config.yaml, its checkpoints rebuild the model and test transform alone, and the loaded model gives the
trainer's embeddings. Also ``build_model``'s ``model_spec`` and the trainer's description of its loss."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import recallk
from recallk.data.transforms import transforms_for_model
from recallk.engine import save_checkpoint
from recallk.engine.checkpoint import weights_only_state
from recallk.engine.run_config import describe_loss
from recallk.losses import RecallAtKSurrogate, build_loss
from recallk.models import build_model
from recallk.retrieval import CheckpointError, load_trained_model
from recallk.run_folder import plain_config
from tests.helpers.trainer_runs import trainer_api_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    """A run of the Trainer API alone: build_model + build_dataset + RS@k + Trainer, no config passed."""
    return trainer_api_run(tmp_path_factory.mktemp("api"))


def test_the_api_run_writes_what_it_knows_to_config_yaml(api_run):
    _, run, data = api_run
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"] == {"name": "resnet10t", "embed_dim": 8, "pretrained": False, "pooling": "gem",
                               "freeze_bn": True, "in_chans": 3, "options": {}}
    assert config["loss"]["name"] == "rsk" and config["loss"]["ks"] == [1, 2]
    assert config["loss"]["tau_rank"] == 0.02 and config["loss"]["simix"] is True
    assert config["data"] == {"dataset": "folder", "root": str(data), "train_split": None, "image_size": 40,
                              "num_workers": 0, "options": {}}
    assert config["train"]["batch_size"] == 8 and config["train"]["milestones"] == [] and config["seed"] == 1
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["config"] == config


def test_load_model_gives_the_trainers_embeddings_from_a_copy_alone(api_run, tmp_path):
    trainer, run, data = api_run
    copy = tmp_path / "copy.pt"
    shutil.copy(run / "checkpoints" / "last.pt", copy)  # last.pt: the weights the trainer ends with
    model, transform = recallk.load_model(copy)
    assert not model.training and next(model.parameters()).device.type == "cpu"
    expected_tf = transforms_for_model(trainer.model, "test", dataset="folder", image_size=40)
    images = [Image.open(p).convert("RGB") for p in sorted(data.glob("class0*/*.png"))[:6]]
    x = torch.stack([transform(im) for im in images])
    assert x.shape == (6, 3, 40, 40) and x.dtype == torch.float32
    assert torch.equal(x, torch.stack([expected_tf(im) for im in images]))
    trainer.model.eval()
    with torch.no_grad():
        got, want = model(x), trainer.model(x)
    assert got.shape == (6, 8) and torch.equal(got, want)
    # embed_images on the loaded module alone uses the run's 40-px transform, not the default 224-px one
    paths = sorted(data.glob("class0*/*.png"))[:6]
    assert np.array_equal(recallk.embed_images(model, paths), want.numpy())


def test_load_models_transform_takes_greyscale_and_transparent_images_as_the_loaders_do(api_run, tmp_path):
    from recallk.data.datasets.base import load_rgb

    _, run, _ = api_run
    model, transform = recallk.load_model(run / "checkpoints" / "best.pt")
    rng = np.random.default_rng(3)
    grey = Image.fromarray(rng.integers(0, 256, (30, 22), dtype=np.uint8), mode="L")
    rgba = Image.fromarray(rng.integers(0, 256, (30, 22, 4), dtype=np.uint8), mode="RGBA")
    for name, image in (("grey.png", grey), ("rgba.png", rgba)):
        image.save(tmp_path / name)
        reopened = Image.open(tmp_path / name)
        x = transform(reopened)  # a user's own image, not converted first
        assert x.shape == (3, 40, 40)
        # the same tensor as the file decoded by the dataset loaders (transparency on white, grey to 3 channels)
        assert torch.equal(x, transform(load_rgb(tmp_path / name)))
        assert torch.equal(x, transforms_for_model(model, "test", dataset="folder", image_size=40)(
            load_rgb(tmp_path / name)))


def test_best_pt_of_an_api_run_is_weights_only_and_loads(api_run):
    _, run, _ = api_run
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert "optimizer" not in best and "rng" not in best and "criterion" not in best
    trained = load_trained_model(run / "checkpoints" / "best.pt")
    assert trained.config_source == "checkpoint" and trained.model_spec["name"] == "resnet10t"
    assert trained.embed_dim == 8


def test_build_model_records_arguments_that_build_it_again():
    torch.manual_seed(0)
    model = build_model("resnet10t", embed_dim=12, pooling="avg", freeze_bn=False, drop_rate=0.1)
    spec = model.model_spec
    assert spec == {"name": "resnet10t", "embed_dim": 12, "pretrained": False, "pooling": "avg", "freeze_bn": False,
                    "in_chans": 3, "drop_rate": 0.1}
    again = build_model(**spec)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert again.backbone.drop_rate == 0.1 and not again.freeze_bn


def test_the_loss_description_rebuilds_the_loss():
    loss = RecallAtKSurrogate(ks=(1, 4), tau_rank=0.05, tau_k=(1.0, 2.0), simix=True, max_pairs_per_class=3)
    spec = describe_loss(loss)
    again = build_loss(spec["name"], **{k: v for k, v in spec.items() if k not in ("name", "options")})
    assert again.extra_repr() == loss.extra_repr()
    assert describe_loss(torch.nn.MSELoss()) is None


def test_errors(api_run, tmp_path):
    _, run, _ = api_run
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        recallk.load_model(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not a device name"):
        recallk.load_model(run / "checkpoints" / "best.pt", device="gpu")
    # a model the Trainer got from elsewhere than build_model: nothing says how to build it
    state = weights_only_state(torch.load(run / "checkpoints" / "best.pt", weights_only=True))
    save_checkpoint({**state, "model_spec": None, "config": {**state["config"], "model": None}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"not made by recallk\.models\.build_model"):
        recallk.load_model(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="plain values"):
        plain_config({"a": object()})
