"""iNaturalist 2018 with the split of Brown et al. (Smooth-AP): lists ``Inat_dataset_splits/*_set1.txt``.

Each list line is an image path relative to the root, ``.../<supercategory>/<category_id>/<file>.jpg``; the
class is ``<supercategory>/<category_id>``. 5,690 train classes, 2,452 test classes.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from recallk.data.datasets.base import image_list_builder, read_lines, require
from recallk.data.registry import DatasetSpec, register_dataset

_LISTS = {
    "train": "Inat_dataset_splits/Inaturalist_train_set1.txt",
    "test": "Inat_dataset_splits/Inaturalist_test_set1.txt",
}


def _parse(base: Path, split: str) -> tuple[list[Path], list[str], None]:
    """iNaturalist 2018 split ``"train"`` or ``"test"``; class names ``"<supercategory>/<category_id>"``.

    Raises:
        ValueError: a listed path with fewer than three parts.
        DatasetFileNotFoundError: the root, the list file or the first image is missing.
    """
    list_file = require(
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
    return paths, keys, None


build_inaturalist = image_list_builder("inaturalist", _parse)
register_dataset(DatasetSpec("inaturalist", build_inaturalist, splits=tuple(_LISTS), eval_ks=(1, 4, 16, 32)))
