"""Embedding files (atomic, restartable, float16), indexes (flat = exact kNN, approximate recall reported),
exports (ONNX Runtime and TorchScript equal the torch model) and every bad input named by issue 15."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from recallk.cli.main import main
from recallk.data import BadImageError
from recallk.evaluation import exact_knn
from recallk.retrieval import (
    CheckpointError,
    GalleryIndex,
    IndexMismatchError,
    Retriever,
    embed_images,
    export_model,
    load_trained_model,
    read_embeddings,
    write_embeddings,
)
from recallk.retrieval.embed import ImageItems
from recallk.retrieval.index import recall_against_exact
from recallk.testing.retrieval import reference_knn
from tests.helpers.retrieval import make_untrained_run, write_pngs


class CountingItems(ImageItems):
    """ImageItems that counts the images it loads."""

    loaded = 0

    def __getitem__(self, i):
        type(self).loaded += 1
        return super().__getitem__(i)


def test_embed_is_atomic_and_restarts_from_finished_shards(untrained_run, tmp_path):
    trained = load_trained_model(untrained_run)
    paths = write_pngs(tmp_path / "imgs", 20)
    whole = write_embeddings(trained, ImageItems(paths, trained.transform), tmp_path / "whole.npz", {},
                             shard_size=8, progress=False)
    paths[13].write_bytes(b"not an image")  # the second shard fails
    out = tmp_path / "e.npz"
    with pytest.raises(BadImageError, match=r"img_013.png"):
        write_embeddings(trained, CountingItems(paths, trained.transform), out, {}, shard_size=8, progress=False)
    assert not out.exists() and sorted(p.name for p in (tmp_path / "e.npz.partial").iterdir()) == [
        "manifest.json", "shard_000000.npy"]
    write_pngs(tmp_path / "imgs", 20)  # repaired
    CountingItems.loaded = 0
    write_embeddings(trained, CountingItems(paths, trained.transform), out, {}, shard_size=8, progress=False)
    assert CountingItems.loaded == 12  # the first shard was not embedded again
    assert not (tmp_path / "e.npz.partial").exists()
    a, b = read_embeddings(whole), read_embeddings(out)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert list(b.paths) == [str(p) for p in paths] and (b.labels == -1).all()
    # independent: embedding each image alone gives the same rows (batch independence, eval-mode BatchNorm)
    np.testing.assert_allclose(embed_images(trained, [paths[5]]), a.embeddings[5:6], atol=1e-5)


def test_float16_storage(untrained_run, tmp_path):
    trained = load_trained_model(untrained_run)
    items = ImageItems(write_pngs(tmp_path / "imgs", 6), trained.transform)
    f32 = read_embeddings(write_embeddings(trained, items, tmp_path / "a.npz", {}, progress=False))
    f16 = read_embeddings(write_embeddings(trained, items, tmp_path / "b.npz", {}, float16=True, progress=False))
    assert f16.embeddings.dtype == np.float16 and f16.metadata["dtype"] == "float16"
    np.testing.assert_allclose(f16.float32(), f32.embeddings, atol=2e-3)
    assert (tmp_path / "b.npz").stat().st_size < (tmp_path / "a.npz").stat().st_size


def _random_file(tmp_path, n=2000, d=32, seed=0, name="r.npz"):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    meta = {"format": "recallk-embeddings", "format_version": 1, "model_id": "m" * 64}
    np.savez(tmp_path / name, embeddings=x, labels=np.arange(n) % 7, paths=np.array([f"#{i}" for i in range(n)]),
             classes=np.array([], dtype=str), metadata=np.array(json.dumps(meta)))
    return tmp_path / name, x


def test_flat_index_is_exact_and_round_trips(tmp_path):
    path, x = _random_file(tmp_path)
    GalleryIndex.build(path).save(tmp_path / "i.faiss")
    index = GalleryIndex.load(tmp_path / "i.faiss")
    q = x[:50] + 0.05
    scores, indices = index.search(q, 10)
    np.testing.assert_array_equal(indices, exact_knn(q, x, 10)[1])
    np.testing.assert_array_equal(indices, reference_knn(q, x, 10)[1])
    faiss_scores, _ = index.index.search(q, 10)  # the faiss file answers the same for a plain faiss user
    np.testing.assert_allclose(scores, faiss_scores, atol=1e-5)
    assert index.metadata["model_id"] == "m" * 64 and list(index.labels[:8]) == [0, 1, 2, 3, 4, 5, 6, 0]


@pytest.mark.parametrize(("kind", "options"), [("ivf", {"nlist": 20, "nprobe": 4}), ("hnsw", {"ef_search": 16})])
def test_approximate_index_reports_its_recall(tmp_path, kind, options):
    path, x = _random_file(tmp_path)
    built = GalleryIndex.build(path, kind, **options)
    built.save(tmp_path / "i.faiss")
    loaded = GalleryIndex.load(tmp_path / "i.faiss")
    rng = np.random.default_rng(0)  # the build's sample, recomputed here with the float64 brute force
    rows = np.sort(rng.choice(len(x), size=1000, replace=False))
    _, exact = reference_knn(x[rows], x, 10)
    _, approx = loaded.search(x[rows], 10)  # search parameters (nprobe, efSearch) survive the round trip
    expected = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx.tolist(), exact.tolist())])
    assert built.metadata["recall@10_vs_exact"] == pytest.approx(expected, abs=1e-4)
    assert 0.2 < expected < 1.0  # approximate on random 32-d data with these small settings
    assert recall_against_exact(loaded.index, x, query_vectors=x[rows]) == pytest.approx(expected)


def _manual_preprocess(path, spec):
    """The sidecar's preprocessing done by hand with PIL and numpy (not torchvision)."""
    image = Image.open(path).convert("RGB")
    assert spec["resize_mode"] == "exact" and spec["crop"] is None
    h, w = spec["resize"]
    image = image.resize((w, h), {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[spec["interpolation"]])
    x = np.asarray(image, dtype=np.float32) * spec["scale"]
    x = (x - np.array(spec["mean"], np.float32)) / np.array(spec["std"], np.float32)
    return x.transpose(2, 0, 1)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_gives_the_torch_embeddings(untrained_run, tmp_path, fmt):
    trained = load_trained_model(untrained_run)
    out = export_model(trained, tmp_path / f"m.{fmt}", fmt)
    sidecar = json.loads((tmp_path / f"m.{fmt}.json").read_text())
    assert sidecar["model_id"] == trained.model_id and sidecar["input"]["shape"] == ["batch", 3, 32, 32]
    paths = write_pngs(tmp_path / "imgs", 3)
    batch = np.stack([_manual_preprocess(p, sidecar["preprocessing"]) for p in paths])
    expected = embed_images(trained, paths)  # the torch model with the run's torchvision transform
    for b in (1, 3):
        if fmt == "onnx":
            session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            got = session.run(["embeddings"], {"images": batch[:b]})[0]
        else:
            got = torch.jit.load(str(out))(torch.from_numpy(batch[:b])).detach().numpy()
        assert got.shape == (b, trained.embed_dim)
        np.testing.assert_allclose(got, expected[:b], atol=1e-4)


# ------------------------------------------------------------------------------------------------- bad input
def test_checkpoint_of_another_format_or_model(tmp_path):
    ckpt = make_untrained_run(tmp_path / "a")
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "format": 99}, ckpt)
    with pytest.raises(CheckpointError, match=r"format 99.*upgrade recallk"):
        load_trained_model(ckpt)
    other = make_untrained_run(tmp_path / "b", embed_dim=24)
    with pytest.raises(CheckpointError, match=r"do not fit the model.*another model"):
        load_trained_model(other, config=tmp_path / "a" / "config.yaml")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"config\.yaml not found"):
        load_trained_model(tmp_path / "c" / "x.pt")


def test_index_of_another_models_embeddings_is_refused(tmp_path):
    a = make_untrained_run(tmp_path / "a", embed_dim=16, seed=0)
    b = make_untrained_run(tmp_path / "b", embed_dim=16, seed=1)  # same architecture, other weights
    c = make_untrained_run(tmp_path / "c", embed_dim=24, seed=0)
    trained = load_trained_model(a)
    items = ImageItems(write_pngs(tmp_path / "imgs", 5), trained.transform)
    GalleryIndex.build(write_embeddings(trained, items, tmp_path / "g.npz", {}, progress=False)).save(tmp_path / "i")
    assert len(Retriever.from_checkpoint(a, index=tmp_path / "i").search(tmp_path / "imgs", k=2).queries) == 5
    with pytest.raises(IndexMismatchError, match=r"embeddings of model .* search with the checkpoint"):
        Retriever.from_checkpoint(b, index=tmp_path / "i")
    with pytest.raises(IndexMismatchError, match=r"16-d embeddings but .* 24-d"):
        Retriever.from_checkpoint(c, index=tmp_path / "i")
    # a sidecar paired with another index file
    GalleryIndex.build(tmp_path / "g.npz", "hnsw").save(tmp_path / "j")
    (tmp_path / "j").replace(tmp_path / "i")
    with pytest.raises(IndexMismatchError, match="SHA-256 differs"):
        GalleryIndex.load(tmp_path / "i")


def test_unreadable_images_and_empty_folders_are_clear_errors(untrained_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    out = tmp_path / "e.npz"
    code = main(["embed", "--checkpoint", str(untrained_run), "--root", str(tmp_path / "empty"), "--out", str(out)])
    assert code == 2 and "no images in" in capsys.readouterr().err and not out.exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG broken")
    code = main(["embed", "--checkpoint", str(untrained_run), "--root", str(tmp_path / "bad"), "--out", str(out),
                 "--no-progress"])
    assert code == 2 and "cannot decode image" in capsys.readouterr().err and not out.exists()
    trained = load_trained_model(untrained_run)
    with pytest.raises(ValueError, match="query image not found"):
        embed_images(trained, [tmp_path / "missing.png"])


def test_in_memory_images_of_any_mode_convert_like_files():
    from PIL import Image

    from recallk.retrieval.embed import to_rgb

    ramp = np.tile(np.linspace(10, 245, 64).round().astype(np.uint8), (8, 1))
    sixteen = Image.fromarray(ramp.astype(np.uint16) * 257)  # a 16-bit greyscale picture of the same ramp
    assert sixteen.mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(to_rgb(sixteen))[..., 0], ramp)
