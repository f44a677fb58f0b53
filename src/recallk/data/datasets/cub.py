"""CUB-200-2011 (``CUB_200_2011/``): ``images.txt``, ``image_class_labels.txt``, optional ``classes.txt``.

Classes 1-100 are train and 101-200 test; the official ``train_test_split.txt`` is ignored (the
deep-metric-learning protocol). Class names come from ``classes.txt`` when it exists, else the ids.
"""

from __future__ import annotations

from pathlib import Path

from recallk.data.datasets.base import image_list_builder, read_rows, require
from recallk.data.registry import DatasetSpec, register_dataset

_CLASS_RANGE = {"train": range(1, 101), "test": range(101, 201)}


def _id_table(path: Path) -> dict[str, str]:
    return dict(read_rows(path, 2, "two fields 'id value'", maxsplit=1))


def _parse(base: Path, split: str) -> tuple[list[Path], list[int], dict[int, str]]:
    """CUB split ``"train"`` (classes 1-100) or ``"test"`` (classes 101-200), in ``images.txt`` order.

    Raises:
        ValueError: malformed list or an image id without a class.
        DatasetFileNotFoundError: the root, a list file or the first image is missing.
    """
    hint = "root must be CUB_200_2011/."
    images = _id_table(require(base / "images.txt", "CUB image list", hint))
    labels = _id_table(require(base / "image_class_labels.txt", "CUB class labels", hint))
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
    return paths, keys, names


build_cub = image_list_builder("cub", _parse)
register_dataset(DatasetSpec("cub", build_cub, splits=tuple(_CLASS_RANGE), eval_ks=(1, 2, 4, 8, 16)))
