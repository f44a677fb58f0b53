"""Argument parsers of ``recallk embed``, ``index``, ``search`` and ``export`` (light: no torch import, so
``--help`` stays fast); the commands are in :mod:`recallk.cli.retrieval`."""

from __future__ import annotations

import argparse
from typing import Any

_EPILOG = """\
examples:
  recallk embed --checkpoint runs/demo/checkpoints/best.pt --dataset kanji --split test --out test.npz
  recallk embed --checkpoint runs/demo/checkpoints/best.pt --root photos/ --out photos.npz --float16
  recallk index test.npz --out test.faiss                    # exact; --kind ivf|hnsw for millions of items
  recallk search --index test.faiss --checkpoint runs/demo/checkpoints/best.pt query.png more/ --k 5
  recallk export --checkpoint runs/demo/checkpoints/best.pt --format onnx --out model.onnx"""


def add_parsers(sub: Any) -> None:
    """Add ``embed``, ``index``, ``search`` and ``export`` to the sub-parsers ``sub``."""
    fmt = argparse.RawDescriptionHelpFormatter
    emb = sub.add_parser("embed", help="embed a dataset split or an image folder into an .npz file",
                         description="Embed images with a trained model; writes embeddings, labels, paths and the "
                         "model's identity to one .npz (numpy.load opens it).", epilog=_EPILOG, formatter_class=fmt)
    emb.add_argument("--checkpoint", required=True, help="checkpoint file (runs/<name>/checkpoints/best.pt)")
    emb.add_argument("--root", help="image folder (every image below it; a <class>/<image> folder "
                     "labelled by its class folders) or the --dataset's folder")
    emb.add_argument("--dataset", help="a dataset name (kanji, folder, cub, ...): items and labels from its loader")
    emb.add_argument("--split", help="the dataset's split (default: the run's test split for its own dataset; "
                     "'all' with a folder run split by test_classes: its whole folder)")
    emb.add_argument("--out", required=True, help="output .npz")
    emb.add_argument("--float16", action="store_true", help="store float16 embeddings (half the size)")
    emb.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    emb.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")
    emb.add_argument("--no-progress", action="store_true", help="no progress bar")

    idx = sub.add_parser("index", help="build a faiss index of an embedding file",
                         description="Build a faiss inner-product index (exact by default) and its JSON sidecar; "
                         "approximate kinds print their recall@10 against the exact index.", epilog=_EPILOG,
                         formatter_class=fmt)
    idx.add_argument("embeddings", help="embedding file written by recallk embed")
    idx.add_argument("--out", required=True, help="index file to write (its sidecar is OUT.json)")
    idx.add_argument("--kind", choices=("flat", "ivf", "hnsw"), default="flat", help="default: flat (exact)")
    idx.add_argument("--nlist", type=int, help="ivf: number of lists (default: 4 sqrt(N), at most N / 39)")
    idx.add_argument("--nprobe", type=int, default=16, help="ivf: lists visited per query (default 16)")
    idx.add_argument("--hnsw-m", type=int, default=32, help="hnsw: links per node (default 32)")
    idx.add_argument("--ef-construction", type=int, default=40, help="hnsw: build candidates (default 40)")
    idx.add_argument("--ef-search", type=int, default=64, help="hnsw: search candidates (default 64)")

    se = sub.add_parser("search", help="search an index with query images: JSON and an HTML page",
                        description="Embed query images (files or folders) and print their top-k gallery items "
                        "as JSON; --html writes a page of each query and its neighbours.", epilog=_EPILOG,
                        formatter_class=fmt)
    se.add_argument("queries", nargs="+", metavar="QUERY", help="query image files or folders")
    se.add_argument("--index", required=True, help="index file written by recallk index")
    se.add_argument("--checkpoint", required=True, help="the checkpoint the gallery was embedded with")
    se.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    se.add_argument("--json", dest="json_out", help="also write the JSON to this file")
    se.add_argument("--html", help="write the HTML page here")
    se.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")

    ex = sub.add_parser("export", help="export the embedding model to ONNX or TorchScript",
                        description="Export the model (dynamic batch) with its preprocessing in OUT.json.",
                        epilog=_EPILOG, formatter_class=fmt)
    ex.add_argument("--checkpoint", required=True, help="checkpoint file")
    ex.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="default: onnx")
    ex.add_argument("--out", help="output file (default: next to the checkpoint, .onnx or .torchscript.pt)")
