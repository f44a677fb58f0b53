"""In-Shop and revisited Oxford/Paris loaders on miniature trees (written by tests/helpers/dataset_trees.py)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from recallk.data import DatasetFileNotFoundError, build_dataset, dataset_spec
from tests.helpers.dataset_trees import check_items, make_inshop, make_revisited, write_jpeg


@pytest.mark.parametrize("split", ["train", "query", "gallery"])
def test_inshop_splits(tmp_path, split):
    expected, colours = make_inshop(tmp_path)
    ds = build_dataset("inshop", tmp_path, split)
    check_items(ds, expected[split], colours)


def test_inshop_protocol():
    spec = dataset_spec("inshop")
    assert spec.eval_protocol == "query_gallery" and spec.eval_splits == ("query",)
    assert spec.gallery_split == "gallery" and spec.eval_ks == (1, 10, 20, 30, 40, 50)


def test_inshop_bad_status_and_missing_list(tmp_path):
    with pytest.raises(DatasetFileNotFoundError, match=r"list_eval_partition\.txt"):
        build_dataset("inshop", tmp_path, "query")
    make_inshop(tmp_path)
    path = tmp_path / "list_eval_partition.txt"
    path.write_text(path.read_text().replace(" gallery\n", " test\n", 1))
    with pytest.raises(ValueError, match="evaluation_status must be one of"):
        build_dataset("inshop", tmp_path, "gallery")
    path.write_text(path.read_text() + "img/x.jpg id_1\n")
    with pytest.raises(ValueError, match="expected 'image_name item_id evaluation_status'"):
        build_dataset("inshop", tmp_path, "gallery")


@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_revisited_database_and_ground_truth(tmp_path, name):
    expected, colours = make_revisited(tmp_path, name)
    ds = build_dataset(name, tmp_path, "database")
    check_items(ds, expected["database"], colours)
    assert ds.boxes is None and ds.num_ground_truth_images == len(ds)
    assert [list(g["hard"]) for g in ds.ground_truth] == [[3], [1]]
    assert ds.ground_truth[1]["easy"].dtype == np.int64 and ds.ground_truth[1]["easy"].size == 0
    spec = dataset_spec(name)
    assert (spec.eval_protocol, spec.gallery_split, spec.eval_ks) == ("revisited", "database", (1, 5, 10))


@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_revisited_queries_are_cropped_to_their_box(tmp_path, name):
    expected, colours = make_revisited(tmp_path, name)
    ds = build_dataset(name, tmp_path, "query")
    assert ds.paths == [str(p) for p, _ in expected["query"]]
    # boxes [1, 2, 9, 8] and [0.4, 0.6, 10.5, 9.2] of 12 x 10 images; PIL rounds them to whole pixels
    assert [ds[i][0].size for i in range(len(ds))] == [(8, 6), (10, 8)]
    for i, (path, _) in enumerate(expected["query"]):
        assert np.abs(np.asarray(ds[i][0], dtype=int)[3, 3] - colours[path]).max() <= 6
    np.testing.assert_array_equal(ds.boxes[0], [1.0, 2.0, 9.0, 8.0])
    sized = build_dataset(name, tmp_path, "query", transform=lambda im: im.size)
    assert sized[1] == ((10, 8), ds.labels[1])


def test_r1m_distractors_are_appended_to_the_database(tmp_path):
    (tmp_path / "ox").mkdir()
    make_revisited(tmp_path / "ox", "roxford5k")
    r1m = tmp_path / "revisitop1m"
    names = ["a1/a1b2c3", "ff/ff00ee.jpg"]
    for n, name in enumerate(names):
        write_jpeg(r1m / "jpg" / (name if name.endswith(".jpg") else f"{name}.jpg"), 60 + n)
    (r1m / "revisitop1m.txt").write_text("\n".join(names) + "\n")
    plain = build_dataset("roxford5k", tmp_path / "ox", "database")
    ds = build_dataset("roxford5k", tmp_path / "ox", "database", distractors=r1m)
    assert ds.paths[: len(plain)] == plain.paths and len(ds) == len(plain) + 2
    assert ds.paths[-2:] == [str(r1m / "jpg" / "a1/a1b2c3.jpg"), str(r1m / "jpg" / "ff/ff00ee.jpg")]
    assert [ds.classes[k] for k in ds.labels[-2:]] == ["revisitop1m"] * 2
    assert ds.num_ground_truth_images == len(plain)
    assert ds[len(ds) - 1][0].size == (12, 10)
    queries = build_dataset("roxford5k", tmp_path / "ox", "query", distractors=r1m)  # ignored for queries
    assert len(queries) == 2
    with pytest.raises(DatasetFileNotFoundError, match=r"revisitop1m\.txt"):
        build_dataset("roxford5k", tmp_path / "ox", "database", distractors=tmp_path / "ox")


def test_revisited_bad_ground_truth(tmp_path):
    with pytest.raises(DatasetFileNotFoundError, match=r"gnd_roxford5k\.pkl"):
        build_dataset("roxford5k", tmp_path, "query")
    make_revisited(tmp_path, "roxford5k")
    path = tmp_path / "gnd_roxford5k.pkl"
    good = pickle.loads(path.read_bytes())

    def write(cfg):
        path.write_bytes(pickle.dumps(cfg))

    write({"imlist": good["imlist"]})
    with pytest.raises(ValueError, match="keys 'imlist', 'qimlist' and 'gnd'"):
        build_dataset("roxford5k", tmp_path, "query")
    write({**good, "gnd": good["gnd"][:1]})
    with pytest.raises(ValueError, match="2 query images but 1 ground-truth entries"):
        build_dataset("roxford5k", tmp_path, "query")
    bad = [dict(g) for g in good["gnd"]]
    bad[0]["junk"] = [99]
    write({**good, "gnd": bad})
    with pytest.raises(ValueError, match=r"gnd\[0\]\['junk'\] holds an index outside"):
        build_dataset("roxford5k", tmp_path, "database")
    bad[0] = {**good["gnd"][0], "bbx": [5, 5, 2, 8]}
    write({**good, "gnd": bad})
    with pytest.raises(ValueError, match="bbx"):
        build_dataset("roxford5k", tmp_path, "query")
    path.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read"):
        build_dataset("roxford5k", tmp_path, "query")
    with pytest.raises(ValueError, match="skip_bad_images"):  # would shift the ground-truth indices
        build_dataset("roxford5k", tmp_path, "query", skip_bad_images=True)
