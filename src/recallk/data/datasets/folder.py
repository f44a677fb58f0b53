"""A user's own images: ``root/<class name>/<image>``, optionally split (``root/train/``, ``root/test/``), or
split by class with the options ``test_classes`` and ``test_seed`` (a seeded class-disjoint train/test split).

Images are files with a suffix in ``IMAGE_SUFFIXES`` (any case), found recursively below each class folder;
hidden files and folders are ignored. Class ids follow the sorted class folder names.

Symbolic links are followed everywhere alike: a linked class folder, a linked sub-folder at any depth and a
linked image file all count. A link that leads back into a folder it sits in (a loop) raises
:class:`SymlinkLoopError`; a dangling link raises DatasetFileNotFoundError. Nothing is skipped silently.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from recallk.data.datasets.base import (
    DatasetFileNotFoundError,
    ImageListDataset,
    absolute_root,
    image_list_builder,
    require,
    resolve_root,
)
from recallk.data.registry import DatasetSpec, register_dataset
from recallk.data.splits import class_disjoint_split

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
            "Put class folders there; or use split 'all' (CLI: data.train_split=all data.test_split=all) for the class "
            "folders directly under root, or split a flat folder by class with the option test_classes (CLI: "
            "data.options.test_classes=0.5).",
            folder=True,
        )
    elif (base / "train").is_dir() and (base / "test").is_dir():
        raise ValueError(f"{base} holds train/ and test/ folders: use split 'train' or 'test' (CLI: "
                         "data.train_split=train data.test_split=test)")
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


_build_folder_tree = image_list_builder("folder", _parse, default_split=None)
#: the split names of a flat folder split by ``test_classes``
SPLIT_NAMES = ("train", "test")


def build_folder(
    root: str | os.PathLike | None,
    split: str | None = None,
    transform: Callable | None = None,
    skip_bad_images: bool = False,
    test_classes: int | float | None = None,
    test_seed: int = 0,
    progress: bool = True,
) -> ImageListDataset:
    """The images of ``root/<class>/`` (``split=None`` or ``"all"``) or ``root/<split>/<class>/``; with
    ``test_classes``, one side of a seeded class-disjoint split of the flat ``root/<class>/`` folder.

    Args:
        root: the folder of class folders (or of split folders of class folders).
        split: a sub-folder name, None / ``"all"`` (the class folders directly under root); with ``test_classes``
            ``"train"`` or ``"test"`` (the two sides of the split).
        transform: applied to each PIL RGB image.
        skip_bad_images: drop unreadable images at construction (see ``ImageListDataset``).
        test_classes: hold out this many classes (int >= 1) or this fraction of them (float in (0, 1)) of a flat
            folder as the test split (:func:`recallk.data.splits.class_disjoint_split` on the class folder names:
            the split depends on the names and ``test_seed`` only). None: the folder's own layout.
        test_seed: the seed of that split (any int).
        progress: show the tqdm bar of the ``skip_bad_images`` check (False: none).

    The dataset's ``root`` (absolute), ``split`` and ``options`` (``test_classes``, ``test_seed`` when given) say
    how to build it again (a Trainer run records them in its config.yaml, so that ``recallk eval`` evaluates the
    held-out test classes).

    Raises:
        ValueError: ambiguous split (root has ``train/`` and ``test/`` but no split was given), ``test_classes``
            on a root that already has ``train/`` and ``test/`` folders or with a split other than train/test, a
            bad ``test_classes``; DatasetFileNotFoundError: missing root or split folder, no images;
            SymlinkLoopError: a link loop.
    """
    if test_classes is None:
        return _build_folder_tree(root, split, transform, skip_bad_images, progress)
    base = resolve_root(root, "folder")
    if split not in SPLIT_NAMES:
        raise ValueError(f"with test_classes (a class-disjoint split of the flat folder {base}) the split must be "
                         f"'train' or 'test', got {split!r}; without test_classes a folder is used as laid out")
    if (base / "train").is_dir() and (base / "test").is_dir():
        raise ValueError(f"{base} already holds train/ and test/ folders: leave out test_classes "
                         f"(data.options.test_classes) to use them, or point root at a flat <class>/<image> folder")
    paths, keys, _ = _parse(base, None)
    names, labels = np.unique(np.array(keys, dtype=str), return_inverse=True)
    kept, held = class_disjoint_split(labels.reshape(-1), test_classes, test_seed, class_names=list(names),
                                      what="test_classes")
    chosen = held if split == "test" else kept
    name = f"folder/{split} (test_classes={test_classes}, test_seed={test_seed})"
    options = {"test_classes": test_classes, "test_seed": test_seed, **({"skip_bad_images": True} if skip_bad_images
                                                                        else {})}
    return ImageListDataset([paths[i] for i in chosen], [keys[i] for i in chosen], transform, None,
                            skip_bad_images, name=name, root=absolute_root(base), split=split, options=options,
                            progress=progress)


register_dataset(DatasetSpec("folder", build_folder, splits=None, eval_ks=(1, 2, 4, 8)))
