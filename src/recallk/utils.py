"""Small helpers shared by every layer: device choice, seeding and the autocast dtype of an ``amp`` setting."""

from __future__ import annotations

import random

import numpy as np
import torch

_AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
               "float16": torch.float16}
AMP_CHOICES = (None, False, True, "auto", *_AMP_DTYPES)  # the valid amp settings, see autocast_dtype


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Return a torch.device; ``"auto"`` or None picks CUDA when available, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(amp: str | bool | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` setting on ``device``, or None for full precision.

    None, False and "fp32": full precision; True, "bf16"/"bfloat16" and "fp16"/"float16": that dtype; "auto":
    bfloat16 on CUDA, full precision elsewhere. Raises ValueError for any other value.
    """
    if amp is None or amp is False:
        return None
    if amp is True:
        return torch.bfloat16
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if isinstance(amp, str) and amp.lower() in _AMP_DTYPES:
        return _AMP_DTYPES[amp.lower()]
    raise ValueError(f"amp must be one of {', '.join(map(repr, AMP_CHOICES))}, got {amp!r}")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)



def count_text(count: int, noun: str) -> str:
    """``"1 epoch"``, ``"3 epochs"``: ``count`` and ``noun`` (a regular plural in -s) in a log line."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
