"""Optimiser and learning-rate schedule of the authors' set-up (method.md section 4)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

OPTIMIZERS = ("adam", "adamw", "sgd")


def build_optimizer(
    modules: Iterable[nn.Module],
    name: str = "adam",
    lr: float = 1e-4,
    weight_decay: float = 4e-4,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """One optimiser with one learning rate for every trainable parameter of ``modules`` (model and criterion).

    ``name``: "adam" (L2 weight decay, as the authors' ResNet runs), "adamw" (decoupled decay, ViT runs) or
    "sgd" (with ``momentum``). Parameters shared between modules are counted once.
    Raises ValueError for an unknown name, a non-positive lr or negative weight decay.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if not lr > 0:
        raise ValueError(f"the learning rate must be positive, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    seen: set[int] = set()
    params = []
    for module in modules:
        for param in module.parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    if not params:
        raise ValueError("nothing to train: the model and criterion have no parameter with requires_grad=True")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)


def build_scheduler(
    optimizer: torch.optim.Optimizer, milestones: Sequence[int] = (), gamma: float = 0.3
) -> torch.optim.lr_scheduler.MultiStepLR:
    """MultiStepLR stepped once per epoch: the LR is multiplied by ``gamma`` after each epoch in ``milestones``.

    Raises ValueError for milestones that are not increasing positive integers or gamma outside (0, 1].
    """
    milestones = [int(m) for m in milestones]
    if any(m < 1 for m in milestones) or milestones != sorted(set(milestones)):
        raise ValueError(f"milestones must be increasing positive epoch numbers, got {milestones}")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=gamma)
