"""Weight files the tests write themselves: a network's "pretrained" start without a download."""

from __future__ import annotations

from pathlib import Path

import timm
import torch


def save_timm_weights(folder: Path, name: str = "resnet10t", num_classes: int = 5, seed: int = 0) -> Path:
    """Save a timm ``name``'s random weights (seeded by ``seed``), its ``num_classes``-way classifier included, as a
    timm checkpoint file holds them; returns ``folder / f"{name}.pth"``."""
    torch.manual_seed(seed)
    path = Path(folder) / f"{name}.pth"
    torch.save(timm.create_model(name, num_classes=num_classes).state_dict(), path)
    return path
