"""Creating a timm backbone for an image size: ``img_size`` reaches ViT-like models (patch grid and position
embeddings), is left out for models that take any size (CNNs), and sizes a model cannot run at are refused in one
line (:class:`SizeError`) instead of a timm traceback at the first batch."""

from __future__ import annotations

import re
from typing import Any

from torch import nn


class SizeError(ValueError):
    """The model cannot run at the asked image size (e.g. a ViT whose patch size does not divide it, or images of
    another size than the one a fixed-size model was built for). One line, saying which sizes work."""


def image_side(img_size: Any) -> tuple[int, int]:
    """``img_size`` (an int, or ``(H, W)``) as ``(H, W)`` pixels.

    Raises:
        SizeError: not a positive int or a pair of them.
    """
    sides = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size) if isinstance(
        img_size, list | tuple) else ()
    if len(sides) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sides):
        raise SizeError(f"img_size must be a positive number of pixels or a pair (H, W) of them, got {img_size!r}")
    return int(sides[0]), int(sides[1])


def size_options(name: str, image_size: int | None) -> dict[str, Any]:
    """The ``build_model`` options that build model ``name`` (a timm name, optionally tagged, or a preset) for
    ``image_size``-px square images: ``{"img_size": image_size}`` when its weights config says it takes one input
    size only (timm's ``fixed_input_size``: ViT patch grids) and that size is another; ``{}`` otherwise (None,
    models that take any size, the weights' own size: the model and its recorded options stay as they were).
    ``recallk train`` applies it with ``data.image_size`` unless ``model.options.img_size`` is set. Raises
    nothing: an unknown name gives ``{}`` (``build_model`` then names the problem)."""
    import timm.models

    from recallk.models.registry import timm_name

    if image_size is None:
        return {}
    try:
        cfg = timm.models.get_pretrained_cfg(timm_name(name))
    except Exception:  # an unknown name or tag
        return {}
    if cfg is None or not getattr(cfg, "fixed_input_size", False):
        return {}
    if tuple(cfg.input_size[-2:]) == (int(image_size), int(image_size)):
        return {}
    return {"img_size": int(image_size)}


def patch_size(backbone: nn.Module) -> tuple[int, int] | None:
    """The ``(H, W)`` patch size of a backbone with a timm ``patch_embed``, else None."""
    size = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[-1]))


def built_size(backbone: nn.Module) -> tuple[int, int] | None:
    """The ``(H, W)`` image size a patch-embedding backbone was built for (timm's ``patch_embed.img_size``)."""
    size = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[-1]))


def check_patch_grid(backbone: nn.Module, name: str, size: tuple[int, int]) -> None:
    """Raise :class:`SizeError` when ``size`` is not a whole number of the backbone's patches (timm would drop the
    remainder of every image silently)."""
    patch = patch_size(backbone)
    if patch is None:
        return
    for side, p in zip(size, patch):
        if side % p:
            lower, upper = side // p * p, (side // p + 1) * p
            raise SizeError(
                f"{name} cuts images into {p}-px patches, so the image size must be a multiple of {p}: {side} is "
                f"not (use {lower or p} or {upper})"
            )


def _fixed_input_size(name: str) -> bool:
    """Whether timm's weights config of ``name`` says the model takes one input size only; True when unknown."""
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # an unknown tag: let timm.create_model name the problem
        return True
    return cfg is None or bool(getattr(cfg, "fixed_input_size", True))


#: timm's dropout and drop-path rates: probabilities, in [0, 1)
DROP_RATES = ("drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate", "patch_drop_rate")


def check_drop_rates(kwargs: dict[str, Any]) -> None:
    """Raise ValueError for a dropout or drop-path rate of ``kwargs`` (timm options, :data:`DROP_RATES`) that is
    not a real number in [0, 1), naming ``model.options.<key>``: timm would fail only in the first training step."""
    for key in DROP_RATES:
        value = kwargs.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise ValueError(f"model.options.{key}={value!r}: {key} is a probability and must be a number in [0, 1), "
                             f"e.g. model.options.{key}=0.1")


def create_backbone(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model(name, pretrained=pretrained, **kwargs)``, where ``kwargs["img_size"]`` (optional) is
    the image size: passed on to models built for one input size (timm's ``fixed_input_size``: ViT patch
    grids), left out for those that take any size.

    Raises:
        SizeError: a bad ``img_size``, a size that is no whole number of patches, or timm refusing the size.
        Whatever ``timm.create_model`` raises otherwise (hub failures among them).
    """
    import timm

    check_drop_rates(kwargs)
    size = image_side(kwargs["img_size"]) if kwargs.get("img_size") is not None else None
    if size is not None and not _fixed_input_size(name):  # any size works: no img_size to pass (CNNs lack it)
        kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
    try:
        backbone = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:  # "__init__() got an unexpected keyword argument 'img_size'": any size works
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if unexpected and unexpected.group(1) != "img_size":
            raise ValueError(f"model option {unexpected.group(1)!r} (model.options.{unexpected.group(1)}) is not an "
                             f"argument of timm's {name.split('.')[0]} ({e}); check its spelling against the model's "
                             "constructor (e.g. drop_path_rate, drop_rate, img_size)") from None
        if size is None or "img_size" not in str(e):
            raise
        kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
        backbone = timm.create_model(name, pretrained=pretrained, **kwargs)
    except AssertionError as e:  # timm's size checks (window or grid sizes) are assertions
        if size is None:
            raise
        raise SizeError(f"{name} cannot be built for {size[0]}x{size[1]}-px images: {e}") from None
    if size is not None:
        check_patch_grid(backbone, name, size)
    return backbone
