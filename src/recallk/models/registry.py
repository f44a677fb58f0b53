"""Model names -> defaults: the head pooling and the timm weights tag of the authors' backbones, and which
families embed through their own timm head (attention pool, CLIP projection).

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
    """``pooling``: head pooling; ``weights``: the timm name with tag to create (None: the name as given).
    The authors' presets keep the method's test resize (``round(size * 256 / 224)``, method.md section 4)
    instead of their weights' ``crop_pct``."""

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


# Families whose trained embedding is the class token although timm's own head averages the patch tokens
# (DINOv3: the DINO head and kNN evaluation read the class token, Simeoni et al. 2025).
CLS_EMBEDDING_PATTERNS: tuple[str, ...] = ("*dinov3*",)
# Families trained to embed through their own timm head (forward_head): SigLIP / SigLIP-2 and Perception Encoder
# (attention pooling, global_pool "map"), CLIP (class token + its projection to the text space, timm's `head`).
OWN_HEAD_PATTERNS: tuple[str, ...] = ("*siglip*", "vit_pe_*", "*_clip_*")
# ... of which these keep their projection: timm's `head` is then the image-text projection, not a classifier,
# unless the weights tag says the model was fine-tuned as a classifier ("ft_in1k", "ft_in12k", ...).
PROJECTION_PATTERNS: tuple[str, ...] = ("*_clip_*", "vit_pe_core_*")


def head_projection_size(name: str, tag: str | None, num_classes: int | None) -> int:
    """``num_classes`` to build a timm model with so that its head keeps the embedding projection it was trained
    with: the weights config's ``num_classes`` for CLIP and Perception Encoder weights (e.g. 512 for
    ``vit_base_patch16_clip_224.openai``), 0 (no head) for everything else, classifiers fine-tuned from them
    included (tags with ``ft_in``)."""
    base = name.split(".")[0]
    if not any(fnmatch.fnmatch(base, pattern) for pattern in PROJECTION_PATTERNS) or "ft_in" in (tag or ""):
        return 0
    return int(num_classes or 0)


def preset_pooling(name: str, embed_dim: int | None) -> str | None:
    """The pooling a model name implies before the model exists: ``"cls"`` for DINOv3 (``CLS_EMBEDDING_PATTERNS``),
    ``"head"`` (the backbone's own trained pooling and projection) without a head of ours (``embed_dim`` None)
    and for the families of ``OWN_HEAD_PATTERNS``;
    else the preset's, else the name pattern's (``POOLING_PATTERNS``; its ``"cls"`` may still become ``"avg"``,
    see :func:`default_pooling`); None when only the built model can tell."""
    base = name.split(".")[0]
    if any(fnmatch.fnmatch(base, pattern) for pattern in CLS_EMBEDDING_PATTERNS):
        return "cls"
    if embed_dim is None or any(fnmatch.fnmatch(base, pattern) for pattern in OWN_HEAD_PATTERNS):
        return "head"
    if base in MODELS:
        return MODELS[base].pooling
    for patterns, pooling in POOLING_PATTERNS:
        if any(fnmatch.fnmatch(base, pattern) for pattern in patterns):
            return pooling
    return None


def default_pooling(name: str, num_prefix_tokens: int | None, has_cls_token: bool) -> str:
    """Pooling for a model with a head of ours: preset, else name pattern, else by output type.

    Fallback: token models with a class token -> ``"cls"``, other token models -> ``"avg"``; feature maps ->
    ``"avg"`` (GeM assumes non-negative features, which only some CNN families guarantee).
    """
    base = name.split(".")[0]
    if any(fnmatch.fnmatch(base, pattern) for pattern in OWN_HEAD_PATTERNS):
        return "head"
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
