"""A user's own images: ``root/<class name>/<image>``, optionally split (``root/train/``, ``root/test/``).

Images are files with a suffix in ``IMAGE_SUFFIXES`` (any case), found recursively below each class folder;
hidden files and folders are ignored. Class ids follow the sorted class folder names.
"""

from __future__ import annotations

from pathlib import Path

from recallk.data.datasets.base import DatasetFileNotFoundError, image_list_builder, require
from recallk.data.registry import DatasetSpec, register_dataset

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


def _is_hidden(path: Path, base: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(base).parts)


def _parse(base: Path, split: str | None) -> tuple[list[Path], list[str], None]:
    """Images under ``root/<class>/`` (``split=None`` or ``"all"``) or ``root/<split>/<class>/``.

    With ``split=None`` and a root holding both ``train/`` and ``test/``, raises ValueError (give a split).
    Class names are the folder names.

    Raises:
        ValueError: ambiguous split, or no class folder holds an image.
        DatasetFileNotFoundError: the root or ``root/<split>`` is missing.
    """
    if split is not None and split != "all":
        base = require(
            base / split,
            f"folder split {split!r}",
            "Put class folders there, or pass split=None (or 'all') to use the class folders directly under root.",
            folder=True,
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
    return paths, keys, None


build_folder = image_list_builder("folder", _parse, default_split=None)
register_dataset(DatasetSpec("folder", build_folder, splits=None, eval_ks=(1, 2, 4, 8)))
