"""evaluate_protocol for the query/gallery (In-Shop) and revisited (Oxford/Paris) protocols on miniature trees of
noise images, against embeddings computed here image by image and float64 brute-force metrics."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from recallk.data import build_dataset
from recallk.evaluation import evaluate_protocol, format_metrics_table, query_gallery_metrics
from recallk.testing.retrieval import reference_ranking, reference_retrieval_metrics
from tests.helpers.revisited import assert_same, brute_force


def to_tensor(image: Image.Image) -> torch.Tensor:
    image = image.resize((6, 6), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def noise_image(path, rng, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path, format="PNG")


def model_and_embed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(108, 8))

    def embed(images):
        with torch.no_grad():
            return model(torch.stack([to_tensor(im) for im in images])).numpy()

    return model, embed


def write_inshop(root, rng):
    """Items 1..5 with query and gallery images; item 5 has no gallery image, item 6 no query image."""
    rows = []
    for item in range(1, 7):
        for k in range(3 if item != 5 else 1):
            split = "gallery" if (k > 0 or item == 6) else "query"
            rows.append((f"img/MEN/Tees/id_{item:08d}/{k:02d}_1_front.jpg", f"id_{item:08d}", split))
    rows.append(("img/MEN/Tees/id_00000009/00_1_front.jpg", "id_00000009", "train"))
    text = f"{len(rows)}\nimage_name item_id evaluation_status\n" + "".join(f"{n} {i} {s}\n" for n, i, s in rows)
    (root / "list_eval_partition.txt").write_text(text)
    for name, _, _ in rows:
        noise_image(root / name, rng)
    return rows


def test_inshop_protocol_searches_the_gallery(tmp_path, rng):
    rows = write_inshop(tmp_path, rng)
    model, embed = model_and_embed()
    results = evaluate_protocol(model, "inshop", tmp_path, to_tensor, device="cpu", progress=False)
    assert list(results) == ["query"]
    query = [(n, i) for n, i, s in rows if s == "query"]
    gallery = [(n, i) for n, i, s in rows if s == "gallery"]
    item_id = {i: k for k, i in enumerate(sorted({i for _, i, _ in rows}))}
    q_emb = embed([Image.open(tmp_path / n).convert("RGB") for n, _ in query])
    g_emb = embed([Image.open(tmp_path / n).convert("RGB") for n, _ in gallery])
    expected = reference_retrieval_metrics(
        q_emb, np.array([item_id[i] for _, i in query]), (1, 10, 20, 30, 40, 50),
        ref_emb=g_emb, ref_labels=np.array([item_id[i] for _, i in gallery]),
    )
    assert expected["num_excluded_queries"] == 1  # item 5: no gallery image
    assert set(results["query"]) == set(expected)
    for name, value in expected.items():
        assert results["query"][name] == pytest.approx(value, abs=1e-6), name


def test_query_gallery_matches_classes_by_name(tmp_path, rng):
    # the query folder has classes b, c; the gallery a, b, c, d: label ids differ, names agree
    for folder, classes in (("query", "bc"), ("gallery", "abcd")):
        for c in classes:
            for k in range(2):
                noise_image(tmp_path / folder / c / f"{k}.png", rng)
    query, gallery = (build_dataset("folder", tmp_path / f, None, to_tensor) for f in ("query", "gallery"))
    q_emb = torch.stack([query[i][0] for i in range(len(query))]).flatten(1).numpy()
    g_emb = torch.stack([gallery[i][0] for i in range(len(gallery))]).flatten(1).numpy()
    got = query_gallery_metrics(q_emb, query, g_emb, gallery, (1, 2))
    expected = reference_retrieval_metrics(q_emb, query.labels + 1, (1, 2), ref_emb=g_emb, ref_labels=gallery.labels)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name


def write_revisited(root, rng):
    imlist = [f"all_souls_{i:06d}" for i in range(9)]
    gnd = [
        {"bbx": [1.0, 1.0, 11.0, 9.0], "easy": [0, 4], "hard": [2], "junk": [7]},
        {"bbx": [0.0, 0.0, 6.0, 5.0], "easy": [], "hard": [5, 6], "junk": [1]},  # Easy: skipped
        {"bbx": [2.0, 3.0, 12.0, 10.0], "easy": [3], "hard": [], "junk": [8, 0]},  # Hard: skipped
    ]
    with open(root / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": [imlist[0], imlist[5], imlist[3]], "gnd": gnd}, f)
    for name in imlist:
        noise_image(root / "jpg" / f"{name}.jpg", rng)
    return imlist, gnd


def test_revisited_protocol(tmp_path, rng):
    imlist, gnd = write_revisited(tmp_path, rng)
    model, embed = model_and_embed()
    results = evaluate_protocol(model, "roxford5k", tmp_path, to_tensor, device="cpu", progress=False)
    database = [Image.open(tmp_path / "jpg" / f"{n}.jpg").convert("RGB") for n in imlist]
    crops = [database[i].crop(tuple(g["bbx"])) for i, g in zip((0, 5, 3), gnd)]
    rankings = reference_ranking(embed(crops), embed(database), exclude_self=False)
    expected = brute_force(rankings, gnd, (1, 5, 10))
    assert expected["num_skipped_easy"] == 1 and expected["num_skipped_hard"] == 1
    assert_same(results["query"], expected)
    lines = format_metrics_table(results).splitlines()
    rows = [line.split()[0] for line in lines[2:]]
    assert rows[:4] == ["map_easy", "map_medium", "map_hard", "mp@1_easy"]
    assert rows[-4:] == ["num_queries", "num_skipped_easy", "num_skipped_medium", "num_skipped_hard"]
