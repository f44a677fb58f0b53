"""Loading a local checkpoint (.pth/.pt/.bin via torch, .safetensors) into a timm backbone.

Accepted layouts: timm's own keys, torchvision's ResNet keys (the same names as timm's ResNet), a checkpoint
dict wrapping the weights under ``state_dict`` / ``model`` / ``model_state_dict``, and keys prefixed by
``module.`` (DataParallel/DDP). The backbone's classifier (``fc.*`` / ``head.*``, from the timm config) is
dropped, since recallk puts its own head on top. Every other key must match exactly in name and shape.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


class WeightsError(ValueError):
    """A weight file is missing, unreadable or does not fit the model (lists missing/unexpected keys)."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a weight file, unwrapped from common checkpoint dicts and ``module.`` prefixes.

    Raises:
        WeightsError: the file is missing or holds no state dict.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any reader failure is a bad file for the user
        raise WeightsError(f"cannot read weight file {path}: {type(e).__name__}: {e}") from e
    for key in _WRAPPER_KEYS:
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} holds no state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Load a local weight file into a timm ``backbone`` (created with ``num_classes=0``), strictly.

    Raises:
        WeightsError: missing file, or keys that are missing, unexpected or of the wrong shape (all listed).
    """
    state = read_state_dict(path)
    classifier = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier")
    heads = [classifier] if isinstance(classifier, str) else list(classifier or [])
    expected = backbone.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not any(k == h or k.startswith(h + ".") for h in heads)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                         for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        parts = [f"weight file {path} does not fit {type(backbone).__name__}"]
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shape)):
            if keys:
                parts.append(f"{label}: {_listing(keys)}")
        parts.append("check that the file was saved from the same architecture as the model name")
        raise WeightsError("; ".join(parts))
    backbone.load_state_dict(state, strict=True)
