"""recallk eval on the In-Shop and revisited protocols and on a --query/--gallery folder pair, through the real CLI
with a checkpoint of an untrained tiny model (the numbers are checked against the library path by path)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from recallk.cli.main import main
from recallk.cli.wiring import model_from_config
from recallk.config import dump_config, load_config
from recallk.data import build_dataset
from recallk.data.transforms import transforms_for_model
from recallk.evaluation import embed_dataset, query_gallery_metrics, retrieval_metrics, revisited_metrics


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    config = load_config(None, ["model.name=resnet10t", "model.embed_dim=8", "data.image_size=32",
                                "data.dataset=folder", "model.pretrained=false"])
    dump_config(config, run / "config.yaml")
    torch.manual_seed(0)
    model = model_from_config(config)
    (run / "checkpoints").mkdir()
    torch.save({"model": model.state_dict()}, run / "checkpoints" / "last.pt")
    return run / "checkpoints" / "last.pt", model


def noise(path, rng, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path, format="PNG")


def run_eval(capsys, *args):
    assert main(["eval", "--no-progress", "--device", "cpu", *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return lines[:-1], json.loads(lines[-1])


def library(model, name, root, split):
    tf = transforms_for_model(model, "test", dataset=name, image_size=32)
    ds = build_dataset(name, root, split, tf)
    return ds, embed_dataset(model, ds, device="cpu", progress=False)[0]


def test_eval_revisited_prints_the_benchmark_table(checkpoint, tmp_path, capsys):
    ckpt, model = checkpoint
    rng = np.random.default_rng(3)
    imlist = [f"paris_eiffel_{i:06d}" for i in range(6)]
    gnd = [{"bbx": [2.0, 1.0, 18.0, 15.0], "easy": [1], "hard": [2, 4], "junk": [5]},
           {"bbx": [0.0, 0.0, 10.0, 10.0], "easy": [0, 2], "hard": [], "junk": []}]
    (tmp_path / "gnd_rparis6k.pkl").write_bytes(pickle.dumps({"imlist": imlist, "qimlist": imlist[:2], "gnd": gnd}))
    for n in imlist:
        noise(tmp_path / "jpg" / f"{n}.jpg", rng)
    table, result = run_eval(capsys, "--checkpoint", str(ckpt), "--dataset", "rparis6k", "--root", str(tmp_path))
    assert table[0].split() == ["metric", "(%)", "query"]
    assert [line.split()[0] for line in table[2:5]] == ["map_easy", "map_medium", "map_hard"]
    queries, q_emb = library(model, "rparis6k", tmp_path, "query")
    _, db_emb = library(model, "rparis6k", tmp_path, "database")
    expected = revisited_metrics(q_emb, db_emb, queries.ground_truth, (1, 5, 10))
    assert result["query"]["num_skipped_hard"] == 1
    for name, value in expected.items():
        assert result["query"][name] == pytest.approx(value, abs=1e-6), name


def test_eval_inshop_and_query_gallery_folders(checkpoint, tmp_path, capsys):
    ckpt, model = checkpoint
    rng = np.random.default_rng(4)
    rows = [(f"img/WOMEN/Skirts/id_{i:08d}/{k:02d}_1_front.jpg", f"id_{i:08d}", "query" if k == 0 else "gallery")
            for i in range(1, 5) for k in range(3)]
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "list_eval_partition.txt").write_text(
        f"{len(rows)}\nimage_name item_id evaluation_status\n" + "".join(f"{a} {b} {c}\n" for a, b, c in rows))
    for name, item, split in rows:
        noise(tmp_path / "shop" / name, rng)
        noise(tmp_path / split / item / name.rsplit("/", 1)[1], rng)  # a folder pair for --query/--gallery
    table, result = run_eval(capsys, "--checkpoint", str(ckpt), "--dataset", "inshop", "--root",
                             str(tmp_path / "shop"))
    assert [line.split()[0] for line in table[2:8]] == [f"recall@{k}" for k in (1, 10, 20, 30, 40, 50)]
    query, q_emb = library(model, "inshop", tmp_path / "shop", "query")
    gallery, g_emb = library(model, "inshop", tmp_path / "shop", "gallery")
    expected = query_gallery_metrics(q_emb, query, g_emb, gallery, (1, 10, 20, 30, 40, 50))
    for name, value in expected.items():
        assert result["query"][name] == pytest.approx(value, abs=1e-6), name

    _, result = run_eval(capsys, "--checkpoint", str(ckpt), "--query", str(tmp_path / "query"), "--gallery",
                         str(tmp_path / "gallery"), "--ks", "1", "2")
    query, q_emb = library(model, "folder", tmp_path / "query", None)
    gallery, g_emb = library(model, "folder", tmp_path / "gallery", None)
    expected = query_gallery_metrics(q_emb, query, g_emb, gallery, (1, 2))
    assert set(result["query"]) == set(expected) and "map@r" in expected
    for name, value in expected.items():
        assert result["query"][name] == pytest.approx(value, abs=1e-6), name


def test_query_without_gallery_is_an_error(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    assert main(["eval", "--checkpoint", str(ckpt), "--query", str(tmp_path)]) == 2
    assert "give both --query and --gallery" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(ckpt), "--query", str(tmp_path), "--gallery", str(tmp_path),
                 "--dataset", "inshop"]) == 2
    assert "leave out --dataset" in capsys.readouterr().err


def test_eval_never_loads_pretrained_weights(checkpoint, tmp_path, capsys):
    """The checkpoint holds the weights: a run trained from pretrained weights (model.pretrained names a file
    that is gone, or the hub, unreachable here) still evaluates, with the checkpoint's weights."""
    ckpt, model = checkpoint
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    config = load_config(ckpt.parent.parent / "config.yaml", ["model.pretrained=/nonexistent/weights.pth"])
    dump_config(config, run / "config.yaml")
    (run / "checkpoints" / "last.pt").write_bytes(ckpt.read_bytes())
    rng = np.random.default_rng(5)
    for c in range(3):
        for i in range(2):
            noise(tmp_path / "photos" / f"c{c}" / f"{i}.png", rng)
    _, result = run_eval(capsys, "--checkpoint", str(run / "checkpoints" / "last.pt"), "--dataset", "folder",
                         "--root", str(tmp_path / "photos"), "--ks", "1")
    _, emb = library(model, "folder", tmp_path / "photos", "all")
    labels = build_dataset("folder", tmp_path / "photos", "all").labels
    assert result["all"]["recall@1"] == pytest.approx(retrieval_metrics(emb, labels, (1,))["recall@1"], abs=1e-9)
