"""The contract of every registered dataset, parametrised over the registry: a new dataset is tested by adding it
(and a miniature tree writer for it in tests/helpers/dataset_trees.py; without one its tests fail)."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from recallk.data import DATASET_SPECS, DatasetFileNotFoundError, build_dataset, build_transforms, dataset_spec
from tests.helpers.dataset_trees import TREES

NAMES = sorted(DATASET_SPECS)


def _tree(name: str):
    assert name in TREES, f"dataset {name!r} is registered but has no miniature tree in tests/helpers/dataset_trees.py"
    return TREES[name]


@pytest.mark.parametrize("name", NAMES)
def test_protocol_is_valid(name):
    spec = dataset_spec(name)
    assert spec.name == name and callable(spec.build)
    assert spec.eval_splits and (spec.splits is None or set(spec.eval_splits) <= set(spec.splits))
    assert spec.eval_ks and all(isinstance(k, int) and k > 0 for k in spec.eval_ks)
    assert list(spec.eval_ks) == sorted(set(spec.eval_ks))


#: the options docs/datasets.md documents for each dataset, written by hand (revisited: its distractor folder)
IMAGE_OPTIONS = frozenset({"skip_bad_images", "progress"})
DOCUMENTED_OPTIONS = {
    **dict.fromkeys(("cars196", "cub", "inaturalist", "inshop", "sop", "vehicleid"), IMAGE_OPTIONS),
    "folder": IMAGE_OPTIONS | {"test_classes", "test_seed"},
    "kanji": frozenset({"max_classes", "fonts", "size", "mode", "num_workers", "progress"}),
    **dict.fromkeys(("roxford5k", "rparis6k"), frozenset({"distractors"})),
}


@pytest.mark.parametrize("name", NAMES)
def test_options_are_the_documented_ones_and_others_are_refused(name, tmp_path):
    assert name in DOCUMENTED_OPTIONS, f"document the options of dataset {name!r} (docs/datasets.md) and list them here"
    assert dataset_spec(name).options == DOCUMENTED_OPTIONS[name]
    with pytest.raises(ValueError, match=re.escape(f"valid: {sorted(DOCUMENTED_OPTIONS[name])}")):
        build_dataset(name, tmp_path, dataset_spec(name).eval_splits[0], no_such_option=1)


@pytest.mark.parametrize("name", NAMES)
def test_missing_root(name, tmp_path):
    root = tmp_path / "missing"
    if _tree(name).root_is_cache:
        build_dataset(name, root, dataset_spec(name).eval_splits[0], **_tree(name).options)
        assert root.is_dir()
        return
    with pytest.raises(DatasetFileNotFoundError, match=name) as err:
        build_dataset(name, root, dataset_spec(name).eval_splits[0])
    assert str(root) in str(err.value)


@pytest.mark.parametrize("name", NAMES)
def test_built_from_a_miniature_tree(name, tmp_path):
    spec, tree = dataset_spec(name), _tree(name)
    tree.write(tmp_path)
    for split in dict.fromkeys(spec.splits or ("train", *spec.eval_splits)):
        ds = build_dataset(name, tmp_path, split, **tree.options)
        assert isinstance(ds.labels, np.ndarray) and ds.labels.dtype == np.int64 and ds.labels.shape == (len(ds),)
        assert len(ds) > 0 and sorted(set(ds.labels.tolist())) == list(range(len(ds.classes)))
        for i in range(len(ds)):
            image, label = ds[i]
            assert isinstance(image, Image.Image) and image.mode == "RGB" and label == ds.labels[i]
        sized = build_dataset(name, tmp_path, split, lambda im: ("size", im.size), **tree.options)
        assert sized[0] == (("size", ds[0][0].size), ds.labels[0])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["train", "test"])
def test_transforms_make_square_tensors_of_the_default_size(name, kind):
    size = dataset_spec(name).image_size or 224
    out = build_transforms(kind, dataset=name)(Image.new("RGB", (90, 70), (255, 255, 255)))
    assert out.shape == (3, size, size) and out.dtype == torch.float32


@pytest.mark.parametrize("name", NAMES)
def test_what_a_trainer_run_records_rebuilds_the_same_split(name, tmp_path, monkeypatch):
    """A Trainer API run records ``data.dataset/root/train_split/options`` from its training set's ``data_spec``
    (what ``build_dataset`` records; engine.run_config reads it): rebuilding from the record gives the same
    items."""
    from recallk.engine.run_config import _data_section

    spec, tree = dataset_spec(name), _tree(name)
    (tmp_path / "data").mkdir()
    tree.write(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # a relative root is recorded absolute
    split = (spec.splits or ("train",))[0]
    built = build_dataset(name, "data", split, **tree.options)
    record = _data_section(built, num_workers=0)
    files = [os.path.abspath(p) for p in getattr(built, "paths", [])]
    assert record["dataset"] == name and record["train_split"] == split
    assert record["root"] == str(tmp_path / "data")
    assert built.data_spec == {"dataset": name, "root": str(tmp_path / "data"), "split": split,
                               "options": record["options"]}  # what build_dataset recorded, read as is
    monkeypatch.chdir(tmp_path.parent)
    again = build_dataset(name, record["root"], record["train_split"], **record["options"])
    assert np.array_equal(again.labels, built.labels) and again.classes == built.classes
    assert getattr(again, "paths", []) == files
