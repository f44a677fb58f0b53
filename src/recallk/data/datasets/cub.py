"""CUB-200-2011 (``CUB_200_2011/``): ``images.txt`` (``id path``), ``image_class_labels.txt`` (``id class``).

Images live under ``images/<path>``. Classes 1-100 are train and 101-200 test; the official
``train_test_split.txt`` is ignored (the deep-metric-learning protocol). Class names come from ``classes.txt``
(``id name``) when it exists, else the ids.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from recallk.data.datasets.base import ImageListDataset, read_lines, require_file, resolve_root

SPLITS = ("train", "test")
_CLASS_RANGE = {"train": range(1, 101), "test": range(101, 201)}


def _id_table(path) -> dict[str, str]:
    table = {}
    for n, line in enumerate(read_lines(path), start=1):
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected two fields 'id value', got {line!r}")
        table[parts[0]] = parts[1]
    return table


def build_cub(
    root: str | os.PathLike | None,
    split: str = "train",
    transform: Callable | None = None,
    skip_bad_images: bool = False,
) -> ImageListDataset:
    """CUB split ``"train"`` (classes 1-100) or ``"test"`` (classes 101-200), in ``images.txt`` order.

    Raises:
        ValueError: malformed list or an image id without a class.
        DatasetFileNotFoundError: the root, a list file or the first image is missing.
    """
    base = resolve_root(root, "cub")
    hint = "root must be CUB_200_2011/."
    images = _id_table(require_file(base / "images.txt", "CUB image list", hint))
    labels = _id_table(require_file(base / "image_class_labels.txt", "CUB class labels", hint))
    names_file = base / "classes.txt"
    names = {int(k): v for k, v in _id_table(names_file).items()} if names_file.is_file() else {}
    wanted = _CLASS_RANGE[split]
    paths, keys = [], []
    for image_id, rel in images.items():
        if image_id not in labels:
            raise ValueError(f"CUB image id {image_id} ({rel}) has no line in image_class_labels.txt")
        cls = int(labels[image_id])
        if cls in wanted:
            paths.append(base / "images" / rel)
            keys.append(cls)
    return ImageListDataset(paths, keys, transform, names, skip_bad_images=skip_bad_images, name=f"cub/{split}")
