"""build_dataset's checks of names, splits and options, and the per-dataset evaluation k's."""

from __future__ import annotations

import pytest

from recallk.data import DATASETS, DEFAULT_EVAL_KS, SPLITS, build_dataset


def test_every_dataset_has_splits_and_eval_ks():
    assert set(DATASETS) == {"sop", "cub", "cars196", "inaturalist", "vehicleid", "folder", "kanji"}
    assert set(DEFAULT_EVAL_KS) == set(DATASETS) == set(SPLITS)
    assert DEFAULT_EVAL_KS["inaturalist"] == (1, 4, 16, 32)
    assert DEFAULT_EVAL_KS["sop"] == (1, 10, 100, 1000)
    assert DEFAULT_EVAL_KS["vehicleid"] == (1, 5)
    assert DEFAULT_EVAL_KS["cars196"] == DEFAULT_EVAL_KS["cub"] == (1, 2, 4, 8, 16)
    assert DEFAULT_EVAL_KS["kanji"] == DEFAULT_EVAL_KS["folder"] == (1, 2, 4, 8)
    assert SPLITS["vehicleid"] == ("train", "test_small", "test_medium", "test_large")


def test_unknown_name_split_and_option(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        build_dataset("imagenet", tmp_path)
    with pytest.raises(ValueError, match="has splits"):
        build_dataset("sop", tmp_path, "val")
    with pytest.raises(ValueError, match="skip_bad_images"):
        build_dataset("kanji", tmp_path, "train", skip_bad_images=True)
    with pytest.raises(ValueError, match="needs root"):
        build_dataset("cub", None, "train")
