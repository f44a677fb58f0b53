"""A trained model as a retrieval system uses it: the network, its test-time transform and its identity.

A trainer checkpoint (``runs/<name>/checkpoints/<file>.pt``) holds the weights; the run folder's ``config.yaml``
says which network they belong to and which test transform the run evaluated with. :func:`load_trained_model`
rebuilds both, so the transform travels with the checkpoint. The **model identity** (``model_id``) is a SHA-256
over the model section of the config, the preprocessing and the weights themselves: embedding files, indexes
and exports carry it, and a query model whose identity differs from the index's is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torchvision import transforms as T

from recallk import __version__
from recallk.data.transforms import transforms_for_model
from recallk.engine.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from recallk.models import build_model
from recallk.retrieval.files import file_sha256


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for retrieval: unreadable, of another format, or of another model."""


@dataclass
class TrainedModel:
    """An embedding model ready for retrieval (eval mode, on the CPU until moved).

    Attributes:
        model: ``images (N, 3, H, W) float32 -> (N, d)`` L2-normalised embeddings.
        transform: the run's test-time transform, PIL image -> float32 tensor (3, H, W).
        preprocessing: that transform as data (:func:`preprocessing_spec`).
        config: the run's resolved config (``config.yaml``) as a dict.
        model_id: hex SHA-256 identity of model config + preprocessing + weights (module docstring).
        checkpoint: path of the checkpoint file; checkpoint_sha256: hex SHA-256 of its bytes.
        embed_dim: d.
    """

    model: torch.nn.Module
    transform: T.Compose
    preprocessing: dict[str, Any]
    config: dict[str, Any]
    model_id: str
    checkpoint: str
    checkpoint_sha256: str
    embed_dim: int = field(init=False)

    def __post_init__(self) -> None:
        self.embed_dim = int(getattr(self.model, "embed_dim", 0) or 0)

    def identity(self) -> dict[str, Any]:
        """What embedding files, indexes and exports record about the model (JSON-ready)."""
        return {
            "model_id": self.model_id,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "model": self.config.get("model"),
            "embed_dim": self.embed_dim,
            "preprocessing": self.preprocessing,
            "recallk_version": __version__,
        }


def _model_arguments(model_section: dict[str, Any]) -> dict[str, Any]:
    """``build_model`` keyword arguments of a config's model section (as ``recallk.config.section_arguments``:
    keys but ``name`` and ``options``, lists as tuples, then ``options``); weights come from the checkpoint, so
    ``pretrained`` is always False (nothing is downloaded)."""
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in model_section.items() if k not in ("name", "options")}
    return {**args, **(model_section.get("options") or {}), "pretrained": False}


def _interp(mode: Any) -> str:
    return mode.value if isinstance(mode, T.InterpolationMode) else str(mode)


def preprocessing_spec(transform: T.Compose) -> dict[str, Any]:
    """A test transform as data, for users of exported models (the order is resize, crop, scale, normalise).

    Returns:
        ``{"color": "RGB", "resize": int (shorter side) or [h, w] (exact), "resize_mode": "shorter_side" |
        "exact", "interpolation": "bilinear" | ..., "antialias": bool, "crop": [h, w] (centre) or None,
        "scale": 1/255, "mean": [3 floats], "std": [3 floats], "input_size": [3, H, W] or None, "layout": "NCHW",
        "dtype": "float32", "resampler": "PIL"}``. A network input is ``((pixels / 255) - mean) / std``.

    Raises:
        ValueError: a step other than Resize, CenterCrop, ToTensor and Normalize (it cannot be stated as data).
    """
    spec: dict[str, Any] = {"color": "RGB", "resize": None, "resize_mode": None, "interpolation": None,
                            "antialias": None, "crop": None, "scale": 1 / 255, "mean": None, "std": None}
    for step in transform.transforms:
        if isinstance(step, T.Resize):
            size = step.size
            exact = not isinstance(size, int) and len(size) == 2
            spec["resize"] = [int(s) for s in size] if exact else int(size if isinstance(size, int) else size[0])
            spec["resize_mode"] = "exact" if exact else "shorter_side"
            spec["interpolation"], spec["antialias"] = _interp(step.interpolation), bool(step.antialias)
        elif isinstance(step, T.CenterCrop):
            spec["crop"] = [int(s) for s in step.size]
        elif isinstance(step, T.Normalize):
            spec["mean"], spec["std"] = [float(v) for v in step.mean], [float(v) for v in step.std]
        elif not isinstance(step, T.ToTensor):
            raise ValueError(
                f"the test transform has a step {step!r} that cannot be stated as data; exported models support "
                "Resize, CenterCrop, ToTensor and Normalize"
            )
    size = spec["crop"] or (spec["resize"] if spec["resize_mode"] == "exact" else None)
    spec.update({"input_size": [3, *size] if size else None, "layout": "NCHW", "dtype": "float32",
                 "resampler": "PIL (torchvision on PIL images)"})
    return spec


def weights_digest(model: torch.nn.Module) -> bytes:
    """SHA-256 digest of a model's state dict: every entry's name, dtype, shape and raw bytes, in key order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()


def model_identity(model: torch.nn.Module, model_section: dict[str, Any], preprocessing: dict[str, Any]) -> str:
    """Hex SHA-256 over the model config section, the preprocessing (both as sorted JSON) and the weights."""
    digest = hashlib.sha256(json.dumps({"model": model_section, "preprocessing": preprocessing},
                                       sort_keys=True, default=str).encode())
    digest.update(weights_digest(model))
    return digest.hexdigest()


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: a checkpoint is used with the config.yaml of its run folder "
            "(runs/<name>/checkpoints/<file>.pt next to runs/<name>/config.yaml); pass config= to name another"
        )
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or "name" not in config["model"]:
        raise CheckpointError(f"{path} has no model section with a name: is it a recallk run's config.yaml?")
    return config


def _model_state(state: Any, path: Path) -> dict[str, torch.Tensor]:
    """The model weights of a trainer checkpoint (current format), of ``{"model": state dict}`` or of a bare state
    dict."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a recallk checkpoint (a dict)")
    if "model" in state:
        fmt = state.get("format")  # older formats are converted by load_checkpoint; None: a hand-saved {"model": ...}
        if fmt is not None and fmt != CHECKPOINT_FORMAT:
            newer = isinstance(fmt, int) and fmt > CHECKPOINT_FORMAT
            raise CheckpointError(
                f"{path} is a checkpoint of format {fmt!r}, this recallk ({__version__}) reads format "
                f"{CHECKPOINT_FORMAT}: " + ("upgrade recallk to read it" if newer else
                                             "re-save it with the recallk version that wrote it, or retrain")
            )
        return state["model"]
    if state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return state  # a bare model state dict (torch.save(model.state_dict()))
    raise CheckpointError(f"{path} is not a recallk checkpoint: no 'model' entry (keys: {sorted(state)[:8]})")


def load_trained_model(
    checkpoint: str | os.PathLike, config: str | os.PathLike | None = None
) -> TrainedModel:
    """Rebuild a trained embedding model, its test transform and its identity from a checkpoint.

    Args:
        checkpoint: a trainer checkpoint (``runs/<name>/checkpoints/best.pt``) or a bare model state dict.
        config: the run's ``config.yaml``; default: ``<checkpoint folder>/../config.yaml``.

    Returns:
        A :class:`TrainedModel` in eval mode on the CPU.

    Raises:
        CheckpointError (a ValueError): missing or unreadable file or config, another checkpoint format, or
            weights that do not fit the config's model (another model's checkpoint).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    config_path = Path(config) if config is not None else path.resolve().parent.parent / "config.yaml"
    cfg = _read_config(config_path)
    try:
        state = load_checkpoint(path, map_location="cpu")
    except Exception as e:  # corrupt or foreign file: torch raises many kinds
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}: {e})") from e
    weights = _model_state(state, path)
    model = build_model(cfg["model"]["name"], **_model_arguments(cfg["model"]))
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"the weights in {path} do not fit the model of {config_path} ({cfg['model']['name']}, "
            f"embed_dim={cfg['model'].get('embed_dim')}): the checkpoint is of another model. Use the checkpoint "
            f"with its own run folder's config.yaml. Details: {str(e)[:600]}"
        ) from e
    model.eval()
    data = cfg.get("data") or {}
    transform = transforms_for_model(model, "test", dataset=data.get("dataset"), image_size=data.get("image_size"))
    spec = preprocessing_spec(transform)
    return TrainedModel(model=model, transform=transform, preprocessing=spec, config=cfg,
                        model_id=model_identity(model, cfg["model"], spec), checkpoint=str(path.resolve()),
                        checkpoint_sha256=file_sha256(path))
