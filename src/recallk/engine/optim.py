"""Optimiser and learning-rate schedule of the authors' set-up (method.md section 4); the parameter groups of
fine-tuning (head rate, layer decay, weight-decay filter, frozen blocks) are :mod:`recallk.engine.param_groups`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from recallk.engine.param_groups import ParamGroup

OPTIMIZERS = ("adam", "adamw", "sgd")


def check_optimizer(name: str) -> None:
    """Raise ValueError unless ``name`` is one of ``OPTIMIZERS``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def build_optimizer(
    modules: Iterable[nn.Module],
    name: str = "adam",
    lr: float = 1e-4,
    weight_decay: float = 4e-4,
    lr_multipliers: Sequence[float] | None = None,
) -> torch.optim.Optimizer:
    """One optimiser with one learning rate for every trainable parameter of ``modules`` (model and criterion).

    ``name``: "adam" (L2 weight decay, as the authors' ResNet runs), "adamw" (decoupled decay, ViT runs) or
    "sgd" (momentum 0.9). Parameters shared between modules are counted once (in the first module's group).
    ``lr_multipliers`` (one per module, default all 1: the authors' single learning rate) scales the learning rate
    of each module's parameters, e.g. ``(1, 100)`` for Proxy-Anchor's proxies as in its paper.
    Raises ValueError for an unknown name, a non-positive lr or multiplier, or negative weight decay.
    """
    check_optimizer(name)
    if not lr > 0:
        raise ValueError(f"the learning rate must be positive, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    modules = list(modules)
    multipliers = [1.0] * len(modules) if lr_multipliers is None else [float(m) for m in lr_multipliers]
    if len(multipliers) != len(modules) or any(not m > 0 for m in multipliers):
        raise ValueError(f"lr_multipliers must give one positive number per module ({len(modules)}), got "
                         f"{lr_multipliers}")
    seen: set[int] = set()
    groups: dict[float, list[nn.Parameter]] = {}
    for module, multiplier in zip(modules, multipliers):
        for param in module.parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                groups.setdefault(multiplier, []).append(param)
    if not groups:
        raise ValueError("nothing to train: the model and criterion have no parameter with requires_grad=True")
    params = [{"params": group, "lr": lr * multiplier} for multiplier, group in groups.items()]
    return _optimizer(name, params, lr, weight_decay)


def optimizer_for_groups(
    groups: Sequence[ParamGroup], name: str = "adam", lr: float = 1e-4, weight_decay: float = 4e-4
) -> torch.optim.Optimizer:
    """The optimiser ``name`` over ``groups`` (:func:`recallk.engine.param_groups.parameter_groups`: each with
    its own learning rate and weight decay); ``lr`` and ``weight_decay`` are the optimiser's defaults. With one
    group of every parameter at ``lr`` and ``weight_decay`` it is the optimiser of :func:`build_optimizer`.

    Raises:
        ValueError: an unknown name, a non-positive lr, negative weight decay or no group.
    """
    check_optimizer(name)
    if not lr > 0:
        raise ValueError(f"the learning rate must be positive, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not groups:
        raise ValueError("nothing to train: no parameter group")
    return _optimizer(name, [g.as_dict() for g in groups], lr, weight_decay)


def _optimizer(name: str, params: list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=0.9)


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
