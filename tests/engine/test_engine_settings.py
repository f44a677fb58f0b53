"""TrainSettings (one checked value for a run's settings) and the one amp map."""

from __future__ import annotations

import pytest
import torch

from recallk.engine import AMP_CHOICES, Trainer, TrainSettings
from recallk.utils import autocast_dtype
from tests.helpers.engine import NoisyImages, RandomMixLoss, make_net


def test_settings_object_and_keywords_agree(tmp_path):
    settings = TrainSettings(batch_size=8, chunk_size=3, per_class=2, epochs=1, milestones=[1], device="cpu",
                             progress=False, tensorboard=False)
    assert settings.milestones == (1,) and settings.optimizer == "adam" and settings.amp is None
    trainer = Trainer(make_net(), RandomMixLoss(), NoisyImages(), tmp_path, settings, seed=5)
    assert trainer.settings == TrainSettings(**{**vars(settings), "seed": 5})
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        TrainSettings(batch_size=8, chunk_size=0, epochs=1)
    with pytest.raises(ValueError, match="amp"):
        TrainSettings(batch_size=8, chunk_size=3, epochs=1, amp="fp8")


def test_autocast_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for amp in (None, False, "fp32"):
        assert autocast_dtype(amp, cuda) is None
    for amp in (True, "bf16", "bfloat16", "BF16"):
        assert autocast_dtype(amp, cpu) is torch.bfloat16
    for amp in ("fp16", "float16"):
        assert autocast_dtype(amp, cpu) is torch.float16
    assert autocast_dtype("auto", cuda) is torch.bfloat16 and autocast_dtype("auto", cpu) is None
    for amp in ("fp8", 1, 0):
        with pytest.raises(ValueError, match="amp must be one of"):
            autocast_dtype(amp, cpu)
    for amp in AMP_CHOICES:
        TrainSettings(batch_size=8, chunk_size=3, epochs=1, amp=amp)
