"""Image transforms (torchvision) for training and evaluation, method.md section 4; a dataset spec's
``transforms`` and ``image_size`` (kanji) replace the photo transforms and the default size."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import ExifTags, Image
from torchvision import transforms as T

from recallk.data.datasets.base import to_rgb8
from recallk.data.registry import DATASET_SPECS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINDS = ("train", "test")


CROP_MODES = ("center", "squash")


def photo_transforms(kind: str, size: int, interp: T.InterpolationMode, crop_pct: float | None = None,
                     crop_mode: str = "center") -> list:
    """Train: RandomResizedCrop(size) + horizontal flip. Test: resize, then CenterCrop(size): with ``crop_pct``
    None the method's resize of the shorter side to ``round(size * 256 / 224)`` (method.md section 4), else
    timm's rule for the weights' ``crop_pct`` (``timm.data.transforms_factory``): the shorter side to
    ``floor(size / crop_pct)`` (``crop_mode="center"``), or the whole image to that square (``"squash"``)."""
    if kind == "test":
        if crop_pct is None:
            resize = T.Resize(round(size * 256 / 224), interpolation=interp)
        elif crop_mode == "squash":
            side = math.floor(size / crop_pct)
            resize = T.Resize((side, side), interpolation=interp)
        else:
            resize = T.Resize(math.floor(size / crop_pct), interpolation=interp)
        return [resize, T.CenterCrop(size)]
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
    crop_pct: float | None = None,
    crop_mode: str = "center",
) -> T.Compose:
    """Transforms for ``kind`` ``"train"`` or ``"test"``: PIL image of any mode -> float32 tensor
    ``(3, image_size, image_size)``.

    The first step is :class:`ToRGB8`: greyscale, palette, RGBA, CMYK, 16-bit... images become the 8-bit RGB
    picture the dataset loaders decode files to (``recallk.data.datasets.base.to_rgb8``), so a user's own PIL
    image gives what the same file gives through a loader.

    ``dataset``'s spec may bring its own transforms and default ``image_size`` (kanji: 64), else photo transforms
    (:func:`photo_transforms`: ``crop_pct`` and ``crop_mode`` set the test resize) and 224; ``mean`` and ``std``
    (per channel, for 0-1 pixel values) normalise. Raises ValueError for an unknown kind, interpolation or crop
    mode, a ``crop_pct`` outside (0, 1] or a non-positive size; the transform raises
    ``recallk.data.datasets.base.UnsupportedImageModeError`` (a ValueError) for a mode without an 8-bit RGB form.
    """
    if kind not in KINDS:
        raise ValueError(f"transform kind must be one of {KINDS}, got {kind!r}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}")
    spec = DATASET_SPECS.get(dataset)
    size = image_size or (spec and spec.image_size) or 224
    if size < 1:
        raise ValueError(f"image_size must be positive, got {size}")
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct is the centre crop's share of the resized image, in (0, 1]; got {crop_pct}")
    if crop_mode not in CROP_MODES:
        raise ValueError(f"unknown crop_mode {crop_mode!r}; choose from {CROP_MODES}")
    head = (spec and spec.transforms) or functools.partial(photo_transforms, crop_pct=crop_pct, crop_mode=crop_mode)
    tail = [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    return T.Compose([ToRGB8(), *head(kind, size, _interpolation(interpolation)), *tail])


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
    """:func:`build_transforms` with the preprocessing of the model's weights (its ``data_config``, timm's
    ``resolve_model_data_config``): mean, std, interpolation, and for photo datasets the test crop (``crop_pct``,
    ``crop_mode``: resize the shorter side to ``floor(size / crop_pct)``, then centre-crop ``size``, as timm
    does; the authors' presets keep the method's 256/224). PIL image of any mode (turned into 8-bit RGB first by
    :class:`ToRGB8`) -> float32 tensor ``(3, H, W)``.

    Explicit ``mean``/``std``/``image_size`` override the config. The size defaults to the config's input size
    (the size the model was built for: ``build_model(..., img_size=...)``), or on models that take any input size
    (``fixed_input_size`` False) to the dataset spec's ``image_size`` (kanji: 64) if it has one. Crop modes
    other than ``"center"`` and ``"squash"`` (timm's ``"border"``) fall back to ``"center"``.
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
        crop_pct=cfg.get("crop_pct"),
        crop_mode=cfg.get("crop_mode") if cfg.get("crop_mode") in CROP_MODES else "center",
    )


class ToRGB8:
    """PIL image of any mode -> its 8-bit RGB picture (:func:`recallk.data.datasets.base.to_rgb8`: EXIF
    orientation, transparency on white, 16-bit and float scaled), as the datasets' loaders decode files; anything
    else passes through. The first step of every :func:`build_transforms` / :func:`transforms_for_model`
    pipeline. An image that is already that picture (RGB, no transparency key, no EXIF rotation: what the loaders
    hand over) is returned as is, without a copy; the image passed in is never changed.

    Raises:
        UnsupportedImageModeError (a ValueError): a mode without a defined 8-bit RGB form.
    """

    def __call__(self, image: Any) -> Any:
        if not isinstance(image, Image.Image):
            return image
        if (image.mode == "RGB" and "transparency" not in image.info
                and image.getexif().get(ExifTags.Base.Orientation, 1) == 1):
            return image
        return to_rgb8(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DeviceNormalize:
    """The float part of ``ToTensor() + Normalize(mean, std)`` run on a batch where it lies (the GPU):
    uint8 ``(n, 3, H, W)`` (``PILToTensor`` output) -> float32 ``(x / 255 - mean) / std``, with the same
    operations in the same order as torchvision's, so the result is the same bit for bit.

    ``memory_format=torch.channels_last`` returns the batch in that layout (for channels_last models).
    Float input (a transform that already normalised) is returned as is, only moved to ``memory_format``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float],
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.mean, self.std, self.memory_format = tuple(map(float, mean)), tuple(map(float, std)), memory_format
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}")
        # (mean, std) per device, made once: a host-to-device copy per batch would make the host wait for the GPU.
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._constants:
            self._constants[device] = (
                torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1).to(device),
                torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1).to(device))
        return self._constants[device]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"DeviceNormalize expects uint8 (n, 3, H, W) images, got {tuple(images.shape)}")
            mean, std = self._on(images.device)
            images = images.to(torch.float32).div(255).sub_(mean).div_(std)
        return images.contiguous(memory_format=self.memory_format)

    def __repr__(self) -> str:
        return f"DeviceNormalize(mean={self.mean}, std={self.std}, memory_format={self.memory_format})"


def split_device_normalize(transform: Callable | None) -> tuple[T.Compose, DeviceNormalize] | None:
    """Split a ``Compose([..., ToTensor(), Normalize(mean, std)])`` (what :func:`build_transforms` returns) into
    its host part ending with ``PILToTensor()`` (PIL -> uint8 (3, H, W), a quarter of float32's bytes) and a
    :class:`DeviceNormalize` that finishes the job on the device; ``DeviceNormalize(host(img)[None])[0]``
    equals ``transform(img)`` exactly. Returns None for any other transform (it is then used as is)."""
    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, T.Compose) or not steps or len(steps) < 2:
        return None
    to_tensor, normalize = steps[-2], steps[-1]
    if type(to_tensor) is not T.ToTensor or type(normalize) is not T.Normalize or normalize.inplace:
        return None
    mean, std = torch.as_tensor(normalize.mean).flatten(), torch.as_tensor(normalize.std).flatten()
    if mean.numel() != 3 or std.numel() != 3:
        return None
    return T.Compose([*steps[:-2], T.PILToTensor()]), DeviceNormalize(mean.tolist(), std.tolist())


def with_device_normalize(dataset: Any) -> tuple[Any, DeviceNormalize | None]:
    """``dataset`` with its ``.transform`` split by :func:`split_device_normalize`: a shallow copy whose items are
    uint8 images, and the :class:`DeviceNormalize` to apply to batches of them; ``(dataset, None)`` when its
    transform cannot be split (the dataset is then used as is). The dataset passed in is not changed."""
    split = split_device_normalize(getattr(dataset, "transform", None))
    if split is None:
        return dataset, None
    host = copy.copy(dataset)
    host.transform = split[0]
    return host, split[1]
