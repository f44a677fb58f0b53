"""The embedding network: timm backbone -> global pooling -> LayerNorm -> Linear -> L2 normalisation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

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

    ``freeze_bn=True`` keeps every BatchNorm layer in eval mode even after ``model.train()``
    (:func:`freeze_batchnorm`): running statistics are never updated and batch statistics are never used, so
    the output of an image does not depend on the other images of its batch (needed for the two-pass
    large-batch backward). BN affine weights still train.

    Attributes:
        backbone: the timm model (``num_classes=0``, ``global_pool=''``).
        pool: :class:`GlobalPool`; ``norm``: LayerNorm(C); ``proj``: Linear(C, embed_dim).
        embed_dim, feature_dim (C), freeze_bn, pretrained_cfg (the timm weights config).
    """

    def __init__(self, backbone: nn.Module, pooling: str, embed_dim: int = 512, freeze_bn: bool = True) -> None:
        super().__init__()
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive integer, got {embed_dim}")
        self.backbone = backbone
        prefix = getattr(backbone, "num_prefix_tokens", 0) or 0
        channels_last = getattr(backbone, "output_fmt", "NCHW") == "NHWC"
        if pooling == "cls" and (prefix < 1 or getattr(backbone, "cls_token", None) is None):
            raise ValueError(f"pooling 'cls' needs a class token, which {type(backbone).__name__} lacks; use 'avg'")
        self.pool = GlobalPool(pooling, prefix, channels_last)
        self.feature_dim = int(backbone.num_features)
        self.embed_dim = int(embed_dim)
        self.norm = nn.LayerNorm(self.feature_dim)
        self.proj = nn.Linear(self.feature_dim, self.embed_dim)
        self.freeze_bn = freeze_bn
        if freeze_bn:
            freeze_batchnorm(self)

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The timm pretrained config of the backbone (mean, std, input size, weights source ...)."""
        return dict(getattr(self.backbone, "pretrained_cfg", None) or {})

    @property
    def data_config(self) -> dict[str, Any]:
        """timm's resolved data config: ``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``."""
        import timm.data

        return timm.data.resolve_model_data_config(self.backbone)

    @property
    def fixed_input_size(self) -> bool:
        """True when the backbone takes only its configured input size (e.g. ViT with a fixed patch grid)."""
        patch_embed = getattr(self.backbone, "patch_embed", None)
        strict = bool(getattr(patch_embed, "strict_img_size", False))
        return strict and not getattr(self.backbone, "dynamic_img_size", False)

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features pooled to ``(N, feature_dim)``, before the head."""
        return self.pool(self.backbone.forward_features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
        x = self.proj(self.norm(self.pooled_features(images)))
        return F.normalize(x, dim=1)
