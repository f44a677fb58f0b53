"""Optimiser and schedule construction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recallk.engine import build_optimizer, build_scheduler


def test_one_learning_rate_for_model_and_criterion():
    model, criterion = nn.Linear(3, 2), nn.Linear(2, 1)
    shared = nn.Sequential(model)  # the same parameters twice must be counted once
    optimizer = build_optimizer([model, criterion, shared], "adamw", lr=0.1, weight_decay=0.01)
    assert isinstance(optimizer, torch.optim.AdamW)
    (group,) = optimizer.param_groups
    assert len(group["params"]) == 4 and group["lr"] == 0.1 and group["weight_decay"] == 0.01


def test_multistep_schedule_per_epoch():
    optimizer = build_optimizer([nn.Linear(2, 2)], "sgd", lr=1.0)
    scheduler = build_scheduler(optimizer, milestones=[2, 4], gamma=0.3)
    lrs = []
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([1.0, 0.3, 0.3, 0.09, 0.09])


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer([nn.Linear(2, 2)], "rmsprop")
    with pytest.raises(ValueError, match="nothing to train"):
        build_optimizer([nn.Linear(2, 2).requires_grad_(False)])
    with pytest.raises(ValueError, match="milestones"):
        build_scheduler(build_optimizer([nn.Linear(2, 2)]), milestones=[4, 2])


def test_loss_parameters_can_get_their_own_learning_rate():
    model, criterion = nn.Linear(3, 2), nn.Linear(2, 1)
    optimizer = build_optimizer([model, criterion], "adam", lr=0.01, lr_multipliers=(1.0, 100.0))
    first, second = optimizer.param_groups
    assert first["lr"] == pytest.approx(0.01) and second["lr"] == pytest.approx(1.0)
    assert {id(p) for p in first["params"]} == {id(p) for p in model.parameters()}
    assert {id(p) for p in second["params"]} == {id(p) for p in criterion.parameters()}
    scheduler = build_scheduler(optimizer, milestones=[1], gamma=0.5)
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.005, 0.5])
    with pytest.raises(ValueError, match="one positive number per module"):
        build_optimizer([model, criterion], lr_multipliers=(1.0,))
    with pytest.raises(ValueError, match="one positive number per module"):
        build_optimizer([model, criterion], lr_multipliers=(1.0, 0.0))
