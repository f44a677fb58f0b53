"""Each benchmark loader on its miniature tree (tests/helpers/dataset_trees.py): items, labels, classes, errors.

Expected labels, class names and splits come from the lists the trees write, not from the loaders.
"""

from __future__ import annotations

import re
import warnings

import pytest

from recallk.data import BadImageError, DatasetFileNotFoundError, build_dataset
from tests.helpers.dataset_trees import (
    check_items,
    make_cars,
    make_cub,
    make_folder,
    make_inat,
    make_sop,
    make_vehicleid,
)

# --------------------------------------------------------------------------------------------------- SOP


def test_sop(tmp_path):
    expected, colours = make_sop(tmp_path)
    for split in ("train", "test"):
        ds = build_dataset("sop", tmp_path, split)
        check_items(ds, expected[split], colours)
    assert len(build_dataset("sop", tmp_path, "train").classes) == 2
    assert len(build_dataset("sop", tmp_path, "test").classes) == 2


def test_sop_missing_list_names_the_file(tmp_path):
    make_sop(tmp_path)
    (tmp_path / "Ebay_test.txt").unlink()
    with pytest.raises(DatasetFileNotFoundError, match=re.escape("Ebay_test.txt")) as err:
        build_dataset("sop", tmp_path, "test")
    assert str(tmp_path) in str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, FileNotFoundError)


def test_missing_root_and_missing_first_image(tmp_path):
    with pytest.raises(DatasetFileNotFoundError, match="nowhere"):
        build_dataset("sop", tmp_path / "nowhere", "train")
    make_sop(tmp_path)
    (tmp_path / "bicycle_final/111_0.JPG").unlink()
    with pytest.raises(DatasetFileNotFoundError, match=re.escape("111_0.JPG")):
        build_dataset("sop", tmp_path, "train")


# --------------------------------------------------------------------------------------------------- CUB


def test_cub_class_split(tmp_path):
    expected, colours = make_cub(tmp_path)
    for split in ("train", "test"):
        check_items(build_dataset("cub", tmp_path, split), expected[split], colours)


def test_cub_missing_labels_file(tmp_path):
    make_cub(tmp_path)
    (tmp_path / "image_class_labels.txt").unlink()
    with pytest.raises(DatasetFileNotFoundError, match=re.escape("image_class_labels.txt")):
        build_dataset("cub", tmp_path, "train")


# --------------------------------------------------------------------------------------------------- Cars196


def test_cars196_class_split_from_mat(tmp_path):
    expected, colours = make_cars(tmp_path)
    for split in ("train", "test"):
        check_items(build_dataset("cars196", tmp_path, split), expected[split], colours)


def test_cars196_missing_mat(tmp_path):
    with pytest.raises(DatasetFileNotFoundError, match=re.escape("cars_annos.mat")):
        build_dataset("cars196", tmp_path, "train")


# --------------------------------------------------------------------------------------------------- iNaturalist


def test_inaturalist(tmp_path):
    expected, colours = make_inat(tmp_path)
    for split in ("train", "test"):
        check_items(build_dataset("inaturalist", tmp_path, split), expected[split], colours)
    assert build_dataset("inaturalist", tmp_path, "train").classes == ["Aves/7", "Plantae/100"]


def test_inaturalist_missing_list(tmp_path):
    with pytest.raises(DatasetFileNotFoundError, match=re.escape("Inaturalist_train_set1.txt")):
        build_dataset("inaturalist", tmp_path, "train")


# --------------------------------------------------------------------------------------------------- VehicleID


def test_vehicleid_all_splits(tmp_path):
    expected, colours = make_vehicleid(tmp_path)
    for split in ("train", "test_small", "test_medium", "test_large"):
        check_items(build_dataset("vehicleid", tmp_path, split), expected[split], colours)


def test_vehicleid_missing_test_list(tmp_path):
    make_vehicleid(tmp_path)
    (tmp_path / "train_test_split/test_list_2400.txt").unlink()
    with pytest.raises(DatasetFileNotFoundError, match=re.escape("test_list_2400.txt")):
        build_dataset("vehicleid", tmp_path, "test_large")


# --------------------------------------------------------------------------------------------------- folder


def test_folder_with_splits(tmp_path):
    expected, colours = make_folder(tmp_path)
    for split in ("train", "test"):
        check_items(build_dataset("folder", tmp_path, split), expected[split], colours)
    with pytest.raises(ValueError, match="split"):
        build_dataset("folder", tmp_path, None)


def test_folder_without_splits(tmp_path):
    expected, colours = make_folder(tmp_path)
    ds = build_dataset("folder", tmp_path / "train", None)
    check_items(ds, expected["train"], colours)
    with pytest.raises(DatasetFileNotFoundError, match="train"):
        build_dataset("folder", tmp_path / "train", "train")
    with pytest.raises(DatasetFileNotFoundError, match="no images"):
        build_dataset("folder", tmp_path / "train" / "cat", None)


# --------------------------------------------------------------------------------------------------- bad images


def test_corrupt_image_fails_naming_the_file_unless_skipped(tmp_path):
    expected, colours = make_sop(tmp_path)
    garbage = tmp_path / "chair_final/2_0.JPG"
    garbage.write_bytes(b"this is not a jpeg" * 10)
    truncated = tmp_path / "bicycle_final/111_1.JPG"
    truncated.write_bytes(truncated.read_bytes()[:200])
    ds = build_dataset("sop", tmp_path, "train")
    assert len(ds) == 3
    ds[0]
    for i, bad in ((1, truncated), (2, garbage)):
        with pytest.raises(BadImageError, match=re.escape(bad.name)) as err:
            ds[i]
        assert err.value.path == str(bad) and "skip_bad_images" in str(err.value)

    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        ds = build_dataset("sop", tmp_path, "train", skip_bad_images=True)
    assert sorted(ds.skipped) == sorted([str(truncated), str(garbage)])
    check_items(ds, expected["train"][:1], colours)


def test_skip_bad_images_is_silent_on_a_clean_tree(tmp_path):
    expected, colours = make_sop(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = build_dataset("sop", tmp_path, "test", skip_bad_images=True)
    assert ds.skipped == []
    check_items(ds, expected["test"], colours)


def test_transform_is_applied(tmp_path):
    make_sop(tmp_path)
    ds = build_dataset("sop", tmp_path, "train", transform=lambda im: im.size)
    assert ds[0] == ((12, 10), ds.labels[0])
