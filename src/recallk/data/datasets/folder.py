"""A user's own images: ``root/<class name>/<image>``, optionally split (``root/train/``, ``root/test/``).

Image files are those with a known image suffix (``IMAGE_SUFFIXES``, any case), found recursively below each
class folder; hidden files and folders are ignored. Class ids follow the sorted class folder names.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from recallk.data.datasets.base import DatasetFileNotFoundError, ImageListDataset, require_dir, resolve_root

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


def _is_hidden(path: Path, base: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(base).parts)


def build_folder(
    root: str | os.PathLike | None,
    split: str | None = None,
    transform: Callable | None = None,
    skip_bad_images: bool = False,
) -> ImageListDataset:
    """Images under ``root/<class>/`` (``split=None`` or ``"all"``) or ``root/<split>/<class>/``.

    With ``split=None`` and a root holding both ``train/`` and ``test/``, raises ValueError (give a split).
    Class names are the folder names.

    Raises:
        ValueError: ambiguous split, or no class folder holds an image.
        DatasetFileNotFoundError: the root or ``root/<split>`` is missing.
    """
    base = resolve_root(root, "folder")
    if split is not None and split != "all":
        base = require_dir(
            base / split,
            f"folder split {split!r}",
            "Put class folders there, or pass split=None (or 'all') to use the class folders directly under root.",
        )
    elif (base / "train").is_dir() and (base / "test").is_dir():
        raise ValueError(f"{base} holds train/ and test/ folders: pass split='train' or split='test'")
    paths, keys = [], []
    for class_dir in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and not _is_hidden(path, class_dir):
                paths.append(path)
                keys.append(class_dir.name)
    if not paths:
        raise DatasetFileNotFoundError(
            f"no images found in class folders under {base}: expected {base}/<class name>/<image>"
            f" with suffixes {sorted(IMAGE_SUFFIXES)}"
        )
    return ImageListDataset(paths, keys, transform, skip_bad_images=skip_bad_images, name=f"folder/{split or 'all'}")
