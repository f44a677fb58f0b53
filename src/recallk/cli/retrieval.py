"""The ``embed``, ``index``, ``search`` and ``export`` sub-commands and ``eval`` on two embedding files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from recallk.data import build_dataset, dataset_spec
from recallk.evaluation import format_metrics_table
from recallk.retrieval import (
    GalleryIndex,
    Retriever,
    SearchResults,
    evaluate_embedding_files,
    export_model,
    image_files,
    load_trained_model,
    write_embeddings,
    write_search_page,
)
from recallk.retrieval.embed import ImageItems, class_folder_labels
from recallk.run_folder import write_atomic
from recallk.utils import resolve_device


def progress_option(name: str, progress: bool) -> dict[str, Any]:
    """``{"progress": False}`` when ``progress`` is False and dataset ``name``'s builder takes a ``progress``
    option (the image datasets: the bar of the ``skip_bad_images`` check; kanji: the rendering bar), else ``{}``:
    the build_dataset option by which the CLI's ``--no-progress`` silences dataset building. ValueError for an
    unknown dataset name."""
    return {"progress": False} if not progress and "progress" in dataset_spec(name).options else {}


def run_data_options(data: dict[str, Any], name: str, root: str | Path | None) -> dict[str, Any]:
    """The dataset options of a run (``data.options`` with ``data.test_options`` over them) when dataset ``name``
    at ``root`` is the run's own data, else ``{}``.

    ``data`` is the run config's ``data`` section. The data are the run's own when ``name`` is its
    ``data.dataset`` and ``root`` is None (the run's recorded ``data.root`` is used) or names the same folder as
    ``data.root`` (both made absolute). Another root holds other data, perhaps in another layout (a folder with
    ``train/`` and ``test/`` folders where the run split one by ``test_classes``), so the run's options do not
    apply to it. Raises nothing.
    """
    if name != data.get("dataset"):
        return {}
    recorded = data.get("root")
    if root is not None and (recorded is None or Path(root).resolve() != Path(recorded).resolve()):
        return {}
    return {**(data.get("options") or {}), **(data.get("test_options") or {})}


def _dataset_source(args: argparse.Namespace, config: dict[str, Any], transform: Any) -> tuple[Any, dict]:
    data = config.get("data") or {}
    if args.dataset is None:
        if args.root is None:
            raise ValueError("give --root DIR (an image folder) or --dataset NAME [--root DIR] [--split S]")
        files = image_files(args.root)
        labelled = class_folder_labels(args.root, files)  # <class>/<image>: the class folders' labels
        source = {"folder": str(Path(args.root).resolve()), **({"labels": "class folders"} if labelled else {})}
        return ImageItems(files, transform, *(labelled or ())), source
    same = args.dataset == data.get("dataset")
    split = args.split or (data.get("test_split") if same else None)
    root = args.root if args.root is not None else (data.get("root") if same else None)
    options = run_data_options(data, args.dataset, args.root)  # the run's options only on the run's own data
    if split == "all" and "test_classes" in options:  # the whole folder of a run split by test_classes
        options = {k: v for k, v in options.items() if k not in ("test_classes", "test_seed")}
    dataset = build_dataset(args.dataset, root, split, transform=transform, **options,
                            **progress_option(args.dataset, not args.no_progress))
    source = {"dataset": args.dataset, "root": str(Path(root).resolve()) if root else None, "split": split,
              "options": options}
    return dataset, source


def embed(args: argparse.Namespace) -> int:
    trained = load_trained_model(args.checkpoint)
    dataset, source = _dataset_source(args, trained.config, trained.transform)
    out = write_embeddings(trained, dataset, args.out, source, float16=args.float16, batch_size=args.batch_size,
                           device=resolve_device(args.device), progress=not args.no_progress)
    print(json.dumps({"out": str(out), "count": len(dataset), "dim": trained.embed_dim,
                      "classes": len(getattr(dataset, "classes", None) or []), "model_id": trained.model_id}))
    return 0


def index(args: argparse.Namespace) -> int:
    gallery = GalleryIndex.build(args.embeddings, args.kind, nlist=args.nlist, nprobe=args.nprobe,
                                 hnsw_m=args.hnsw_m, ef_construction=args.ef_construction, ef_search=args.ef_search)
    gallery.save(args.out)
    keys = ("kind", "params", "count", "dim", "build_seconds", "recall@10_vs_exact", "model_id")
    print(json.dumps({"out": args.out, **{k: gallery.metadata[k] for k in keys if k in gallery.metadata}}))
    return 0


def short_results_message(results: SearchResults, gallery: GalleryIndex) -> str:
    """What to tell a user whose approximate index found fewer than k neighbours for some queries."""
    k, kind, params = results.indices.shape[1], gallery.kind, gallery.metadata.get("params") or {}
    if kind == "ivf":
        fix = (f"rebuild the index with a larger --nprobe (now {params.get('nprobe')} of {params.get('nlist')} "
               "lists: recallk index EMB --kind ivf --nprobe N)")
    elif kind == "hnsw":
        fix = (f"rebuild the index with a larger --ef-search (now {params.get('ef_search')}; try at least --k: "
               "recallk index EMB --kind hnsw --ef-search N)")
    else:
        fix = "rebuild the index"
    return (f"{results.short_queries} of {len(results.queries)} queries got fewer than --k {k} neighbours from the "
            f"approximate {kind} index (their lists are shorter); {fix}, or use the exact index (--kind flat)")


def search(args: argparse.Namespace) -> int:
    retriever = Retriever.from_checkpoint(args.checkpoint, index=args.index, device=resolve_device(args.device))
    results = retriever.search(args.queries, k=args.k)
    if results.short_queries:
        print(f"recallk search: warning: {short_results_message(results, retriever.index)}", file=sys.stderr)
    text = json.dumps(results.to_json(), indent=1, ensure_ascii=False)
    if args.json_out:
        write_atomic(args.json_out, text)
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
    metrics = evaluate_embedding_files(args.query_embeddings, args.gallery_embeddings, args.ks,
                                       notice=lambda line: print(f"recallk eval: note: {line}", file=sys.stderr))
    results = {"query vs gallery": metrics}
    print(format_metrics_table(results))
    print(json.dumps(results))
    return 0
