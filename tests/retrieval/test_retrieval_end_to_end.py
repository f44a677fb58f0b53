"""Issue 15's "done when": on a checkpoint of a short kanji training run, ``recallk embed``, ``index``,
``search`` and ``export`` run, and search results equal the evaluation's exact kNN on the same embeddings."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

import recallk
from recallk.cli.main import main
from recallk.data import build_dataset
from recallk.evaluation import exact_knn, retrieval_metrics
from recallk.retrieval import load_trained_model, read_embeddings
from recallk.testing.retrieval import reference_knn


@pytest.fixture(scope="module")
def pipeline(kanji_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    ckpt = kanji_run / "checkpoints" / "last.pt"  # the weights of the final evaluation (best.pt may be epoch 0)
    assert main(["embed", "--checkpoint", str(ckpt), "--dataset", "kanji", "--split", "test", "--out",
                 str(out / "gallery.npz"), "--no-progress", "--device", "cpu"]) == 0
    assert main(["index", str(out / "gallery.npz"), "--out", str(out / "gallery.faiss")]) == 0
    raw = build_dataset("kanji", None, "test", transform=None, max_classes=4)
    queries = out / "queries"
    queries.mkdir()
    for i in (0, 7, 33, 60):  # real rendered kanji written as PNG files
        raw[i][0].save(queries / f"q{i:02d}.png")
    return ckpt, out, raw


def test_embedding_file_matches_the_runs_final_evaluation(kanji_run, pipeline):
    """The transform travels with the checkpoint: the gallery embeddings are those the run evaluated with."""
    _, out, raw = pipeline
    emb = read_embeddings(out / "gallery.npz")
    with np.load(kanji_run / "embeddings" / "test.npz") as run:
        np.testing.assert_allclose(emb.embeddings, run["embeddings"], atol=1e-5)
        np.testing.assert_array_equal(emb.labels, run["labels"])
    assert emb.classes == list(raw.classes) and emb.metadata["source"]["split"] == "test"
    assert emb.metadata["model"]["embed_dim"] == 32 and len(emb.metadata["model_id"]) == 64
    with np.load(out / "gallery.npz", allow_pickle=False) as plain:  # opens without recallk, without pickle
        assert set(plain.files) == {"embeddings", "labels", "paths", "classes", "metadata"}


def test_search_equals_exact_knn_of_the_evaluation(pipeline, capsys, tmp_path):
    ckpt, out, _ = pipeline
    capsys.readouterr()
    assert main(["search", "--index", str(out / "gallery.faiss"), "--checkpoint", str(ckpt), "--k", "5",
                 "--device", "cpu", "--json", str(tmp_path / "r.json"), str(out / "queries")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "r.json").read_text())
    gallery = read_embeddings(out / "gallery.npz")
    retriever = recallk.Retriever.from_checkpoint(ckpt, index=out / "gallery.faiss")
    query_emb = recallk.embed_images(retriever.trained, sorted((out / "queries").iterdir()))
    scores, indices = exact_knn(query_emb, gallery.embeddings, 5)
    assert [r["query"] for r in printed] == [str(p) for p in sorted((out / "queries").iterdir())]
    assert [[n["index"] for n in r["neighbours"]] for r in printed] == indices.tolist()
    np.testing.assert_allclose([[n["score"] for n in r["neighbours"]] for r in printed], scores, atol=1e-6)
    # independent float64 brute force agrees on the neighbours
    _, ref_indices = reference_knn(query_emb, gallery.embeddings, 5)
    np.testing.assert_array_equal(indices, ref_indices)
    # a query image is an item of the gallery: it finds itself first, with its class
    assert [r["neighbours"][0]["index"] for r in printed] == [0, 7, 33, 60]
    assert all(r["neighbours"][0]["score"] > 0.9999 for r in printed)
    assert printed[0]["neighbours"][0]["class"] == gallery.classes[gallery.labels[0]]


def test_export_runs_from_the_cli(pipeline, tmp_path):
    ckpt, out, raw = pipeline
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    sidecar = json.loads((tmp_path / "m.onnx.json").read_text())  # TorchScript: test_retrieval_units.py
    assert sidecar["preprocessing"]["input_size"] == [3, 32, 32] and sidecar["format"] == "onnx"
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    transform = load_trained_model(ckpt).transform
    images = np.stack([transform(raw[i][0]).numpy() for i in (0, 1, 2)])
    got = session.run(["embeddings"], {"images": images})[0]
    np.testing.assert_allclose(got, read_embeddings(out / "gallery.npz").embeddings[:3], atol=1e-4)


def test_eval_of_two_embedding_files(pipeline, tmp_path, capsys):
    """``recallk eval --query-embeddings --gallery-embeddings``: the metrics of the query file against the
    gallery file, checked against the float64 reference."""
    _, out, _ = pipeline
    g = read_embeddings(out / "gallery.npz")
    half = np.arange(len(g.labels)) % 2 == 0
    for name, rows in (("q.npz", half), ("g.npz", ~half)):  # two labelled files of one model
        arrays = dict(np.load(out / "gallery.npz", allow_pickle=False))
        arrays.update(embeddings=g.embeddings[rows], labels=g.labels[rows], paths=g.paths[rows])
        np.savez(tmp_path / name, **arrays)
    capsys.readouterr()
    assert main(["eval", "--query-embeddings", str(tmp_path / "q.npz"), "--gallery-embeddings",
                 str(tmp_path / "g.npz"), "--ks", "1", "2"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["query vs gallery"]
    expected = retrieval_metrics(g.embeddings[half], g.labels[half], (1, 2), ref_emb=g.embeddings[~half],
                                 ref_labels=g.labels[~half])
    assert got == pytest.approx(expected)
    # independent: recall@1 from the float64 brute force
    _, nn = reference_knn(g.embeddings[half], g.embeddings[~half], 1)
    assert got["recall@1"] == pytest.approx(np.mean(g.labels[~half][nn[:, 0]] == g.labels[half]))
