"""Model names -> defaults: the head pooling and the timm weights tag of the authors' backbones.

The authors used torchvision's ImageNet ResNet-50 (timm tag ``resnet50.tv_in1k``) and ImageNet-21k ViTs
(``vit_base_patch{16,32}_224.augreg_in21k``). ``build_model`` uses these tags for the bare names below, so the
weights and their data config (mean, std, interpolation) are the authors'. Pass a tagged name
(``"resnet50.a1_in1k"``) to choose other weights.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelPreset:
    """``pooling``: head pooling; ``weights``: the timm name with tag to create (None: the name as given)."""

    pooling: str
    weights: str | None = None


MODELS: dict[str, ModelPreset] = {
    "resnet50": ModelPreset("gem", "resnet50.tv_in1k"),
    "vit_base_patch16_224": ModelPreset("cls", "vit_base_patch16_224.augreg_in21k"),
    "vit_base_patch32_224": ModelPreset("cls", "vit_base_patch32_224.augreg_in21k"),
}

# Family defaults, first match wins (fnmatch patterns on the name without tag).
POOLING_PATTERNS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("resnet*", "resnext*", "seresnet*", "wide_resnet*", "regnet*", "efficientnet*", "densenet*"), "gem"),
    (("vit_*", "deit*", "eva*", "beit*"), "cls"),
    (("convnext*", "swin*"), "avg"),
)


def default_pooling(name: str, num_prefix_tokens: int | None, has_cls_token: bool) -> str:
    """Pooling for a model: preset, else name pattern, else by output type.

    Fallback: token models with a class token -> ``"cls"``, other token models -> ``"avg"``; feature maps ->
    ``"avg"`` (GeM assumes non-negative features, which only some CNN families guarantee).
    """
    base = name.split(".")[0]
    if base in MODELS:
        return MODELS[base].pooling
    for patterns, pooling in POOLING_PATTERNS:
        if any(fnmatch.fnmatch(base, pattern) for pattern in patterns):
            if pooling == "cls" and not has_cls_token:
                return "avg"
            return pooling
    if num_prefix_tokens is not None and has_cls_token:
        return "cls"
    return "avg"


def timm_name(name: str) -> str:
    """The timm name to create: a bare preset name gets the authors' weights tag, others are unchanged."""
    preset = MODELS.get(name)
    return preset.weights if preset is not None and preset.weights else name
