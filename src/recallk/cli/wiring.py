"""Config -> objects: the one place where data, model, loss, engine, evaluation and report meet."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recallk.config import section_arguments, train_settings
from recallk.data import build_dataset, dataset_spec
from recallk.data.transforms import transforms_for_model
from recallk.engine import Trainer
from recallk.evaluation import (
    embed_dataset,
    evaluate_protocol,
    format_metrics_table,
    pixel_embeddings,
    query_gallery_metrics,
    retrieval_metrics,
)
from recallk.losses import build_loss
from recallk.models import build_model
from recallk.report import read_metrics, write_report
from recallk.retrieval import load_trained_model
from recallk.utils import resolve_device, seed_everything

SUMMARY_METRICS = ("recall@", "map@r", "r_precision")


def model_from_config(config: dict[str, Any]) -> torch.nn.Module:
    """The embedding model of a resolved config (section ``model``)."""
    return build_model(config["model"]["name"], **section_arguments(config, "model"))


def test_options(config: dict[str, Any]) -> dict[str, Any]:
    """Dataset options of the test split: ``data.options`` updated by ``data.test_options``."""
    return {**config["data"]["options"], **config["data"]["test_options"]}


def datasets_from_config(
    config: dict[str, Any], model: torch.nn.Module
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """(train dataset with training augmentation, test dataset with the test transform)."""
    d = config["data"]
    train_tf, test_tf = (transforms_for_model(model, kind, dataset=d["dataset"], image_size=d["image_size"])
                         for kind in ("train", "test"))
    train = build_dataset(d["dataset"], d["root"], d["train_split"], transform=train_tf, **d["options"])
    test = build_dataset(d["dataset"], d["root"], d["test_split"], transform=test_tf, **test_options(config))
    return train, test


def criterion_from_config(config: dict[str, Any], train_labels: np.ndarray) -> torch.nn.Module:
    """The training loss (section ``loss``): RS@k from its arguments, any other loss from ``loss.options``."""
    name = config["loss"]["name"]
    if name == "rsk":
        return build_loss("rsk", **section_arguments(config, "loss"))
    options = dict(config["loss"]["options"])
    if name == "proxy_anchor":
        options.setdefault("num_classes", int(np.max(train_labels)) + 1)
        options.setdefault("embedding_size", config["model"]["embed_dim"])
    return build_loss(name, **options)


def eval_ks(config: dict[str, Any], dataset: str | None = None) -> tuple[int, ...]:
    """``eval.ks``, or the evaluation ks of ``dataset`` (default: ``data.dataset``) when it is null."""
    return tuple(config["eval"]["ks"] or dataset_spec(dataset or config["data"]["dataset"]).eval_ks)


def _eval_callback(config: dict[str, Any], test_set: Any, device: torch.device, progress: bool,
                   last: dict[str, np.ndarray]) -> Callable[[torch.nn.Module, int], dict[str, Any]]:
    """The trainer's ``eval_fn``: embed the test split, keep the embeddings in ``last``, return the metrics."""
    ks = eval_ks(config)

    def eval_fn(model: torch.nn.Module, epoch: int) -> dict[str, Any]:
        last["embeddings"], last["labels"] = embed_dataset(
            model, test_set, batch_size=config["eval"]["batch_size"], device=device,
            num_workers=config["data"]["num_workers"], progress=progress)
        return retrieval_metrics(last["embeddings"], last["labels"], ks)

    return eval_fn


GAIN_COLUMN = "after - raw pixels"


def _comparison_rows(config: dict[str, Any], run_dir: Path) -> dict[str, dict[str, Any]]:
    """Columns of the final table, in reading order: the last evaluation (``after training (epoch N)``), raw
    pixels and the gain over them in points (when ``eval.pixel_baseline``), the evaluation before training.

    The raw-pixel embeddings (:func:`recallk.evaluation.pixel_embeddings` of the test split at
    ``data.image_size``) are also written to ``embeddings/raw_pixels/<test split>.npz`` (``embeddings``,
    ``labels``), where the report finds them for its model-vs-pixels examples.
    """
    d, rows = config["data"], {}
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    if evals:
        rows[f"after training (epoch {evals[-1]['epoch']})"] = evals[-1]
    if config["eval"]["pixel_baseline"]:
        raw = build_dataset(d["dataset"], d["root"], d["test_split"], transform=None, **test_options(config))
        size = d["image_size"] or dataset_spec(d["dataset"]).image_size or 64
        pixels, labels = pixel_embeddings(raw, size)
        _save_embeddings(run_dir / "embeddings" / "raw_pixels" / f"{d['test_split']}.npz", pixels, labels)
        rows["raw pixels"] = retrieval_metrics(pixels, labels, eval_ks(config))
        if evals:
            after = rows[f"after training (epoch {evals[-1]['epoch']})"]
            rows[GAIN_COLUMN] = {k: after[k] - v for k, v in rows["raw pixels"].items()
                                 if k in after and isinstance(v, float) and isinstance(after[k], float)}
    if evals:
        rows["before training"] = evals[0]
    return {name: {k: v for k, v in m.items() if k.startswith(SUMMARY_METRICS)} for name, m in rows.items()}


def _save_embeddings(path: Path, embeddings: np.ndarray, labels: np.ndarray) -> None:
    """``np.savez(path, embeddings=, labels=)`` written atomically (a temporary file, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, embeddings=embeddings, labels=labels)
    os.replace(tmp, path)


def train_from_config(
    config: dict[str, Any], run_dir: Path, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train as ``config`` says, in ``run_dir``; returns ``{"table": str, "final": metrics}``.

    Writes ``embeddings/<test split>.npz`` of the final evaluation, ``embeddings/raw_pixels/<test split>.npz``
    (with ``eval.pixel_baseline``) and ``report.html`` (rank 0 only). The table leads with the trained model,
    then raw pixels and the trained model's gain over them, then the model before training.
    """
    seed_everything(config["seed"])
    model = model_from_config(config)
    train_set, test_set = datasets_from_config(config, model)
    criterion = criterion_from_config(config, train_set.labels)
    settings = train_settings(config, progress=progress, distributed=int(os.environ.get("WORLD_SIZE", "1")) > 1)
    last: dict[str, np.ndarray] = {}
    eval_fn = _eval_callback(config, test_set, resolve_device(settings.device), progress, last)
    trainer = Trainer(model, criterion, train_set, run_dir, settings, eval_fn=eval_fn)
    final = trainer.fit(resume=resume)
    if trainer.rank != 0:
        return {"table": "", "final": final}
    if last:
        _save_embeddings(run_dir / "embeddings" / f"{config['data']['test_split']}.npz", last["embeddings"],
                         last["labels"])
    table = format_metrics_table(_comparison_rows(config, run_dir))  # before the report: it reads the pixels
    write_report(run_dir)
    return {"table": table,
            "final": {k: v for k, v in final.items() if isinstance(v, (int, float))}}


def evaluate_checkpoint(
    checkpoint: Path,
    dataset: str | None = None,
    root: str | None = None,
    splits: list[str] | None = None,
    ks: list[int] | None = None,
    query: str | None = None,
    gallery: str | None = None,
    **embed_options: Any,
) -> dict[str, dict[str, Any]]:
    """Evaluate a trainer checkpoint (:func:`recallk.retrieval.load_trained_model`: its run folder's ``config.yaml``
    rebuilds the model); ``embed_options``
    (``batch_size``, ``device``, ``progress``) go to :func:`recallk.evaluation.embed_dataset`.

    With ``query`` and ``gallery`` (two ``<class>/<image>`` folders, instead of ``dataset``/``root``/``splits``)
    the query images search the gallery images (``recallk.evaluation.query_gallery_metrics``: classes matched
    by folder name); the result is ``{"query": metrics}``. ``ks`` default to ``eval.ks`` of the run, else the
    folder dataset's.

    Raises:
        ValueError: missing checkpoint or config, only one of query/gallery, query/gallery mixed with
            dataset/root/splits, or anything the dataset or metrics reject.
    """
    if (query is None) != (gallery is None):
        raise ValueError("give both --query and --gallery (two <class>/<image> folders), or neither")
    if query is not None and (dataset or root or splits):
        raise ValueError("--query/--gallery evaluate two folders: leave out --dataset, --root and --split")
    trained = load_trained_model(checkpoint)  # the run's config.yaml, its model and weights (nothing downloaded)
    model, config = trained.model, trained.config
    d = config["data"]
    name = dataset or d["dataset"]
    same = name == d["dataset"]
    transform = transforms_for_model(model, "test", dataset=name, image_size=d["image_size"])
    root = root if root is not None else (d["root"] if same else None)
    if name == "folder" and splits is None and root is not None and not (Path(root) / "test").is_dir():
        splits = ["all"]  # a plain folder of class folders: evaluate all of it, leave-one-out
    embed_options["device"] = resolve_device(embed_options.get("device", "auto"))
    if query is not None:
        tf = transforms_for_model(model, "test", dataset="folder", image_size=d["image_size"])
        sets = [build_dataset("folder", folder, None, tf) for folder in (query, gallery)]
        (q_emb, _), (g_emb, _) = (embed_dataset(model, ds, num_workers=d["num_workers"], **embed_options)
                                  for ds in sets)
        folder_ks = ks or config["eval"]["ks"] or dataset_spec("folder").eval_ks
        return {"query": query_gallery_metrics(q_emb, sets[0], g_emb, sets[1], folder_ks,
                                               device=embed_options["device"])}
    return evaluate_protocol(
        model, name, root, transform, ks=ks or (config["eval"]["ks"] if same else None), splits=splits,
        dataset_options=test_options(config) if same else {}, num_workers=d["num_workers"], **embed_options,
    )


__all__ = [
    "criterion_from_config",
    "datasets_from_config",
    "evaluate_checkpoint",
    "model_from_config",
    "train_from_config",
]
