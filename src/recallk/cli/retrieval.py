"""The ``embed``, ``index``, ``search`` and ``export`` sub-commands and ``eval`` on two embedding files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from recallk.data import build_dataset
from recallk.evaluation import format_metrics_table
from recallk.retrieval import (
    GalleryIndex,
    Retriever,
    evaluate_embedding_files,
    export_model,
    image_files,
    load_trained_model,
    write_embeddings,
    write_search_page,
)
from recallk.retrieval.embed import ImageItems
from recallk.retrieval.files import atomic_write
from recallk.utils import resolve_device


def _dataset_source(args: argparse.Namespace, config: dict[str, Any], transform: Any) -> tuple[Any, dict]:
    data = config.get("data") or {}
    if args.dataset is None:
        if args.root is None:
            raise ValueError("give --root DIR (an image folder) or --dataset NAME [--root DIR] [--split S]")
        files = image_files(args.root)
        return ImageItems(files, transform), {"folder": str(Path(args.root).resolve())}
    same = args.dataset == data.get("dataset")
    split = args.split or (data.get("test_split") if same else None)
    root = args.root if args.root is not None else (data.get("root") if same else None)
    options = {**(data.get("options") or {}), **(data.get("test_options") or {})} if same else {}
    dataset = build_dataset(args.dataset, root, split, transform=transform, **options)
    source = {"dataset": args.dataset, "root": str(Path(root).resolve()) if root else None, "split": split,
              "options": options}
    return dataset, source


def embed(args: argparse.Namespace) -> int:
    trained = load_trained_model(args.checkpoint)
    dataset, source = _dataset_source(args, trained.config, trained.transform)
    out = write_embeddings(trained, dataset, args.out, source, float16=args.float16, batch_size=args.batch_size,
                           device=resolve_device(args.device), progress=not args.no_progress)
    print(json.dumps({"out": str(out), "count": len(dataset), "dim": trained.embed_dim,
                      "model_id": trained.model_id}))
    return 0


def index(args: argparse.Namespace) -> int:
    gallery = GalleryIndex.build(args.embeddings, args.kind, nlist=args.nlist, nprobe=args.nprobe,
                                 hnsw_m=args.hnsw_m, ef_construction=args.ef_construction, ef_search=args.ef_search)
    gallery.save(args.out)
    keys = ("kind", "params", "count", "dim", "build_seconds", "recall@10_vs_exact", "model_id")
    print(json.dumps({"out": args.out, **{k: gallery.metadata[k] for k in keys if k in gallery.metadata}}))
    return 0


def search(args: argparse.Namespace) -> int:
    retriever = Retriever.from_checkpoint(args.checkpoint, index=args.index, device=resolve_device(args.device))
    results = retriever.search(args.queries, k=args.k)
    text = json.dumps(results.to_json(), indent=1, ensure_ascii=False)
    if args.json_out:
        atomic_write(args.json_out, lambda f: f.write(text.encode()))
    if args.html:
        write_search_page(retriever, args.queries, results, args.html)
    print(text)
    return 0


def export(args: argparse.Namespace) -> int:
    trained = load_trained_model(args.checkpoint)
    suffix = ".onnx" if args.format == "onnx" else ".torchscript.pt"
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(suffix)
    export_model(trained, out, args.format)
    print(json.dumps({"out": str(out), "sidecar": str(out) + ".json", "format": args.format,
                      "model_id": trained.model_id}))
    return 0


def evaluate_files(args: argparse.Namespace) -> int:
    """``recallk eval --query-embeddings Q.npz --gallery-embeddings G.npz``."""
    if not (args.query_embeddings and args.gallery_embeddings):
        raise ValueError("give both --query-embeddings and --gallery-embeddings")
    metrics = evaluate_embedding_files(args.query_embeddings, args.gallery_embeddings, args.ks)
    results = {"query vs gallery": metrics}
    print(format_metrics_table(results))
    print(json.dumps(results))
    return 0
