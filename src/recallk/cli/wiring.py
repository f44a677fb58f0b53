"""Config -> objects for a training run: the model, the datasets (train, validation, test), the loss and the
evaluation callback; :mod:`recallk.cli.run` runs them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from recallk.cli.retrieval import progress_option
from recallk.config import run_context, section_arguments
from recallk.data import build_dataset, dataset_spec, validation_split
from recallk.data.splits import check_batchable
from recallk.data.transforms import transforms_for_model
from recallk.evaluation import embed_dataset, retrieval_metrics
from recallk.losses import build_loss
from recallk.models import build_model
from recallk.models.backbone import size_options
from recallk.run_folder import VALIDATION_PREFIX


def model_from_config(config: dict[str, Any]) -> torch.nn.Module:
    """The embedding model of a resolved config (section ``model``), built for ``data.image_size`` where its
    weights take one input size only (a ViT's patch grid, e.g. DINOv2's 518 px run at 224:
    :func:`recallk.models.backbone.size_options`) unless ``model.options.img_size`` says otherwise."""
    arguments = section_arguments(config, "model")
    if "img_size" not in arguments:
        arguments.update(size_options(config["model"]["name"], (config.get("data") or {}).get("image_size")))
    return build_model(config["model"]["name"], **arguments)


def test_options(config: dict[str, Any]) -> dict[str, Any]:
    """Dataset options of the test split: ``data.options`` updated by ``data.test_options``."""
    return {**config["data"]["options"], **config["data"]["test_options"]}


def datasets_from_config(
    config: dict[str, Any], model: torch.nn.Module
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """(train dataset with training augmentation, test dataset with the test transform); the training classes
    exclude the validation classes of ``data.val_classes`` (see :func:`split_datasets_from_config`)."""
    train, _, test = split_datasets_from_config(config, model)
    return train, test


def split_datasets_from_config(
    config: dict[str, Any], model: torch.nn.Module, progress: bool = True
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None, torch.utils.data.Dataset]:
    """(train, validation or None, test) datasets of a resolved config.

    With ``data.val_classes`` (a number of classes, or a fraction in (0, 1)) the training split is divided by
    :func:`recallk.data.validation_split` (seed ``data.val_seed``) into the training classes (training
    augmentation) and the validation classes (the test transform, evaluated leave-one-out); both are
    :class:`recallk.data.ClassSubset` of one decoded training split. Without it the validation set is None.
    ``progress=False`` silences the bars of dataset building (the ``skip_bad_images`` check, kanji rendering).

    Raises:
        ValueError: what :func:`recallk.data.build_dataset` raises, a bad ``data.val_classes``, or too few
            training classes left for one batch (``train.batch_size / train.per_class`` classes of ``per_class``
            images), or fewer than two validation classes with two or more images (with one, every neighbour of
            a query is a positive: recall@k and MAP@R are 100 whatever the model, and best.pt would stay the
            untrained model).
    """
    d = config["data"]
    quiet = progress_option(d["dataset"], progress)
    train_tf, test_tf = (transforms_for_model(model, kind, dataset=d["dataset"], image_size=d["image_size"])
                         for kind in ("train", "test"))
    if d["val_classes"] is None:
        train = build_dataset(d["dataset"], d["root"], d["train_split"], transform=train_tf,
                              **{**d["options"], **quiet})
        return train, None, build_dataset(d["dataset"], d["root"], d["test_split"], transform=test_tf,
                                          **{**test_options(config), **quiet})
    base = build_dataset(d["dataset"], d["root"], d["train_split"], transform=None, **{**d["options"], **quiet})
    train, val = validation_split(base, d["val_classes"], d["val_seed"], train_tf, test_tf, what="data.val_classes")
    t = config["train"]
    check_batchable(train.labels, t["batch_size"], t["per_class"],
                    f"data.val_classes={d['val_classes']} holds out {len(val.classes)} of the {len(base.classes)} "
                    f"classes of {d['dataset']}/{d['train_split']} and leaves")
    usable = int((np.bincount(val.labels) >= 2).sum())
    if usable < 2:
        n = len(base.classes)
        raise ValueError(
            f"data.val_classes={d['val_classes']} holds out {count(len(val.classes), 'class')} of the "
            f"{count(n, 'class')} of {d['dataset']}/{d['train_split']}, {usable} of them with two or more images: "
            f"validation needs at least 2 such classes (with one, every neighbour of a query is a positive, so "
            f"val/recall@k and val/map@r are 100 whatever the model and best.pt stays the untrained model); set "
            f"data.val_classes={max(2, len(val.classes) + 2 - usable)} (a number of classes) or a larger fraction, or "
            f"data.val_classes=null to choose best.pt on the test split")
    test = build_dataset(d["dataset"], d["root"], d["test_split"], transform=test_tf,
                         **{**test_options(config), **quiet})
    return train, val, test


def same_images_warning(config: dict[str, Any]) -> str | None:
    """The warning for a run that trains and tests on the same images (same dataset, root, split and options),
    with how to fix it; None when the splits differ."""
    d = config["data"]
    whole = {None, "all"} if d["dataset"] == "folder" else set()  # the folder's two names of the whole folder
    train_split, test_split = (None if s in whole else s for s in (d["train_split"], d["test_split"]))
    if train_split != test_split or d["options"] != test_options(config):
        return None
    fix = ("split a flat <class>/<image> folder by class with data.options.test_classes=0.5 (a seeded, "
           "class-disjoint train/test split; docs/datasets.md), or put the classes in <root>/train/ and <root>/test/"
           if d["dataset"] == "folder" else "set data.test_split to the dataset's test split")
    return (f"WARNING: training and testing on the same images (data.dataset={d['dataset']}, data.root={d['root']}, "
            f"data.train_split={d['train_split']}, data.test_split={d['test_split']}, same options): the test "
            f"metrics measure memorisation, not retrieval of unseen classes"
            + (", and best.pt is chosen on the training images" if d["val_classes"] is None else "") + f"; {fix}")


def criterion_from_config(config: dict[str, Any], train_labels: np.ndarray) -> torch.nn.Module:
    """The training loss (section ``loss``: its name and arguments), given the run's context (the training
    split's number of classes, ``model.embed_dim``) for the losses that take it (Proxy-Anchor's proxies)."""
    return build_loss(config["loss"]["name"], run_context(config, train_labels), **section_arguments(config, "loss"))


def eval_ks(config: dict[str, Any], dataset: str | None = None) -> tuple[int, ...]:
    """``eval.ks``, or the evaluation ks of ``dataset`` (default: ``data.dataset``) when it is null."""
    return tuple(config["eval"]["ks"] or dataset_spec(dataset or config["data"]["dataset"]).eval_ks)


def eval_callback(
    config: dict[str, Any], test_set: Any, device: torch.device, progress: bool, last: dict[str, np.ndarray],
    val_set: Any = None,
) -> Callable[[torch.nn.Module, int], dict[str, Any]]:
    """The trainer's ``eval_fn``: embed the test split, keep the embeddings in ``last``, return the metrics; with
    ``val_set`` also the leave-one-out metrics of the validation classes, under ``val/<key>`` (the Trainer then
    chooses ``best.pt`` by ``val/<train.best_metric>``)."""
    ks = eval_ks(config)

    def embed(model: torch.nn.Module, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
        return embed_dataset(model, dataset, batch_size=config["eval"]["batch_size"], device=device,
                             num_workers=config["data"]["num_workers"], progress=progress)

    def eval_fn(model: torch.nn.Module, epoch: int) -> dict[str, Any]:
        last["embeddings"], last["labels"] = embed(model, test_set)
        metrics = retrieval_metrics(last["embeddings"], last["labels"], ks)
        if val_set is not None:
            metrics.update({VALIDATION_PREFIX + k: v for k, v in retrieval_metrics(*embed(model, val_set), ks).items()})
        return metrics

    return eval_fn


def count(n: int, noun: str) -> str:
    """``count(1, "class")`` -> ``"1 class"``, ``count(3, "class")`` -> ``"3 classes"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith(('s', 'x', 'ch', 'sh')) else 's'}"


__all__ = [
    "count",
    "criterion_from_config",
    "datasets_from_config",
    "eval_callback",
    "eval_ks",
    "model_from_config",
    "same_images_warning",
    "split_datasets_from_config",
    "test_options",
]
