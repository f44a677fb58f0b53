"""Image transforms (torchvision) for training and evaluation, method.md section 4; a dataset spec's
``transforms`` and ``image_size`` (kanji) replace the photo transforms and the default size."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torchvision import transforms as T

from recallk.data.registry import DATASET_SPECS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINDS = ("train", "test")


def photo_transforms(kind: str, size: int, interp: T.InterpolationMode) -> list:
    """Train: RandomResizedCrop(size) + horizontal flip; test: Resize(size * 256 / 224) + CenterCrop(size)."""
    if kind == "test":
        return [T.Resize(round(size * 256 / 224), interpolation=interp), T.CenterCrop(size)]
    return [T.RandomResizedCrop(size, interpolation=interp), T.RandomHorizontalFlip()]


def _interpolation(name: str) -> T.InterpolationMode:
    try:
        return T.InterpolationMode(name)
    except ValueError:
        raise ValueError(f"unknown interpolation {name!r}; use 'bilinear', 'bicubic' or 'nearest'") from None


def build_transforms(
    kind: str,
    image_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dataset: str | None = None,
    interpolation: str = "bilinear",
) -> T.Compose:
    """Transforms for ``kind`` ``"train"`` or ``"test"``: float32 tensors ``(3, image_size, image_size)``.

    ``dataset``'s spec may bring its own transforms and default ``image_size`` (kanji: 64), else photo transforms
    and 224; ``mean`` and ``std`` (per channel, for 0-1 pixel values) normalise. Raises ValueError for an
    unknown kind, interpolation or a non-positive size.
    """
    if kind not in KINDS:
        raise ValueError(f"transform kind must be one of {KINDS}, got {kind!r}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}")
    spec = DATASET_SPECS.get(dataset)
    size = image_size or (spec and spec.image_size) or 224
    if size < 1:
        raise ValueError(f"image_size must be positive, got {size}")
    head = (spec and spec.transforms) or photo_transforms
    tail = [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    return T.Compose([*head(kind, size, _interpolation(interpolation)), *tail])


def model_data_config(model: Any) -> dict[str, Any]:
    """The timm data config (``input_size``, ``mean``, ``std``, ``interpolation``, ...) of a model: its
    ``data_config`` (recallk embedding models), else ``timm.data.resolve_data_config(model=model)``."""
    cfg = getattr(model, "data_config", None)
    if cfg is not None:
        return dict(cfg)
    import timm.data

    return timm.data.resolve_data_config(model=model)


def transforms_for_model(
    model: Any,
    kind: str,
    dataset: str | None = None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> T.Compose:
    """:func:`build_transforms` with mean, std and interpolation from the model's weights config.

    Explicit ``mean``/``std``/``image_size`` override the config. The size defaults to the config's input size,
    or on models that take any input size (``fixed_input_size`` False) to the dataset spec's ``image_size``
    (kanji: 64) if it has one.
    """
    cfg = model_data_config(model)
    if image_size is None:
        spec = DATASET_SPECS.get(dataset)
        flexible = not getattr(model, "fixed_input_size", True)
        image_size = spec.image_size if spec and spec.image_size and flexible else int(cfg["input_size"][-1])
    interp = cfg.get("interpolation", "bilinear")
    return build_transforms(
        kind,
        image_size=image_size,
        mean=mean if mean is not None else tuple(cfg["mean"]),
        std=std if std is not None else tuple(cfg["std"]),
        dataset=dataset,
        interpolation=interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear",
    )
