"""Image transforms (torchvision) for training and evaluation, method.md section 4, plus the kanji variants.

Photos: train = RandomResizedCrop(size) + horizontal flip + normalise; test = Resize(size * 256 / 224) +
CenterCrop(size) + normalise. Kanji (64 x 64 renderings, dark ink on white): train = random affine (rotation,
shift, scale, shear; white fill) + random stroke width + random resized crop (no flip: a mirrored character is
not the character); test = resize to the size only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageFilter
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KANJI_SIZE = 64
KINDS = ("train", "test")


class RandomStrokeWidth:
    """Thicken or thin the strokes of dark-on-light line art by a grey-level morphological filter.

    With probability ``p`` apply, with equal chance, a MinFilter (dilates dark ink: thicker strokes) or a
    MaxFilter (erodes dark ink: thinner strokes) of a size drawn from ``sizes`` (odd pixel widths). Works on
    PIL images of any mode; returns a PIL image of the same size and mode.
    """

    def __init__(self, p: float = 0.5, sizes: Sequence[int] = (3,)) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if not sizes or any(s < 3 or s % 2 == 0 for s in sizes):
            raise ValueError(f"sizes must be odd integers >= 3, got {sizes}")
        self.p = p
        self.sizes = tuple(sizes)

    def __call__(self, image: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return image
        size = random.choice(self.sizes)
        filt = ImageFilter.MinFilter(size) if random.random() < 0.5 else ImageFilter.MaxFilter(size)
        return image.filter(filt)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, sizes={self.sizes})"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"transform kind must be one of {KINDS}, got {kind!r}")


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

    ``image_size`` defaults to 224 for photos and 64 (the rendering size) for ``dataset="kanji"``; ``mean``
    and ``std`` (per channel, for 0-1 pixel values) normalise. Raises ValueError for an unknown kind,
    interpolation or a non-positive size.
    """
    _check_kind(kind)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}")
    kanji = dataset == "kanji"
    size = image_size or (KANJI_SIZE if kanji else 224)
    if size < 1:
        raise ValueError(f"image_size must be positive, got {size}")
    interp = _interpolation(interpolation)
    tail = [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    if kanji:
        if kind == "test":
            return T.Compose([T.Resize((size, size), interpolation=interp), *tail])
        return T.Compose(
            [
                T.RandomAffine(
                    degrees=8,
                    translate=(0.06, 0.06),
                    scale=(0.9, 1.1),
                    shear=8,
                    interpolation=interp,
                    fill=255,
                ),
                RandomStrokeWidth(p=0.5, sizes=(3,)),
                T.RandomResizedCrop(size, scale=(0.75, 1.0), ratio=(0.85, 1.18), interpolation=interp),
                *tail,
            ]
        )
    if kind == "test":
        return T.Compose([T.Resize(round(size * 256 / 224), interpolation=interp), T.CenterCrop(size), *tail])
    return T.Compose([T.RandomResizedCrop(size, interpolation=interp), T.RandomHorizontalFlip(), *tail])


def model_data_config(model: Any) -> dict[str, Any]:
    """The timm data config (``input_size``, ``mean``, ``std``, ``interpolation``, ...) of a model.

    Uses ``model.data_config`` when the model has it (recallk embedding models do), else
    ``timm.data.resolve_data_config(model=model)`` (any timm model).
    """
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

    Explicit ``mean``/``std``/``image_size`` override the config. The size defaults to the config's input
    size, except for kanji on models that take any input size (64). Models with ``fixed_input_size`` True
    (e.g. ViT) always get their config's size unless ``image_size`` is given.
    """
    cfg = model_data_config(model)
    if image_size is None:
        flexible = not getattr(model, "fixed_input_size", True)
        image_size = KANJI_SIZE if dataset == "kanji" and flexible else int(cfg["input_size"][-1])
    interp = cfg.get("interpolation", "bilinear")
    return build_transforms(
        kind,
        image_size=image_size,
        mean=mean if mean is not None else tuple(cfg["mean"]),
        std=std if std is not None else tuple(cfg["std"]),
        dataset=dataset,
        interpolation=interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear",
    )
