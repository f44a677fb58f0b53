"""The shared dataset class: a list of image files with integer labels, plus the checks every loader needs.

Every benchmark loader (``sop``, ``cub``, ``cars196``, ``inaturalist``, ``vehicleid``, ``folder``) parses its
own list files into ``(paths, class_keys)`` and hands them to :class:`ImageListDataset`, which maps the class
keys to contiguous ids ``0..C-1`` (in sorted key order), opens images lazily as RGB and, when asked, finds
and skips unreadable files up front.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm


class DatasetFileNotFoundError(FileNotFoundError, ValueError):
    """A list file, folder or image that a loader expects is missing (a ValueError and FileNotFoundError)."""


class BadImageError(ValueError):
    """An image file exists but cannot be decoded; ``.path`` is the file."""

    def __init__(self, path: str | os.PathLike, cause: BaseException | None = None) -> None:
        self.path = str(path)
        reason = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        super().__init__(
            f"cannot decode image {self.path}{reason}. Replace or delete the file, or pass "
            "skip_bad_images=True to skip unreadable images (they are then listed in dataset.skipped)."
        )


def require_file(path: Path, what: str, hint: str = "") -> Path:
    """Return ``path`` if it is a file, else raise DatasetFileNotFoundError naming ``what`` and where."""
    if not path.is_file():
        raise DatasetFileNotFoundError(f"{what} not found: expected the file {path}.{(' ' + hint) if hint else ''}")
    return path


def require_dir(path: Path, what: str, hint: str = "") -> Path:
    """Return ``path`` if it is a directory, else raise :class:`DatasetFileNotFoundError`."""
    if not path.is_dir():
        raise DatasetFileNotFoundError(f"{what} not found: expected the folder {path}.{(' ' + hint) if hint else ''}")
    return path


def resolve_root(root: str | os.PathLike | None, name: str) -> Path:
    """The dataset root as a Path; ValueError when it is None, DatasetFileNotFoundError when absent."""
    if root is None:
        raise ValueError(f"dataset {name!r} needs root= (the folder the dataset unpacks to); see docs/datasets.md")
    return require_dir(Path(root).expanduser(), f"{name} root folder")


def read_lines(path: Path) -> list[str]:
    """Non-empty, stripped lines of a text list file."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file fully decoded as RGB; raises BadImageError naming the file if it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError as e:
        raise DatasetFileNotFoundError(f"image not found: {path}") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(path, e) from e


def image_is_readable(path: str | os.PathLike) -> bool:
    """Fast full decode check: JPEGs decode at 1/8 scale (draft mode), other formats decode fully."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
        return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


class ImageListDataset(Dataset):
    """Images listed by path, with integer labels.

    Args:
        paths: image files, in dataset order.
        class_keys: one hashable, sortable class key per path (e.g. an int id or a folder name).
        transform: applied to the PIL RGB image; None returns the PIL image.
        class_names: optional map key -> display name; default ``str(key)``.
        skip_bad_images: when True, decode every image once at construction (fast draft decode), drop the
            unreadable or missing ones, warn, and record them in ``.skipped``; when False, a bad image raises
            :class:`BadImageError` (naming the file) when it is read.
        name: dataset name used in messages.

    Attributes:
        paths: list of ``str`` paths, one per item.
        labels: ``numpy.int64`` array of shape ``(N,)``, class ids in ``0..C-1`` (keys in sorted order).
        classes: list of ``C`` class names, ``classes[labels[i]]`` is item i's class.
        skipped: list of ``str`` paths dropped by ``skip_bad_images``.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        class_keys: Sequence[Hashable],
        transform: Callable[[Image.Image], Any] | None = None,
        class_names: dict[Hashable, str] | None = None,
        skip_bad_images: bool = False,
        name: str = "dataset",
    ) -> None:
        if len(paths) != len(class_keys):
            raise ValueError(f"{name}: {len(paths)} paths but {len(class_keys)} class keys")
        if len(paths) == 0:
            raise ValueError(f"{name}: the image list is empty; check the root folder and the split")
        paths = [str(p) for p in paths]
        keys = list(class_keys)
        self.skipped: list[str] = []
        if skip_bad_images:
            ok = [image_is_readable(p) for p in tqdm(paths, desc=f"checking {name} images", leave=False)]
            self.skipped = [p for p, good in zip(paths, ok) if not good]
            if self.skipped:
                shown = ", ".join(self.skipped[:5]) + (" ..." if len(self.skipped) > 5 else "")
                warnings.warn(f"{name}: skipped {len(self.skipped)} unreadable image(s): {shown}", stacklevel=3)
            paths = [p for p, good in zip(paths, ok) if good]
            keys = [k for k, good in zip(keys, ok) if good]
            if not paths:
                raise ValueError(f"{name}: every image was unreadable")
        else:
            first = Path(paths[0])
            if not first.is_file():
                raise DatasetFileNotFoundError(
                    f"{name}: the first listed image {first} does not exist; is root the dataset's "
                    "own folder "
                    "(the one holding its list files and images)?"
                )
        sorted_keys = sorted(set(keys))
        index = {k: i for i, k in enumerate(sorted_keys)}
        names = class_names or {}
        self.name = name
        self.paths: list[str] = paths
        self.labels: np.ndarray = np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys))
        self.classes: list[str] = [names.get(k, str(k)) for k in sorted_keys]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = load_rgb(self.paths[i])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {len(self)} images, {len(self.classes)} classes)"
