"""A trained model as a retrieval system uses it: the network, its test-time transform and its identity.

A trainer checkpoint (``runs/<name>/checkpoints/<file>.pt``) holds the weights, the run's resolved config and the
model's ``model_spec`` (``build_model`` arguments): they say which network the weights belong to and which test
transform the run evaluated with, so a checkpoint copied anywhere, alone, is enough. Older checkpoints (no config
inside) use the run folder's ``config.yaml`` beside ``checkpoints/``. :func:`load_trained_model` rebuilds network
and transform; :func:`load_model` is the short form. The **model identity** (``model_id``) is a SHA-256 over the
model section of the config, the preprocessing and the weights themselves: embedding files, indexes
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
from torchvision import transforms as T

from recallk import __version__
from recallk.data.transforms import ToRGB8, transforms_for_model
from recallk.engine.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from recallk.models import build_model
from recallk.retrieval.files import file_sha256
from recallk.run_folder import RunFolder, read_config
from recallk.utils import resolve_device


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for retrieval: unreadable, of another format, or of another model."""


@dataclass
class TrainedModel:
    """An embedding model ready for retrieval (eval mode, on the CPU until moved).

    Attributes:
        model: ``images (N, 3, H, W) float32 -> (N, d)`` L2-normalised embeddings; its ``test_transform``
            attribute is ``transform``.
        transform: the run's test-time transform, PIL image -> float32 tensor (3, H, W).
        preprocessing: that transform as data (:func:`preprocessing_spec`).
        config: the run's resolved config (``config.yaml``) as a dict.
        model_id: hex SHA-256 identity of model config + preprocessing + weights (module docstring).
        checkpoint: path of the checkpoint file; checkpoint_sha256: hex SHA-256 of its bytes.
        model_spec: the ``build_model`` arguments the network was rebuilt with (``{"name": ..., ...}``).
        config_source: where the config came from: ``"checkpoint"`` or the path of a ``config.yaml``.
        embed_dim: d.
    """

    model: torch.nn.Module
    transform: T.Compose
    preprocessing: dict[str, Any]
    config: dict[str, Any]
    model_id: str
    checkpoint: str
    checkpoint_sha256: str
    model_spec: dict[str, Any] | None = None
    config_source: str = "checkpoint"
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
        "dtype": "float32", "resampler": "PIL"}``. A network input is ``((pixels / 255) - mean) / std``, the
        pixels being the resized, centre-cropped 8-bit RGB picture ``ToRGB8`` makes (EXIF orientation, alpha on
        white, 16-bit / 257: not stated here, as this dict is hashed into ``model_id``; the export sidecar adds
        it, :func:`recallk.retrieval.export.export_preprocessing`).

    Raises:
        ValueError: a step other than ToRGB8, Resize, CenterCrop, ToTensor and Normalize (it cannot be stated as
            data).
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
        elif not isinstance(step, (T.ToTensor, ToRGB8)):  # ToRGB8: any PIL mode -> 8-bit RGB, the "color"
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


def _read_config(path: Path, checkpoint: Path | None = None) -> dict[str, Any]:
    if not path.is_file():
        if checkpoint is not None:
            raise CheckpointError(
                f"{checkpoint} carries no config of its own (written before checkpoints held one) and {path} is not "
                "there: such a checkpoint is used with the config.yaml of its run folder "
                "(runs/<name>/checkpoints/<file>.pt next to runs/<name>/config.yaml); pass config= (Python) to name "
                "that file, or keep the checkpoint in its run folder"
            )
        raise CheckpointError(f"config file not found: {path}")
    try:
        _, config = read_config(path)  # the run folder's config.yaml reader
    except ValueError as e:  # not valid YAML, or not a mapping
        raise CheckpointError(str(e)) from e
    if not isinstance(config.get("model"), dict) or "name" not in config["model"]:
        raise CheckpointError(f"{path} has no model section with a name: is it a recallk run's config.yaml?")
    return config


def _model_state(state: Any, path: Path) -> dict[str, torch.Tensor]:
    """The model weights of a trainer checkpoint (current format), of ``{"model": state dict}`` or of a bare state
    dict."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a recallk checkpoint (a dict)")
    if "model" in state:
        fmt = state.get("format")  # None: a hand-saved {"model": ...}
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


def _stored_config(state: Any) -> dict[str, Any] | None:
    """The config a checkpoint carries (None: an older checkpoint, a bare state dict or a hand-saved one)."""
    config = state.get("config") if isinstance(state, dict) and "model" in state else None
    return config if isinstance(config, dict) else None


def _build_spec(cfg: dict[str, Any], state: Any, own_config: bool, path: Path) -> dict[str, Any]:
    """``build_model`` arguments (with ``name``, ``pretrained=False``: the weights come from the checkpoint): the
    checkpoint's ``model_spec`` when its own config is used, else the config's model section."""
    spec = state.get("model_spec") if own_config else None
    if isinstance(spec, dict) and "name" in spec:
        return {**spec, "pretrained": False}
    model = cfg.get("model")
    if not isinstance(model, dict) or "name" not in model:
        raise CheckpointError(
            f"{path} does not say how to build its model (no model_spec, no model section in its config): the "
            "model was not made by recallk.models.build_model. Build it yourself and load the weights with "
            "model.load_state_dict(recallk.engine.load_checkpoint(path)['model'])"
        )
    return {"name": model["name"], **_model_arguments(model)}


def load_trained_model(
    checkpoint: str | os.PathLike, config: str | os.PathLike | None = None
) -> TrainedModel:
    """Rebuild a trained embedding model, its test transform and its identity from a checkpoint.

    The config comes from, in this order: ``config`` when given; the checkpoint itself (``"config"`` and
    ``"model_spec"`` entries, written by the trainer: the checkpoint works alone, copied anywhere); the run folder's
    ``config.yaml`` beside ``checkpoints/`` (older checkpoints, bare state dicts). Nothing is downloaded: the
    network is built with ``pretrained=False`` and gets the checkpoint's weights.

    Args:
        checkpoint: a trainer checkpoint (``runs/<name>/checkpoints/best.pt`` or ``last.pt``, or a copy) or a bare
            model state dict.
        config: a run's ``config.yaml`` to use instead of the checkpoint's own config.

    Returns:
        A :class:`TrainedModel` in eval mode on the CPU.

    Raises:
        CheckpointError (a ValueError): missing or unreadable file; a checkpoint without config of its own whose
            run folder has no ``config.yaml``; another checkpoint format; a model not built by ``build_model``;
            weights that do not fit the config's model (another model's checkpoint).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = load_checkpoint(path, map_location="cpu")
    except Exception as e:  # corrupt or foreign file: torch raises many kinds
        beside = RunFolder(path.resolve().parent.parent).config
        context = "" if config is not None or beside.is_file() else f"; {beside} not found: not in a run folder either"
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}){context}") from e
    weights = _model_state(state, path)
    stored = _stored_config(state) if config is None else None
    if stored is not None:
        cfg, source = stored, "checkpoint"
    else:
        config_path = Path(config) if config is not None else RunFolder(path.resolve().parent.parent).config
        cfg, source = _read_config(config_path, None if config is not None else path), str(config_path)
    spec = _build_spec(cfg, state, stored is not None, path)
    model = build_model(**spec)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        where = "its own model_spec" if source == "checkpoint" else f"the model of {source}"
        raise CheckpointError(
            f"the weights in {path} do not fit {where} ({spec['name']}, embed_dim={spec.get('embed_dim')}): the "
            f"checkpoint is of another model. Use the checkpoint with its own run folder's config.yaml. "
            f"Details: {str(e)[:600]}"
        ) from e
    model.eval()
    data = cfg.get("data") or {}
    transform = transforms_for_model(model, "test", dataset=data.get("dataset"), image_size=data.get("image_size"))
    preprocessing = preprocessing_spec(transform)
    model.test_transform = transform  # so that embed_images(model, ...) uses the run's transform, not a default
    section = cfg.get("model") if isinstance(cfg.get("model"), dict) else spec
    return TrainedModel(model=model, transform=transform, preprocessing=preprocessing, config=cfg,
                        model_id=model_identity(model, section, preprocessing), checkpoint=str(path.resolve()),
                        checkpoint_sha256=file_sha256(path), model_spec=spec, config_source=source)


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, T.Compose]:
    """A trained recallk model and its test transform, from a checkpoint file alone (copied anywhere).

    Example::

        model, transform = recallk.load_model("best.pt")
        with torch.no_grad():
            embeddings = model(torch.stack([transform(image) for image in pil_images]))

    Args:
        path: a checkpoint written by the trainer (``best.pt``, ``last.pt``); older checkpoints without a config
            inside are read with their run folder's ``config.yaml`` (see :func:`load_trained_model`).
        device: where to put the model: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"``
            (:func:`recallk.utils.resolve_device`).

    Returns:
        ``(model, transform)``: ``model`` in eval mode on ``device`` maps float32 images ``(N, 3, H, W)``
        (normalised, as ``transform`` makes them) to float32 embeddings ``(N, d)`` of unit L2 norm;
        ``transform`` is the run's test transform: a PIL image of any mode (greyscale, RGBA, 16-bit... are turned
        into 8-bit RGB first as the dataset loaders do: :class:`recallk.data.transforms.ToRGB8`) -> float32
        tensor ``(3, H, W)`` (resize, centre crop, ``ToTensor`` to 0..1, ImageNet-style normalisation).

    Raises:
        CheckpointError (a ValueError): see :func:`load_trained_model`; ValueError: a device name torch does not
            know; torch's RuntimeError/AssertionError when the device exists but is not available here.
    """
    try:
        target = resolve_device(device)
    except RuntimeError as e:
        raise ValueError(f"device={device!r} is not a device name ('cpu', 'cuda', 'cuda:1', 'auto'): {e}") from e
    trained = load_trained_model(path)
    return trained.model.to(target), T.Compose(list(trained.transform.transforms))  # ToRGB8 is its first step
