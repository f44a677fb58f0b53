"""Retrieval speed: embedding throughput of a checkpoint's model, and faiss index build time, query latency and
recall@10 against the exact index at N random unit vectors (d=512). Not a test; figures in docs/benchmarks.md.

    .venv/bin/python benchmarks/bench_retrieval.py [--n 100000] [--d 512] [--queries 1000] [--images 512]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from recallk.config import dump_config, load_config
from recallk.engine.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from recallk.evaluation import exact_knn
from recallk.models import build_model
from recallk.retrieval import embed_images, load_trained_model
from recallk.retrieval.index import make_faiss_index

ROOT = Path(__file__).resolve().parents[1]


def unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_embedding(images: int, model: str, size: int, batch: int) -> dict:
    """img/s of embed_images (PIL images through the run's test transform and the model) on the CPU."""
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(ROOT / "configs" / "kanji.yaml", [f"model.name={model}", f"data.image_size={size}"])
        dump_config(config, Path(tmp) / "config.yaml")
        net = build_model(model, embed_dim=config["model"]["embed_dim"], freeze_bn=False)
        save_checkpoint({"format": CHECKPOINT_FORMAT, "model": net.state_dict()}, Path(tmp) / "ck" / "best.pt")
        trained = load_trained_model(Path(tmp) / "ck" / "best.pt")
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(images)]
    embed_images(trained, pictures[:batch], batch_size=batch)  # warm-up
    t0 = time.perf_counter()
    embed_images(trained, pictures, batch_size=batch)
    seconds = time.perf_counter() - t0
    return {"model": model, "size": size, "images": images, "batch": batch, "img_per_s": round(images / seconds, 1)}


def bench_index(n: int, d: int, queries: int, kind: str, options: dict, exact_ids: np.ndarray,
                gallery: np.ndarray, q: np.ndarray) -> dict:
    t0 = time.perf_counter()
    index, params = make_faiss_index(gallery, kind, **options)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, ids = index.search(q, 10)
    batch_ms = (time.perf_counter() - t0) / queries * 1e3
    t0 = time.perf_counter()
    for row in q[:100]:
        index.search(row[None], 10)
    single_ms = (time.perf_counter() - t0) / 100 * 1e3
    recall = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ids.tolist(), exact_ids.tolist())]))
    return {"kind": kind, "params": params, "n": n, "d": d, "build_s": round(build, 2),
            "ms_per_query_batched": round(batch_ms, 3), "ms_per_query_single": round(single_ms, 3),
            "recall@10_vs_exact": round(recall, 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--images", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for model, size, images in (("resnet10t", 32, args.images), ("resnet50", 224, max(16, args.images // 16))):
        print(json.dumps(bench_embedding(images, model, size, batch=64 if size < 100 else 16)), flush=True)
    gallery, q = unit_vectors(args.n, args.d, 0), unit_vectors(args.queries, args.d, 1)
    t0 = time.perf_counter()
    _, exact_ids = exact_knn(q, gallery, 10)
    print(json.dumps({"kind": "exact_knn (recallk.evaluation)", "ms_per_query_batched":
                      round((time.perf_counter() - t0) / args.queries * 1e3, 3)}), flush=True)
    for kind, options in (("flat", {}), ("ivf", {"nprobe": 16}), ("ivf", {"nprobe": 64}),
                          ("hnsw", {"ef_search": 64}), ("hnsw", {"ef_search": 256})):
        print(json.dumps(bench_index(args.n, args.d, args.queries, kind, options, exact_ids, gallery, q)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
