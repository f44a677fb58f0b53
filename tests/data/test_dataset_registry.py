"""build_dataset's checks of names, splits and options, the per-dataset evaluation k's, and the deprecated dicts."""

from __future__ import annotations

import pytest

import recallk.data as data
from recallk.data import build_dataset, dataset_spec


def test_every_dataset_has_splits_and_eval_ks():
    with pytest.deprecated_call():
        DATASETS, DEFAULT_EVAL_KS, SPLITS = data.DATASETS, data.DEFAULT_EVAL_KS, data.SPLITS
    assert set(DATASETS) == {"sop", "cub", "cars196", "inaturalist", "vehicleid", "folder", "kanji", "inshop",
                             "roxford5k", "rparis6k"}
    assert set(DEFAULT_EVAL_KS) == set(DATASETS) == set(SPLITS)
    assert DEFAULT_EVAL_KS["inaturalist"] == (1, 4, 16, 32)
    assert DEFAULT_EVAL_KS["sop"] == (1, 10, 100, 1000)
    assert DEFAULT_EVAL_KS["vehicleid"] == (1, 5)
    assert DEFAULT_EVAL_KS["cars196"] == DEFAULT_EVAL_KS["cub"] == (1, 2, 4, 8, 16)
    assert DEFAULT_EVAL_KS["kanji"] == DEFAULT_EVAL_KS["folder"] == (1, 2, 4, 8)
    assert SPLITS["vehicleid"] == ("train", "test_small", "test_medium", "test_large")


def test_deprecated_dicts_warn_and_match_the_specs():
    for old, attr in (("DATASETS", "build"), ("SPLITS", "splits"), ("DEFAULT_EVAL_KS", "eval_ks")):
        with pytest.warns(DeprecationWarning, match=rf"recallk\.data\.{old} .*dataset_spec\(name\)\.{attr}"):
            table = getattr(data, old)
        assert table == {name: getattr(spec, attr) for name, spec in data.DATASET_SPECS.items()}
    with pytest.deprecated_call():
        assert data.DATASETS["kanji"] is data.kanji.build_kanji and data.SPLITS["folder"] is None
    with pytest.raises(AttributeError):
        data.NO_SUCH_NAME  # noqa: B018


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
