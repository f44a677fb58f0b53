"""Config -> objects: the one place where data, model, loss, engine, evaluation and report meet."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recallk.config import load_config
from recallk.data import DEFAULT_EVAL_KS, build_dataset
from recallk.data.transforms import transforms_for_model
from recallk.engine import Trainer, load_checkpoint
from recallk.evaluation import (
    embed_dataset,
    evaluate_protocol,
    format_metrics_table,
    pixel_embeddings,
    retrieval_metrics,
)
from recallk.losses import build_loss
from recallk.models import build_model
from recallk.report import read_metrics, write_report
from recallk.utils import resolve_device, seed_everything

SUMMARY_METRICS = ("recall@", "map@r", "r_precision")


def model_from_config(config: dict[str, Any]) -> torch.nn.Module:
    """The embedding model of a resolved config (section ``model``)."""
    m = config["model"]
    return build_model(
        m["name"],
        embed_dim=m["embed_dim"],
        pretrained=m["pretrained"],
        pooling=m["pooling"],
        freeze_bn=m["freeze_bn"],
        **m["options"],
    )


def datasets_from_config(
    config: dict[str, Any], model: torch.nn.Module
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """(train dataset with training augmentation, test dataset with the test transform)."""
    d = config["data"]
    size = d["image_size"]
    train_tf = transforms_for_model(model, "train", dataset=d["dataset"], image_size=size)
    test_tf = transforms_for_model(model, "test", dataset=d["dataset"], image_size=size)
    train = build_dataset(d["dataset"], d["root"], d["train_split"], transform=train_tf, **d["options"])
    test = build_dataset(d["dataset"], d["root"], d["test_split"], transform=test_tf, **test_options(config))
    return train, test


def test_options(config: dict[str, Any]) -> dict[str, Any]:
    """Dataset options of the test split: ``data.options`` updated by ``data.test_options``."""
    return {**config["data"]["options"], **config["data"]["test_options"]}


def criterion_from_config(config: dict[str, Any], train_labels: np.ndarray) -> torch.nn.Module:
    """The training loss (section ``loss``); baselines get their pytorch-metric-learning options."""
    loss = config["loss"]
    if loss["name"] == "rsk":
        return build_loss(
            "rsk",
            ks=tuple(loss["ks"]),
            tau_rank=loss["tau_rank"],
            tau_k=loss["tau_k"],
            include_query=loss["include_query"],
            simix=loss["simix"],
            max_pairs_per_class=loss["max_pairs_per_class"],
            backend=loss["backend"],
            similarity=loss["similarity"],
            **loss["options"],
        )
    options = dict(loss["options"])
    if loss["name"] == "proxy_anchor":
        options.setdefault("num_classes", int(np.max(train_labels)) + 1)
        options.setdefault("embedding_size", config["model"]["embed_dim"])
    return build_loss(loss["name"], **options)


def _is_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def train_from_config(
    config: dict[str, Any], run_dir: Path, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train as ``config`` says, in ``run_dir``; returns ``{"table": str, "final": metrics}``.

    Writes ``embeddings/<test split>.npz`` of the final evaluation and ``report.html`` (rank 0 only).
    """
    seed_everything(config["seed"])
    model = model_from_config(config)
    train_set, test_set = datasets_from_config(config, model)
    criterion = criterion_from_config(config, train_set.labels)
    t, e, d = config["train"], config["eval"], config["data"]
    ks = tuple(e["ks"] or DEFAULT_EVAL_KS.get(d["dataset"], (1, 2, 4, 8)))
    device = resolve_device(t["device"])
    last: dict[str, np.ndarray] = {}

    def eval_fn(model: torch.nn.Module, epoch: int) -> dict[str, Any]:
        emb, labels = embed_dataset(model, test_set, batch_size=e["batch_size"], device=device,
                                    num_workers=d["num_workers"], progress=progress)
        last["embeddings"], last["labels"] = emb, labels
        return retrieval_metrics(emb, labels, ks)

    trainer = Trainer(
        model, criterion, train_set, run_dir,
        batch_size=t["batch_size"], chunk_size=t["chunk_size"], per_class=t["per_class"], epochs=t["epochs"],
        optimizer=t["optimizer"], lr=t["lr"], weight_decay=t["weight_decay"], milestones=tuple(t["milestones"]),
        gamma=t["gamma"], loss_lr_multiplier=t["loss_lr_multiplier"], amp=t["amp"], device=device,
        seed=config["seed"], eval_fn=eval_fn,
        eval_every=t["eval_every"], best_metric=t["best_metric"], num_workers=d["num_workers"],
        max_steps_per_epoch=t["max_steps_per_epoch"], progress=progress, distributed=_is_distributed(),
    )
    final = trainer.fit(resume=resume)
    if trainer.rank != 0:
        return {"table": "", "final": final}

    rows = {}
    if e["pixel_baseline"]:
        raw = build_dataset(d["dataset"], d["root"], d["test_split"], transform=None, **test_options(config))
        rows["raw pixels"] = retrieval_metrics(*pixel_embeddings(raw, d["image_size"] or 64), ks)
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    if evals:
        rows["before training"] = evals[0]
        rows[f"after training (epoch {evals[-1]['epoch']})"] = evals[-1]
    if last:
        out = run_dir / "embeddings"
        out.mkdir(exist_ok=True)
        np.savez(out / f"{d['test_split']}.npz", embeddings=last["embeddings"], labels=last["labels"])
    write_report(run_dir)
    table = format_metrics_table({name: _summary(m) for name, m in rows.items()})
    return {"table": table, "final": {k: v for k, v in final.items() if isinstance(v, (int, float))}}


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k.startswith(SUMMARY_METRICS)}


def evaluate_checkpoint(
    checkpoint: Path,
    dataset: str | None = None,
    root: str | None = None,
    splits: list[str] | None = None,
    ks: list[int] | None = None,
    batch_size: int = 256,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Evaluate a trainer checkpoint (its run folder's ``config.yaml`` rebuilds the model).

    Raises:
        ValueError: missing checkpoint or config, or anything the dataset or metrics reject.
    """
    if not checkpoint.is_file():
        raise ValueError(f"checkpoint not found: {checkpoint}")
    config_path = checkpoint.resolve().parent.parent / "config.yaml"
    if not config_path.is_file():
        raise ValueError(
            f"{config_path} not found: a checkpoint is evaluated with the config.yaml of its run folder "
            "(runs/<name>/checkpoints/<file>.pt)"
        )
    config = load_config(config_path)
    model = model_from_config(config)
    state = load_checkpoint(checkpoint, map_location="cpu")
    model.load_state_dict(state.get("model", state))
    d = config["data"]
    name = dataset or d["dataset"]
    same = name == d["dataset"]
    transform = transforms_for_model(model, "test", dataset=name, image_size=d["image_size"])
    options: dict[str, Any] = test_options(config) if same else {}
    root = root if root is not None else (d["root"] if same else None)
    if name == "folder" and splits is None and root is not None and not (Path(root) / "test").is_dir():
        splits = ["all"]  # a plain folder of class folders: evaluate all of it, leave-one-out
    return evaluate_protocol(
        model, name, root, transform,
        ks=ks or (config["eval"]["ks"] if same else None), splits=splits, batch_size=batch_size,
        device=resolve_device(device), num_workers=d["num_workers"], progress=progress, **options,
    )


__all__ = [
    "criterion_from_config",
    "datasets_from_config",
    "evaluate_checkpoint",
    "model_from_config",
    "train_from_config",
]
