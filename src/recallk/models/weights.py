"""Loading a local checkpoint (.pth/.pt/.bin via torch, .safetensors) into a timm backbone.

Accepted layouts: timm's own keys, torchvision's ResNet keys (the same names as timm's ResNet), a checkpoint
dict wrapping the weights under ``state_dict`` / ``model`` / ``model_state_dict``, and keys prefixed by
``module.`` (DataParallel/DDP). The backbone's classifier (``fc.*`` / ``head.*``, from the timm config) is
dropped, since recallk puts its own head on top. Every other key must match exactly in name and shape.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import torch
from torch import nn

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


class WeightsError(ValueError):
    """A weight file is missing, unreadable or does not fit the model (lists missing/unexpected keys)."""


HUB_CHECK_SECONDS = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")


def hub_reachable(endpoint: str, timeout: float = HUB_CHECK_SECONDS) -> bool:
    """Whether the hub at ``endpoint`` (an ``https://host[:port]`` address) accepts a TCP connection within
    ``timeout`` seconds (name lookup included). True when a proxy is configured (the proxy reaches the hub or
    not; the download says which). Raises nothing."""
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return True
    parts = urlsplit(endpoint)
    host, port = parts.hostname, parts.port or (80 if parts.scheme == "http" else 443)
    if not host:
        return True
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_unless_hub_reachable() -> Iterator[str | None]:
    """Download hub weights only when the Hugging Face hub answers: when it does not (no network, or a host
    that cannot be resolved) the block runs in the hub library's offline mode, so that weights in the local
    cache still load and missing ones fail at once instead of after a minute of retries. Yields None when online
    (or when ``HF_HUB_OFFLINE`` is set already), else why the hub counts as offline."""
    try:
        from huggingface_hub import constants
    except ImportError:  # timm then downloads by URL only (no retries)
        yield None
        return
    if constants.HF_HUB_OFFLINE or hub_reachable(constants.ENDPOINT):
        yield None
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield f"no connection to {constants.ENDPOINT} within {HUB_CHECK_SECONDS:g} s: only the local cache was read"
    finally:
        constants.HF_HUB_OFFLINE = saved


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
