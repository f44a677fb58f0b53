"""Settings that cannot train are refused before any work starts, with the fix in the message (issue 13,
section 6): ``per_class`` below what the loss needs, ``batch_size`` not a multiple of ``per_class``, too few
classes with ``per_class`` items; classes smaller than ``per_class`` are counted in a one-time warning."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from recallk.config import ConfigError, load_config
from recallk.data import ClassBalancedBatchSampler
from recallk.engine import Trainer, TrainSettings, freeze_batchnorm
from recallk.losses import RecallAtKSurrogate, build_loss, loss_min_per_class
from tests.helpers.engine import NoisyImages, make_net


def _trainer(tmp_path, criterion, evaluated, **overrides):
    settings = dict(batch_size=8, chunk_size=4, per_class=2, epochs=1, device="cpu", progress=False,
                    tensorboard=False, eval_fn=lambda model, epoch: evaluated.append(epoch) or {"map@r": 0.0})
    settings.update(overrides)
    return Trainer(freeze_batchnorm(make_net()), criterion, NoisyImages(), tmp_path, **settings)


def test_per_class_1_is_refused_before_the_epoch_0_evaluation(tmp_path):
    evaluated: list[int] = []
    with pytest.raises(ValueError, match=r"per_class=1 .*at least 2 items.*per_class=4"):
        _trainer(tmp_path, RecallAtKSurrogate(), evaluated, per_class=1).fit()
    assert evaluated == []  # refused in the constructor: nothing was evaluated or written
    assert not (tmp_path / "metrics.jsonl").exists()
    for name in ("contrastive", "multi_similarity", "smooth_ap"):
        with pytest.raises(ValueError, match="per_class=1"):
            _trainer(tmp_path, build_loss(name), evaluated, per_class=1)


def test_proxy_losses_and_plain_callables_may_use_one_item_per_class(tmp_path):
    assert loss_min_per_class("proxy_anchor") == 1 and loss_min_per_class("rsk") == 2
    proxy = build_loss("proxy_anchor", num_classes=6, embedding_size=6)
    _trainer(tmp_path, proxy.double(), [], batch_size=6, per_class=1)
    _trainer(tmp_path, lambda e, y: e.sum(), [], batch_size=6, per_class=1)  # no min_per_class: the user's business


def test_batch_size_not_a_multiple_of_per_class_is_refused_by_the_settings():
    with pytest.raises(ValueError, match=r"batch_size 10 is not divisible by per_class 4.*batch_size=8"):
        TrainSettings(batch_size=10, chunk_size=4, per_class=4, epochs=1)
    with pytest.raises(ValueError, match="per_class must be a positive integer"):
        TrainSettings(batch_size=8, chunk_size=4, per_class=0, epochs=1)


def test_too_few_full_classes_is_refused_before_training(tmp_path):
    evaluated: list[int] = []
    with pytest.raises(ValueError, match=r"needs 8 classes .*lower batch_size to at most 12"):
        _trainer(tmp_path, RecallAtKSurrogate(), evaluated, batch_size=16, per_class=2)  # 6 classes only
    assert evaluated == []


def test_config_refuses_per_class_below_the_loss_minimum():
    with pytest.raises(ConfigError, match=r"train.per_class=1 .*'rsk'.*train.per_class=4"):
        load_config(None, ["train.per_class=1", "train.batch_size=8"])
    with pytest.raises(ConfigError, match=r"train.batch_size \(10\) must be divisible by train.per_class"):
        load_config(None, ["train.per_class=4", "train.batch_size=10"])
    load_config(None, ["train.per_class=1", "train.batch_size=8", "loss.name=proxy_anchor"])


def test_sampler_warns_once_with_the_count_of_small_classes():
    labels = np.array([0] * 4 + [1] * 4 + [2] * 4 + [3] * 1 + [4] * 3)
    with pytest.warns(UserWarning, match=r"2 of the 5 classes have fewer than per_class=4 items .*4 items unused"):
        sampler = ClassBalancedBatchSampler(labels, batch_size=8, per_class=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # iterating epochs does not warn again
        for _ in range(2):
            list(sampler)
        ClassBalancedBatchSampler(labels[:12], batch_size=8, per_class=4)  # every class is full: no warning
