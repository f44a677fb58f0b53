"""A learning rate that is infinite, NaN, zero or negative is refused before anything is built (issue 24, item 3):
``train.lr=.inf`` used to pass every check, evaluate epoch 0, write best.pt and then stop with NaN embeddings."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from recallk.cli.main import main
from recallk.config import ConfigError, check_startable, load_config

BAD = ["train.lr=.inf", "train.lr=.nan", "train.lr=-.inf", "train.lr=0", "train.lr=-1e-3", "train.lr=.NaN"]


@pytest.mark.parametrize("override", BAD)
def test_refused_by_the_start_checks(override):
    with pytest.raises(ConfigError, match=r"^train\.lr="):
        check_startable(load_config(None, [override]))


@pytest.mark.parametrize(("override", "words"), [("train.lr=0", "would never change the weights"),
                                                 ("train.lr=-1e-3", "would climb the loss instead of lowering it")])
def test_the_message_says_what_a_zero_or_negative_rate_does(override, words):
    """A negative rate does change the weights (gradient ascent): the message said it never would."""
    with pytest.raises(ConfigError, match=words):
        check_startable(load_config(None, [override]))


def _image_folder(root):
    """4 classes of 4 random 32-pixel images (``<class>/<image>``)."""
    rng = np.random.default_rng(0)
    for c in range(4):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


@pytest.mark.parametrize("override", ["train.lr=.inf", "train.lr=.nan", "train.lr=0", "train.lr=-1e-3"])
def test_recallk_train_stops_naming_the_key_and_makes_no_run_folder(override, tmp_path, capsys):
    data = _image_folder(tmp_path / "data")
    runs = tmp_path / "runs"
    code = main(["train", "--name", "lr", f"runs_dir={runs}", "--no-progress", "data.dataset=folder",
                 f"data.root={data}", "data.options.test_classes=0.5", "data.image_size=32", "model.name=resnet10t",
                 "model.embed_dim=8", "model.pretrained=false", "train.batch_size=8", "train.chunk_size=8",
                 "train.per_class=2", "train.epochs=1", "train.device=cpu", "eval.ks=[1]",
                 "eval.pixel_baseline=false", "train.tensorboard=false", override])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("recallk train: error:")]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("recallk train: error: train.lr=") and "positive learning rate" in lines[0]
    assert not runs.exists()
