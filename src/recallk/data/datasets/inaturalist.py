"""iNaturalist 2018 with the split of Brown et al. (Smooth-AP).

Lists ``Inat_dataset_splits/Inaturalist_train_set1.txt`` and ``Inaturalist_test_set1.txt`` hold one image path
per line relative to the root (``train_val2018/<supercategory>/<category_id>/<file>.jpg``); the class is
``<supercategory>/<category_id>``, the last two folders. 5,690 train classes, 2,452 test classes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import PurePosixPath

from recallk.data.datasets.base import ImageListDataset, read_lines, require_file, resolve_root

SPLITS = ("train", "test")
_LISTS = {
    "train": "Inat_dataset_splits/Inaturalist_train_set1.txt",
    "test": "Inat_dataset_splits/Inaturalist_test_set1.txt",
}


def build_inaturalist(
    root: str | os.PathLike | None,
    split: str = "train",
    transform: Callable | None = None,
    skip_bad_images: bool = False,
) -> ImageListDataset:
    """iNaturalist 2018 split ``"train"`` or ``"test"``; class names ``"<supercategory>/<category_id>"``.

    Raises:
        ValueError: a listed path with fewer than three parts.
        DatasetFileNotFoundError: the root, the list file or the first image is missing.
    """
    base = resolve_root(root, "inaturalist")
    list_file = require_file(
        base / _LISTS[split],
        f"iNaturalist {split} list",
        "Get the Brown et al. split lists (Inat_dataset_splits/) and put them in the iNaturalist root.",
    )
    paths, keys = [], []
    for n, line in enumerate(read_lines(list_file), start=1):
        parts = PurePosixPath(line).parts
        if len(parts) < 3:
            raise ValueError(f"{list_file}:{n}: expected '<...>/<supercategory>/<category_id>/<file>', got {line!r}")
        keys.append(f"{parts[-3]}/{parts[-2]}")
        paths.append(base / line)
    return ImageListDataset(paths, keys, transform, skip_bad_images=skip_bad_images, name=f"inaturalist/{split}")
