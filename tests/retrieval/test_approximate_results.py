"""Approximate indexes built by recallk: a search that finds fewer than k neighbours (IVF, nprobe 1) is padded
(-1, -inf), flagged by ``SearchResults.valid`` and warned about once by ``recallk search``; ``recall@10_vs_exact``
is tie-aware (exact duplicates tied with the exact 10th neighbour are hits, real misses still count)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recallk.cli.main import main
from recallk.retrieval import GalleryIndex, Retriever, load_trained_model
from recallk.retrieval.index import recall_against_exact
from recallk.testing.retrieval import reference_knn
from tests.helpers.retrieval import make_untrained_run, write_pngs

pytestmark = pytest.mark.usefixtures("one_thread")


def _embedding_file(path, x, model_id="m" * 64):
    meta = {"format": "recallk-embeddings", "format_version": 1, "model_id": model_id}
    np.savez(path, embeddings=x, labels=np.arange(len(x)) % 5, paths=np.array([f"item_{i}" for i in range(len(x))]),
             classes=np.array([], dtype=str), metadata=np.array(json.dumps(meta)))
    return path


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ivf_with_nprobe_1_pads_and_the_cli_warns(tmp_path, capsys):
    ckpt = make_untrained_run(tmp_path / "run")
    trained = load_trained_model(ckpt)
    gallery = _embedding_file(tmp_path / "g.npz", _unit(np.random.default_rng(0), 400, trained.embed_dim),
                              trained.model_id)
    assert main(["index", str(gallery), "--out", str(tmp_path / "i.faiss"), "--kind", "ivf", "--nprobe", "1"]) == 0
    queries = write_pngs(tmp_path / "q", 3)
    capsys.readouterr()

    results = Retriever.from_checkpoint(ckpt, index=tmp_path / "i.faiss").search(queries, k=200)
    found = results.valid.sum(axis=1)
    assert (found < 200).all() and (found > 0).all()  # 400 items in 10 lists: one list holds far fewer than 200
    assert (results.indices[~results.valid] == -1).all() and np.isneginf(results.scores[~results.valid]).all()
    assert results.valid[:, 0].all() and not results.valid[:, -1].any()  # padding only at the end of a row
    assert results.short_queries == 3

    assert main(["search", "--index", str(tmp_path / "i.faiss"), "--checkpoint", str(ckpt), "--k", "200",
                 "--device", "cpu", *map(str, queries)]) == 0
    out, err = capsys.readouterr()
    assert [len(e["neighbours"]) for e in json.loads(out)] == found.tolist()
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1, err
    assert "3 of 3 queries got fewer than --k 200 neighbours" in warnings[0]
    assert "--nprobe" in warnings[0] and "--kind flat" in warnings[0]

    # the exact index finds k for every query: no warning
    assert main(["index", str(gallery), "--out", str(tmp_path / "f.faiss")]) == 0
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "f.faiss"), "--checkpoint", str(ckpt), "--k", "200",
                 "--device", "cpu", *map(str, queries)]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err and [len(e["neighbours"]) for e in json.loads(out)] == [200] * 3


def _tie_aware_recall_float64(index, x, rows, k=10):
    """Brute force in float64: a returned item is a hit when its similarity is >= the exact k-th's."""
    q = x[rows].astype(np.float64)
    exact, _ = reference_knn(q, x, k)
    _, approx = index.search(x[rows], k)
    sims = q @ x.astype(np.float64).T
    hits = [sum(1 for j in set(a.tolist()) if j >= 0 and sims[i, j] >= exact[i, -1] - 1e-12) / k
            for i, a in enumerate(approx)]
    return float(np.mean(hits))


def test_recall_vs_exact_counts_tied_duplicates_as_hits(tmp_path):
    x = np.repeat(_unit(np.random.default_rng(1), 50, 16), 4, axis=0)  # every item has 3 identical duplicates
    built = GalleryIndex.build(_embedding_file(tmp_path / "d.npz", x), "hnsw", ef_search=200)
    rows = np.sort(np.random.default_rng(0).choice(len(x), size=len(x), replace=False))
    _, exact = reference_knn(x[rows], x, 10)
    _, approx = built.index.search(x[rows], 10)
    assert _tie_aware_recall_float64(built.index, x, rows) == 1.0
    assert built.metadata["recall@10_vs_exact"] == 1.0
    # the plain set intersection with exact search's order of the ties would count tied items as misses
    assert np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx.tolist(), exact.tolist())]) < 1.0


def test_recall_vs_exact_still_counts_real_misses(tmp_path):
    x = _unit(np.random.default_rng(2), 600, 16)
    x[300:304] = x[300]  # some duplicates too
    built = GalleryIndex.build(_embedding_file(tmp_path / "r.npz", x), "ivf", nlist=15, nprobe=1)
    rows = np.sort(np.random.default_rng(0).choice(len(x), size=len(x), replace=False))
    expected = _tie_aware_recall_float64(built.index, x, rows)
    assert 0.2 < expected < 0.95  # nprobe 1 of 15 lists misses real neighbours
    assert built.metadata["recall@10_vs_exact"] == pytest.approx(expected, abs=1e-4)
    assert recall_against_exact(built.index, x, query_vectors=x[rows]) == pytest.approx(expected, abs=1e-12)
