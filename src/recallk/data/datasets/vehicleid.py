"""PKU VehicleID (``VehicleID_V1.0/``): lists under ``train_test_split/``, images at ``image/<name>.jpg``.

Lists hold lines ``image_name vehicle_id``: ``train_list.txt`` for training and ``test_list_800.txt``,
``test_list_1600.txt``, ``test_list_2400.txt`` for the small, medium and large test sets (each evaluated
leave-one-out over all its images).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from recallk.data.datasets.base import ImageListDataset, read_lines, require_file, resolve_root

SPLITS = ("train", "test_small", "test_medium", "test_large")
_LISTS = {
    "train": "train_list.txt",
    "test_small": "test_list_800.txt",
    "test_medium": "test_list_1600.txt",
    "test_large": "test_list_2400.txt",
}


def build_vehicleid(
    root: str | os.PathLike | None,
    split: str = "train",
    transform: Callable | None = None,
    skip_bad_images: bool = False,
) -> ImageListDataset:
    """VehicleID split ``train``, ``test_small``, ``test_medium`` or ``test_large`` (classes: vehicle ids).

    Raises:
        ValueError: a malformed list line.
        DatasetFileNotFoundError: the root, the list file or the first image is missing.
    """
    base = resolve_root(root, "vehicleid")
    list_file = require_file(
        base / "train_test_split" / _LISTS[split], f"VehicleID {split} list", "root must be VehicleID_V1.0/."
    )
    paths, keys = [], []
    for n, line in enumerate(read_lines(list_file), start=1):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{list_file}:{n}: expected 'image_name vehicle_id', got {line!r}")
        paths.append(base / "image" / f"{parts[0]}.jpg")
        keys.append(int(parts[1]))
    return ImageListDataset(paths, keys, transform, skip_bad_images=skip_bad_images, name=f"vehicleid/{split}")
