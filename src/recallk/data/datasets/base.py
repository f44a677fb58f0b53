"""The shared dataset class :class:`ImageListDataset` (image files with integer labels), the checks every loader
needs, and :func:`image_list_builder`, which makes a dataset builder of a parser of the dataset's own lists."""

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


def require(path: Path, what: str, hint: str = "", folder: bool = False) -> Path:
    """Return ``path`` if it is a file (a folder if ``folder``), else raise DatasetFileNotFoundError naming both."""
    if not (path.is_dir() if folder else path.is_file()):
        where = f"the {'folder' if folder else 'file'} {path}.{(' ' + hint) if hint else ''}"
        raise DatasetFileNotFoundError(f"{what} not found: expected {where}")
    return path


def resolve_root(root: str | os.PathLike | None, name: str) -> Path:
    """The dataset root as a Path; ValueError when it is None, DatasetFileNotFoundError when absent."""
    if root is None:
        raise ValueError(f"dataset {name!r} needs root= (the folder the dataset unpacks to); see docs/datasets.md")
    return require(Path(root).expanduser(), f"{name} root folder", folder=True)


def read_lines(path: Path) -> list[str]:
    """Non-empty, stripped lines of a text list file."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def read_rows(path: Path, fields: int, expected: str, skip: int = 0, maxsplit: int = -1) -> list[list[str]]:
    """The lines of a list file after ``skip`` header lines, each split on whitespace into ``fields`` parts.

    Raises ValueError ``"<path>:<line>: expected <expected>, got '<line>'"`` for a line with another count.
    """
    rows = []
    for n, line in enumerate(read_lines(path)[skip:], start=1 + skip):
        parts = line.split(maxsplit=maxsplit)
        if len(parts) != fields:
            raise ValueError(f"{path}:{n}: expected {expected}, got {line!r}")
        rows.append(parts)
    return rows


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
                    "own folder (the one holding its list files and images)?"
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


def image_list_builder(name: str, parse: Callable, default_split: str | None = "train") -> Callable[..., Dataset]:
    """The builder ``build(root, split, transform=None, skip_bad_images=False)`` of dataset ``name``, documented
    by ``parse(root folder, split) -> (paths, class_keys, class_names or None)``, which reads the lists."""

    def build(
        root: str | os.PathLike | None,
        split: str | None = default_split,
        transform: Callable | None = None,
        skip_bad_images: bool = False,
    ) -> ImageListDataset:
        paths, keys, names = parse(resolve_root(root, name), split)
        return ImageListDataset(paths, keys, transform, names, skip_bad_images, name=f"{name}/{split or 'all'}")

    build.__name__ = build.__qualname__ = f"build_{name}"
    build.__module__, build.__doc__ = parse.__module__, parse.__doc__
    return build
