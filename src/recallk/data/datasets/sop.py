"""Stanford Online Products (``Stanford_Online_Products/``): ``Ebay_train.txt`` / ``Ebay_test.txt``.

Each list has a header line, then ``image_id class_id super_class_id path`` with paths relative to the root.
Classes 1-11,318 are train (59,551 images), 11,319-22,634 test (60,502 images), as the lists say.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from recallk.data.datasets.base import ImageListDataset, read_lines, require_file, resolve_root

SPLITS = ("train", "test")
_LISTS = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}


def build_sop(
    root: str | os.PathLike | None,
    split: str = "train",
    transform: Callable | None = None,
    skip_bad_images: bool = False,
) -> ImageListDataset:
    """SOP split ``"train"`` or ``"test"``; class names are the SOP class ids as strings.

    Raises:
        ValueError: unknown split or a malformed list line.
        DatasetFileNotFoundError: the root, list file or first image is missing.
    """
    base = resolve_root(root, "sop")
    list_file = require_file(base / _LISTS[split], f"SOP {split} list", "root must be Stanford_Online_Products/.")
    paths, keys = [], []
    for n, line in enumerate(read_lines(list_file)[1:], start=2):
        parts = line.split()
        if len(parts) != 4:
            raise ValueError(f"{list_file}:{n}: expected 'image_id class_id super_class_id path', got {line!r}")
        keys.append(int(parts[1]))
        paths.append(base / parts[3])
    return ImageListDataset(paths, keys, transform, skip_bad_images=skip_bad_images, name=f"sop/{split}")
