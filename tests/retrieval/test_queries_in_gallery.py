"""Queries that are also in the gallery (issue 24, item 6): `recallk eval --query-embeddings A.npz
--gallery-embeddings A.npz` must not score each query against its own copy. Checked against brute force."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recallk.cli.main import main
from recallk.retrieval import evaluate_embedding_files
from recallk.testing.retrieval import reference_retrieval_metrics

KS = (1, 2, 4)


def embedding_file(path, emb, labels, paths=None):
    """An embedding file in the recallk layout (written here, not by recallk: the reader is under test)."""
    arrays = {"embeddings": emb.astype(np.float32), "labels": np.asarray(labels, np.int64)}
    if paths is not None:
        metadata = {"format": "recallk-embeddings", "format_version": 1, "model_id": "m" * 64}
        arrays.update(paths=np.array(paths, dtype=str), classes=np.array([], dtype=str),
                      metadata=np.array(json.dumps(metadata)))
    np.savez(path, **arrays)
    return path


def data(n=40, d=8, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, d))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = rng.integers(0, classes, n)
    return emb.astype(np.float32), labels, [f"/img/{i:03d}.png" for i in range(n)]


def brute_force(q, q_labels, own, g, g_labels):
    """Each query against the gallery with its own row (own[i] >= 0) removed, from the definitions."""
    per_query = []
    for i in range(len(q)):
        keep = np.arange(len(g)) != own[i]
        per_query.append(reference_retrieval_metrics(q[i : i + 1], q_labels[i : i + 1], KS, ref_emb=g[keep],
                                                     ref_labels=g_labels[keep]))
    used = sum(m["num_queries"] for m in per_query)
    result = {key: sum(m[key] * m["num_queries"] for m in per_query if m["num_queries"]) / used
              for key in per_query[0] if not key.startswith("num_")}
    return result | {"num_queries": used, "num_excluded_queries": len(q) - used}


def assert_same(got, expected):
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_the_same_file_as_queries_and_gallery_is_leave_one_out(tmp_path):
    emb, labels, paths = data()
    a = embedding_file(tmp_path / "a.npz", emb, labels, paths)
    lines = []
    got = evaluate_embedding_files(a, a, KS, notice=lines.append)
    assert_same(got, reference_retrieval_metrics(emb, labels, KS))  # leave-one-out on A alone
    assert got["recall@1"] < 1.0
    assert len(lines) == 1 and "40 of 40 queries are also in the gallery (same path)" in lines[0]
    assert "left out" in lines[0]


def test_files_without_paths_match_by_embedding_and_label(tmp_path):
    emb, labels, _ = data(seed=1)
    a = embedding_file(tmp_path / "a.npz", emb, labels)
    with pytest.warns(UserWarning, match="40 of 40 queries are also in the gallery .same embedding and label"):
        got = evaluate_embedding_files(a, a, KS)
    assert_same(got, reference_retrieval_metrics(emb, labels, KS))


def test_some_queries_in_the_gallery_leave_out_only_their_own_copy(tmp_path):
    emb, labels, paths = data(n=60, seed=2)
    gallery = embedding_file(tmp_path / "g.npz", emb[:45], labels[:45], paths[:45])
    # queries: gallery items 30..44 (in the gallery) and items 45..59 (not in it), in a shuffled order
    order = np.random.default_rng(3).permutation(np.arange(30, 60))
    query = embedding_file(tmp_path / "q.npz", emb[order], labels[order], [paths[i] for i in order])
    lines = []
    got = evaluate_embedding_files(query, gallery, KS, notice=lines.append)
    own = np.where(order < 45, order, -1)
    assert_same(got, brute_force(emb[order], labels[order], own, emb[:45], labels[:45]))
    assert "15 of 30 queries are also in the gallery" in lines[0]


def test_disjoint_files_are_unchanged_and_silent(tmp_path):
    emb, labels, paths = data(n=50, seed=4)
    query = embedding_file(tmp_path / "q.npz", emb[:20], labels[:20], paths[:20])
    gallery = embedding_file(tmp_path / "g.npz", emb[20:], labels[20:], paths[20:])
    lines = []
    got = evaluate_embedding_files(query, gallery, KS, notice=lines.append)
    assert_same(got, reference_retrieval_metrics(emb[:20], labels[:20], KS, ref_emb=emb[20:],
                                                 ref_labels=labels[20:]))
    assert lines == []


def test_a_query_in_the_gallery_under_another_label_is_refused(tmp_path):
    emb, labels, paths = data(seed=5)
    a = embedding_file(tmp_path / "a.npz", emb, labels, paths)
    b = embedding_file(tmp_path / "b.npz", emb, (labels + 1) % 5, paths)
    with pytest.raises(ValueError, match="in the gallery under another label"):
        evaluate_embedding_files(a, b, KS)


def test_recallk_eval_says_so_and_prints_leave_one_out(tmp_path, capsys):
    emb, labels, paths = data(seed=6)
    a = str(embedding_file(tmp_path / "a.npz", emb, labels, paths))
    assert main(["eval", "--query-embeddings", a, "--gallery-embeddings", a, "--ks", "1", "2", "4"]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out.strip().splitlines()[-1])["query vs gallery"]
    assert_same(metrics, reference_retrieval_metrics(emb, labels, KS))
    assert "recallk eval: note: 40 of 40 queries are also in the gallery" in captured.err
