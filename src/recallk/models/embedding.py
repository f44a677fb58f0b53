"""The embedding network: timm backbone -> global pooling -> LayerNorm -> Linear -> L2 normalisation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from recallk.models.backbone import SizeError, built_size
from recallk.models.pooling import GlobalPool


class _FrozenBatchNorm(_BatchNorm):
    """Base added to a frozen layer's class: ``train()`` leaves the layer in eval mode."""

    def train(self, mode: bool = True) -> _FrozenBatchNorm:
        return super().train(False)


_FROZEN_CLASSES: dict[type, type] = {}


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Put every BatchNorm layer of ``model`` in eval mode for good; returns ``model``.

    Frozen layers use their running statistics and never update them, even after ``model.train()``; their
    affine weight and bias still train, so pass 2 of the cached step reproduces pass 1. Each layer's class
    becomes a subclass of its own (``BatchNorm2d`` -> ``FrozenBatchNorm2d``) whose ``train`` keeps eval mode (the
    class swap of ``torch.nn.utils.parametrize``); parameters, buffers and state dict are unchanged.
    """
    for module in model.modules():
        if isinstance(module, _BatchNorm) and not isinstance(module, _FrozenBatchNorm):
            cls = type(module)
            if cls not in _FROZEN_CLASSES:  # a module-level name, so that a whole model still pickles
                name = f"Frozen{cls.__name__}"
                _FROZEN_CLASSES[cls] = globals()[name] = type(name, (_FrozenBatchNorm, cls), {"__module__": __name__})
            module.__class__ = _FROZEN_CLASSES[cls]
            module.train(False)
    return model


class EmbeddingModel(nn.Module):
    """``forward(images (N, C_in, H, W) float) -> (N, embed_dim)`` unit-norm (L2) embeddings, same dtype.

    The authors' heads: ResNet -> GeM (learnable p, init 3) -> LayerNorm(C) -> Linear(C, embed_dim) -> L2;
    ViT -> CLS token -> LayerNorm -> Linear -> L2.

    ``embed_dim=None``: no head of ours; the output is the backbone's own embedding, L2-normalised (with pooling
    ``"head"``: the pooling it was trained with and its own projection, e.g. CLIP's), for zero-shot evaluation.

    Pooling ``"head"`` runs the backbone's own ``forward_head`` (timm): its trained global pooling (class token,
    attention pool ``map``, average) and, when the backbone was built with one, its projection.

    ``freeze_bn=True`` keeps every BatchNorm layer in eval mode even after ``model.train()``
    (:func:`freeze_batchnorm`): running statistics are never updated and batch statistics are never used, so
    the output of an image does not depend on the other images of its batch (needed for the two-pass
    large-batch backward). BN affine weights still train.

    Attributes:
        backbone: the timm model (``num_classes=0``, ``global_pool=''``; with pooling ``"head"`` its own global
            pooling, and ``num_classes`` its projection's size where the head is one).
        pool: :class:`GlobalPool`; ``norm``: LayerNorm(C) and ``proj``: Linear(C, embed_dim), both None when
            ``embed_dim`` was None.
        embed_dim (the output dimension: C when there is no head of ours), feature_dim (C, the pooled vector's
        size), has_head (False for ``embed_dim=None``), freeze_bn, pretrained_cfg (the timm weights config).

    Raises:
        ValueError: a non-positive ``embed_dim``, or pooling ``"cls"`` on a backbone without a class token.
    """

    def __init__(self, backbone: nn.Module, pooling: str, embed_dim: int | None = 512,
                 freeze_bn: bool = True) -> None:
        super().__init__()
        if embed_dim is not None and (isinstance(embed_dim, bool) or int(embed_dim) != embed_dim or embed_dim < 1):
            raise ValueError(f"embed_dim must be a positive integer or None (the backbone's own embedding), "
                             f"got {embed_dim!r}")
        self.backbone = backbone
        prefix = getattr(backbone, "num_prefix_tokens", 0) or 0
        channels_last = getattr(backbone, "output_fmt", "NCHW") == "NHWC"
        if pooling == "cls" and (prefix < 1 or getattr(backbone, "cls_token", None) is None):
            raise ValueError(f"pooling 'cls' needs a class token, which {type(backbone).__name__} lacks; use 'avg'")
        self.pool = GlobalPool(pooling, prefix, channels_last)
        self.feature_dim = head_output_dim(backbone) if pooling == "head" else int(backbone.num_features)
        self.has_head = embed_dim is not None
        self.embed_dim = int(embed_dim) if embed_dim is not None else self.feature_dim
        self.norm = nn.LayerNorm(self.feature_dim) if self.has_head else None
        self.proj = nn.Linear(self.feature_dim, self.embed_dim) if self.has_head else None
        self.freeze_bn = freeze_bn
        self.image_size: tuple[int, int] | None = None  # the (H, W) it was built for (build_model's img_size)
        self.data_overrides: dict[str, Any] = {}  # entries of data_config that replace the weights' own
        if freeze_bn:
            freeze_batchnorm(self)

    @property
    def name(self) -> str:
        """The timm name of the backbone (its weights config's architecture and tag, if any)."""
        cfg = self.pretrained_cfg
        arch = cfg.get("architecture") or type(self.backbone).__name__
        return f"{arch}.{cfg['tag']}" if cfg.get("tag") else arch

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The timm pretrained config of the backbone (mean, std, input size, weights source ...)."""
        return dict(getattr(self.backbone, "pretrained_cfg", None) or {})

    @property
    def data_config(self) -> dict[str, Any]:
        """The preprocessing of the weights: timm's resolved data config (``input_size`` (3, H, W), ``mean``,
        ``std`` per channel for 0-1 pixels, ``interpolation``, ``crop_pct``, ``crop_mode``), with ``input_size``
        the size the model was built for (a ViT's patch grid, or build_model's ``img_size``) and
        ``data_overrides`` applied (the authors' presets: ``crop_pct`` None, the method's resize to
        ``round(size * 256 / 224)``)."""
        import timm.data

        cfg = dict(timm.data.resolve_model_data_config(self.backbone))
        size = built_size(self.backbone) or self.image_size
        if size is not None:
            cfg["input_size"] = (int(cfg["input_size"][0]), *size)
        cfg.update(self.data_overrides)
        return cfg

    @property
    def fixed_input_size(self) -> bool:
        """True when the backbone takes only its configured input size (e.g. ViT with a fixed patch grid)."""
        patch_embed = getattr(self.backbone, "patch_embed", None)
        strict = bool(getattr(patch_embed, "strict_img_size", False))
        return strict and not getattr(self.backbone, "dynamic_img_size", False)

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features pooled to ``(N, feature_dim)``, before our head (pooling ``"head"``: the backbone's
        own ``forward_head``, its projection included)."""
        features = self.backbone.forward_features(images)
        if self.pool.method == "head":
            return self.backbone.forward_head(features)
        return self.pool(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
        if self.fixed_input_size and not torch.jit.is_tracing():
            built = built_size(self.backbone)
            if built is not None and tuple(images.shape[-2:]) != built:
                h, w = images.shape[-2:]
                raise SizeError(
                    f"{self.name} was built for {built[0]}x{built[1]}-px images, got {h}x{w}: build it for this "
                    f"size (build_model(..., img_size={h}), in a config model.options.img_size={h}) or resize "
                    "the images"
                )
        x = self.pooled_features(images)
        if self.has_head:
            x = self.proj(self.norm(x))
        return F.normalize(x, dim=1)


def head_output_dim(backbone: nn.Module) -> int:
    """Size of the vector a timm backbone's ``forward_head`` returns: its classifier / projection's
    ``num_classes`` when it has one, else the pooled width (``head_hidden_size``, else ``num_features``)."""
    classes = int(getattr(backbone, "num_classes", 0) or 0)
    if classes > 0:
        return classes
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
