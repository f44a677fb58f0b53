"""Cars196 / Stanford Cars: ``cars_annos.mat`` and ``car_ims/``.

``cars_annos.mat`` holds a MATLAB struct array ``annotations`` (fields ``relative_im_path``, ``bbox_x1`` ..
``bbox_y2``, ``class``, ``test``) and ``class_names``. Images are at ``<root>/<relative_im_path>``.
Classes 1-98 are train and 99-196 test, with all images of each class (the ``test`` flag is ignored);
boxes are not used.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import scipy.io

from recallk.data.datasets.base import ImageListDataset, require_file, resolve_root

SPLITS = ("train", "test")
_CLASS_RANGE = {"train": range(1, 99), "test": range(99, 197)}


def _read_annotations(mat_file) -> tuple[list[str], list[int], list[str]]:
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


def build_cars196(
    root: str | os.PathLike | None,
    split: str = "train",
    transform: Callable | None = None,
    skip_bad_images: bool = False,
) -> ImageListDataset:
    """Cars196 split ``"train"`` (classes 1-98) or ``"test"`` (99-196); class names from ``class_names``.

    Raises:
        ValueError: the .mat file is unreadable or lacks the fields above.
        DatasetFileNotFoundError: the root, ``cars_annos.mat`` or the first image is missing.
    """
    base = resolve_root(root, "cars196")
    mat_file = require_file(
        base / "cars_annos.mat",
        "Cars196 annotations",
        "root must be the folder holding cars_annos.mat and car_ims/.",
    )
    rel, cls, names = _read_annotations(mat_file)
    wanted = _CLASS_RANGE[split]
    keep = [i for i, c in enumerate(cls) if c in wanted]
    class_names = {i + 1: n for i, n in enumerate(names)}
    return ImageListDataset(
        [base / rel[i] for i in keep],
        [cls[i] for i in keep],
        transform,
        class_names,
        skip_bad_images=skip_bad_images,
        name=f"cars196/{split}",
    )
