"""build_dataset's checks of names, splits and options, and the per-dataset evaluation k's."""

from __future__ import annotations

import pytest

import recallk.data as data
from recallk.data import build_dataset, dataset_spec


def test_every_dataset_has_splits_and_eval_ks():
    assert set(data.DATASET_SPECS) == {"sop", "cub", "cars196", "inaturalist", "vehicleid", "folder", "kanji",
                                       "inshop", "roxford5k", "rparis6k"}
    eval_ks = {name: spec.eval_ks for name, spec in data.DATASET_SPECS.items()}
    assert eval_ks["inaturalist"] == (1, 4, 16, 32)
    assert eval_ks["sop"] == (1, 10, 100, 1000)
    assert eval_ks["vehicleid"] == (1, 5)
    assert eval_ks["cars196"] == eval_ks["cub"] == (1, 2, 4, 8, 16)
    assert eval_ks["kanji"] == eval_ks["folder"] == (1, 2, 4, 8)
    assert dataset_spec("vehicleid").splits == ("train", "test_small", "test_medium", "test_large")
    assert dataset_spec("kanji").build is data.kanji.build_kanji and dataset_spec("folder").splits is None


def test_spec_protocol_and_options():
    assert dataset_spec("vehicleid").eval_splits == ("test_small", "test_medium", "test_large")
    assert {dataset_spec(n).eval_splits for n in ("sop", "cub", "cars196", "inaturalist", "folder", "kanji")} == {
        ("test",)
    }
    assert dataset_spec("sop").options == {"skip_bad_images", "progress"}
    assert dataset_spec("kanji").options == {"max_classes", "fonts", "size", "mode", "num_workers", "progress"}
    assert dataset_spec("kanji").image_size == 64 and dataset_spec("sop").image_size is None
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'; choose from \['cars196', 'cub'"):
        dataset_spec("imagenet")
    with pytest.raises(ValueError, match="already registered"):
        data.register_dataset(dataset_spec("sop"))


def test_unknown_name_split_and_option(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        build_dataset("imagenet", tmp_path)
    with pytest.raises(ValueError, match="has splits"):
        build_dataset("sop", tmp_path, "val")
    with pytest.raises(ValueError, match="skip_bad_images"):
        build_dataset("kanji", tmp_path, "train", skip_bad_images=True)
    with pytest.raises(ValueError, match="needs root"):
        build_dataset("cub", None, "train")
