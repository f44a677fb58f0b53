"""``recallk eval --checkpoint C --query D --gallery D`` (one image folder as both, a new user's trial): each query
image leaves its own gallery copy out, as in leave-one-out, and a note says so, as ``--query-embeddings A.npz
--gallery-embeddings A.npz`` does (tests/retrieval/test_queries_in_gallery.py). Checked against ``recallk eval
--split all`` of the folder and against the brute-force definitions of the metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recallk.cli.main import main
from recallk.data import build_dataset
from recallk.data.transforms import transforms_for_model
from recallk.evaluation import embed_dataset
from recallk.retrieval import load_model
from recallk.testing.retrieval import reference_retrieval_metrics
from tests.helpers.image_folders import write_image_folder
from tests.helpers.retrieval import make_untrained_run

KS = (1, 2, 4)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_untrained_run(tmp_path_factory.mktemp("run") / "run", embed_dim=8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """6 class folders of 4 very noisy copies of a pattern (noisy enough that leave-one-out recall@1 is not 1)."""
    return write_image_folder(tmp_path_factory.mktemp("photos") / "photos", 6, noise=0.9, seed=7)


def run_eval(capsys, *args):
    assert main(["eval", "--no-progress", "--device", "cpu", "--ks", *map(str, KS), *args]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


def embed(checkpoint, folder):
    """The folder's embeddings, class names and resolved file paths, computed by the library (not through
    recallk eval)."""
    model, _ = load_model(checkpoint)
    dataset = build_dataset("folder", folder, None, transforms_for_model(model, "test", dataset="folder",
                                                                          image_size=32))
    embeddings, _ = embed_dataset(model, dataset, device="cpu", progress=False)
    return embeddings, np.asarray(dataset.classes)[dataset.labels], [Path(p).resolve() for p in dataset.paths]


def assert_same(got, expected):
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_one_folder_as_query_and_gallery_is_leave_one_out(checkpoint, photos, capsys):
    got, err = run_eval(capsys, "--checkpoint", str(checkpoint), "--query", str(photos), "--gallery", str(photos))
    got = got["query"]
    emb, names, _ = embed(checkpoint, photos)
    labels = np.unique(names, return_inverse=True)[1]
    expected = reference_retrieval_metrics(emb, labels, KS)  # leave-one-out of the folder's images
    assert expected["recall@1"] < 1.0 and expected["num_queries"] == 24  # a query finding itself would show
    assert_same(got, expected)
    assert "recallk eval: note: 24 of 24 queries are also in the gallery (same path)" in err, err
    assert "left out" in err

    # the same as the folder evaluated leave-one-out by recallk eval itself (split 'all')
    loo, err = run_eval(capsys, "--checkpoint", str(checkpoint), "--dataset", "folder", "--root", str(photos),
                        "--split", "all")
    assert_same(got, loo["all"])
    assert "queries are also in the gallery" not in err


def test_a_query_folder_partly_in_the_gallery_leaves_out_only_its_own_copies(checkpoint, photos, tmp_path, capsys):
    """Queries: two class folders linked to the gallery's (the same files, matched by resolved path), one class
    with new images of a gallery class, one class the gallery lacks (excluded)."""
    query = tmp_path / "query"
    query.mkdir()
    for name in ("class00", "class03"):
        (query / name).symlink_to(photos / name, target_is_directory=True)
    write_image_folder(query, {None: [1]}, noise=0.9, seed=8)  # class01: 4 new images of a gallery class
    write_image_folder(query, {None: [9]}, per_class=2, noise=0.9, seed=9)  # class09: not in the gallery
    got, err = run_eval(capsys, "--checkpoint", str(checkpoint), "--query", str(query), "--gallery", str(photos))
    got = got["query"]
    assert "recallk eval: note: 8 of 14 queries are also in the gallery (same path)" in err, err

    q_emb, q_names, q_paths = embed(checkpoint, query)
    g_emb, g_names, g_paths = embed(checkpoint, photos)
    own = [g_paths.index(p) if p in g_paths else -1 for p in q_paths]
    assert sum(o >= 0 for o in own) == 8
    # brute force, query by query: the gallery without the query's own copy; positives: the same class name
    per_query = []
    for i, name in enumerate(q_names):
        keep = np.arange(len(g_emb)) != own[i]
        if name not in g_names[keep]:
            continue  # no positive: excluded (counted below)
        per_query.append(reference_retrieval_metrics(q_emb[i : i + 1], np.ones(1, np.int64), KS, ref_emb=g_emb[keep],
                                                     ref_labels=(g_names[keep] == name).astype(np.int64)))
    used = sum(m["num_queries"] for m in per_query)
    expected = {key: sum(m[key] * m["num_queries"] for m in per_query) / used
                for key in per_query[0] if not key.startswith("num_")}
    expected |= {"num_queries": used, "num_excluded_queries": len(q_names) - used}
    assert used == 12  # the 2 queries of class09 have no positive
    assert_same(got, expected)
