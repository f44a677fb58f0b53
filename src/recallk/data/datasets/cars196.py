"""Cars196 / Stanford Cars: ``cars_annos.mat`` (struct array ``annotations`` and ``class_names``) and ``car_ims/``.

Classes 1-98 are train and 99-196 test, all images of each class (the ``test`` flag and the boxes are not used).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from recallk.data.datasets.base import image_list_builder, require
from recallk.data.registry import DatasetSpec, register_dataset

_CLASS_RANGE = {"train": range(1, 99), "test": range(99, 197)}


def _read_annotations(mat_file: Path) -> tuple[list[str], list[int], list[str]]:
    try:
        mat = scipy.io.loadmat(mat_file, squeeze_me=True, struct_as_record=True)
    except (ValueError, OSError, TypeError) as e:
        raise ValueError(f"cannot read {mat_file} as a MATLAB file: {e}") from e
    if "annotations" not in mat:
        raise ValueError(f"{mat_file} has no 'annotations' struct array (keys: {sorted(mat)})")
    ann = np.atleast_1d(mat["annotations"])
    fields = ann.dtype.names or ()
    for field in ("relative_im_path", "class"):
        if field not in fields:
            raise ValueError(f"{mat_file}: 'annotations' lacks the field {field!r} (fields: {fields})")
    rel = [str(x) for x in ann["relative_im_path"]]
    cls = [int(x) for x in ann["class"]]
    names = [str(x) for x in np.atleast_1d(mat["class_names"])] if "class_names" in mat else []
    return rel, cls, names


def _parse(base: Path, split: str) -> tuple[list[Path], list[int], dict[int, str]]:
    """Cars196 split ``"train"`` (classes 1-98) or ``"test"`` (99-196); class names from ``class_names``.

    Raises:
        ValueError: the .mat file is unreadable or lacks the fields above.
        DatasetFileNotFoundError: the root, ``cars_annos.mat`` or the first image is missing.
    """
    mat_file = require(
        base / "cars_annos.mat", "Cars196 annotations", "root must be the folder holding cars_annos.mat and car_ims/."
    )
    rel, cls, names = _read_annotations(mat_file)
    wanted = _CLASS_RANGE[split]
    keep = [i for i, c in enumerate(cls) if c in wanted]
    return [base / rel[i] for i in keep], [cls[i] for i in keep], {i + 1: n for i, n in enumerate(names)}


build_cars196 = image_list_builder("cars196", _parse)
register_dataset(DatasetSpec("cars196", build_cars196, splits=tuple(_CLASS_RANGE), eval_ks=(1, 2, 4, 8, 16)))
