"""A user's own images: ``root/<class name>/<image>``, optionally split (``root/train/``, ``root/test/``).

Images are files with a suffix in ``IMAGE_SUFFIXES`` (any case), found recursively below each class folder;
hidden files and folders are ignored. Class ids follow the sorted class folder names.

Symbolic links are followed everywhere alike: a linked class folder, a linked sub-folder at any depth and a
linked image file all count. A link that leads back into a folder it sits in (a loop) raises
:class:`SymlinkLoopError`; a dangling link raises DatasetFileNotFoundError. Nothing is skipped silently.
"""

from __future__ import annotations

import os
from pathlib import Path

from recallk.data.datasets.base import DatasetFileNotFoundError, image_list_builder, require
from recallk.data.registry import DatasetSpec, register_dataset

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


class SymlinkLoopError(ValueError):
    """A symbolic link inside a class folder points to one of its own ancestor folders (a loop)."""


def _images_below(class_dir: Path) -> list[Path]:
    """Every image file below ``class_dir``, following symbolic links to folders and files, sorted by path.

    Raises:
        SymlinkLoopError: a linked folder is an ancestor of the link (names the link and its target).
        DatasetFileNotFoundError: a dangling link.
    """
    found: list[Path] = []

    def walk(folder: Path, ancestors: tuple[str, ...]) -> None:
        with os.scandir(folder) as entries:
            names = sorted(e.name for e in entries)
        for name in names:
            if name.startswith("."):
                continue
            path = folder / name
            if path.is_symlink() and not path.exists():
                raise DatasetFileNotFoundError(
                    f"dangling symbolic link {path} -> {os.readlink(path)}: fix or delete it"
                )
            if path.is_dir():
                real = os.path.realpath(path)
                if real in ancestors:
                    raise SymlinkLoopError(
                        f"symbolic link loop: {path} points to {real}, a folder that contains it; remove the link "
                        "(recallk follows links to folders and would never finish)"
                    )
                walk(path, (*ancestors, real))
            elif path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                found.append(path)

    walk(class_dir, (os.path.realpath(class_dir),))
    return sorted(found)


def _parse(base: Path, split: str | None) -> tuple[list[Path], list[str], None]:
    """Images under ``root/<class>/`` (``split=None`` or ``"all"``) or ``root/<split>/<class>/``.

    With ``split=None`` and a root holding both ``train/`` and ``test/``, raises ValueError (give a split).
    Class names are the folder names.

    Raises:
        ValueError: ambiguous split, or no class folder holds an image; SymlinkLoopError: a link loop.
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
        for path in _images_below(class_dir):
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
