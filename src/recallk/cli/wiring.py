"""Config -> objects: the one place where data, model, loss, engine, evaluation and report meet."""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recallk.cli.retrieval import progress_option
from recallk.config import DEFAULTS, run_context, section_arguments, train_settings
from recallk.data import build_dataset, dataset_spec, validation_split
from recallk.data.splits import check_batchable
from recallk.data.transforms import transforms_for_model
from recallk.engine import Trainer
from recallk.engine.trainer import VALIDATION_PREFIX
from recallk.evaluation import (
    embed_dataset,
    format_metrics_table,
    pixel_embeddings,
    retrieval_metrics,
)
from recallk.losses import build_loss
from recallk.models import build_model
from recallk.report import read_metrics
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
            f"data.val_classes={d['val_classes']} holds out {_count(len(val.classes), 'class')} of the "
            f"{_count(n, 'class')} of {d['dataset']}/{d['train_split']}, {usable} of them with two or more images: "
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


def _eval_callback(
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


GAIN_COLUMN = "after - raw pixels"


def _comparison_rows(config: dict[str, Any], run_dir: Path, progress: bool = True,
                     final_step: int | None = None) -> dict[str, dict[str, Any]]:
    """Columns of the final table, in reading order: the last evaluation (``after training (epoch N)``; ``last
    evaluation (epoch N, step S)`` when training went on to ``final_step`` after it, as ``train.max_steps`` stops
    a run inside an epoch), the
    epoch a validation split chose for ``best.pt`` when it is another one (its test metrics; ``best.json``), raw
    pixels and the gain over them in points (when ``eval.pixel_baseline``), the evaluation
    before training.

    The raw-pixel embeddings (:func:`recallk.evaluation.pixel_embeddings` of the test split at
    ``data.image_size``) are also written to ``embeddings/raw_pixels/<test split>.npz`` (``embeddings``,
    ``labels``), where the report finds them for its model-vs-pixels examples.
    """
    d, rows = config["data"], {}
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    lead = None
    if evals:
        last = evals[-1]
        stale = final_step is not None and int(last.get("step", 0)) < final_step
        lead = (f"last evaluation (epoch {last['epoch']}, step {last.get('step', 0)})" if stale
                else f"after training (epoch {last['epoch']})")
        rows[lead] = last
    chosen = _best_choice(run_dir)
    if chosen is not None and chosen.get("split") == "validation" and evals and chosen["epoch"] != evals[-1]["epoch"]:
        # the test numbers of the epoch the validation split chose for best.pt
        at_best = [r for r in evals if r["epoch"] == chosen["epoch"]]
        if at_best:
            rows[f"best.pt (epoch {chosen['epoch']}, chosen on {chosen['split']})"] = at_best[-1]
    if config["eval"]["pixel_baseline"]:
        raw = build_dataset(d["dataset"], d["root"], d["test_split"], transform=None,
                            **{**test_options(config), **progress_option(d["dataset"], progress)})
        size = d["image_size"] or dataset_spec(d["dataset"]).image_size or 64
        pixels, labels = pixel_embeddings(raw, size)
        _save_embeddings(run_dir / "embeddings" / "raw_pixels" / f"{d['test_split']}.npz", pixels, labels)
        rows["raw pixels"] = retrieval_metrics(pixels, labels, eval_ks(config))
        if lead is not None:
            after = rows[lead]
            rows[GAIN_COLUMN] = {k: after[k] - v for k, v in rows["raw pixels"].items()
                                 if k in after and isinstance(v, float) and isinstance(after[k], float)}
    if evals:
        rows["before training"] = evals[0]
    return {name: {k: v for k, v in m.items() if k.startswith(SUMMARY_METRICS)} for name, m in rows.items()}


def _best_choice(run_dir: Path) -> dict[str, Any] | None:
    """``run_dir/best.json`` (which evaluation chose ``best.pt``: metric, split, value, epoch, step), or None."""
    path = run_dir / "best.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _save_embeddings(path: Path, embeddings: np.ndarray, labels: np.ndarray) -> None:
    """``np.savez(path, embeddings=, labels=)`` written atomically (a temporary file, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, embeddings=embeddings, labels=labels)
    os.replace(tmp, path)


def _count(n: int, noun: str) -> str:
    """``_count(1, "class")`` -> ``"1 class"``, ``_count(3, "class")`` -> ``"3 classes"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith(('s', 'x', 'ch', 'sh')) else 's'}"


def resume_command(config: dict[str, Any], *overrides: str) -> str:
    """The command that continues the run of ``config`` after a stop: ``recallk train --name <name> --resume``,
    plus ``runs_dir=<runs_dir>`` when it is not the default, then ``overrides`` (shell-quoted).

    Under torchrun (``WORLD_SIZE`` > 1 in the environment) the run continues on as many processes:
    ``torchrun --nproc-per-node <LOCAL_WORLD_SIZE> -m recallk train ...`` (``--nnodes <N>`` too when the processes
    span N > 1 nodes), followed by "(with the same torchrun options as before)": the rendezvous options are not
    known here."""
    words = ["train", "--name", str(config["name"]), "--resume"]
    if config["runs_dir"] != DEFAULTS["runs_dir"]:
        words.append(f"runs_dir={config['runs_dir']}")
    words += overrides
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return shlex.join(["recallk", *words])
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    nodes = max(world_size // max(per_node, 1), 1)
    launcher = ["torchrun", *(["--nnodes", str(nodes)] if nodes > 1 else []), "--nproc-per-node", str(per_node)]
    return shlex.join([*launcher, "-m", "recallk", *words]) + " (with the same torchrun options as before)"


def finished_run_message(config: dict[str, Any], run_dir: Path) -> str | None:
    """For ``--resume``: what to say when ``run_dir/checkpoints/last.pt`` has already done all the run asks
    (``train.epochs`` completed, or ``train.max_steps`` steps made, and no interrupted evaluation to run again),
    naming the key to raise; None when there is training left."""
    from recallk.engine import load_checkpoint

    state = load_checkpoint(run_dir / "checkpoints" / "last.pt", map_location="cpu")
    if state.get("pending_eval") is not None:
        return None
    epoch, step, t = int(state.get("epoch", 0)), int(state.get("step", 0)), config["train"]
    if epoch >= t["epochs"]:
        done = (f"{epoch}/{t['epochs']} epochs" if epoch == t["epochs"]
                else f"{epoch} epochs (train.epochs={t['epochs']})")
        more = f"train.epochs={t['epochs'] + epoch}"
        return (f"run {config['name']} already finished {done}: nothing to train; raise "
                f"train.epochs to continue (e.g. {resume_command(config, more)})")
    if t["max_steps"] is not None and step >= t["max_steps"]:
        return (f"run {config['name']} already made {step}/{t['max_steps']} steps (train.max_steps): nothing to "
                f"train; raise train.max_steps to continue (or train.max_steps=null)")
    return None


def _append_to_log(run_dir: Path, text: str) -> None:
    """Append ``text`` (several lines) to ``run_dir/train.log``, each line with a timestamp."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(run_dir / "train.log", "a", encoding="utf-8") as handle:
        handle.write("".join(f"{stamp} {line}\n" for line in text.splitlines()))


def _log_at_start(message: str, run_dir: Path, warning: bool = False) -> None:
    """A line of the start (rank 0): appended to ``run_dir/train.log`` with a timestamp, and printed: a
    ``warning`` on stderr (always, whatever the warning filters), anything else through the ``recallk.train``
    logger (stdout under the CLI)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "a", encoding="utf-8") as handle:
        handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
    if warning:
        print(message, file=sys.stderr, flush=True)
    else:
        logging.getLogger("recallk.train").info(message)


def train_from_config(
    config: dict[str, Any], run_dir: Path, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train as ``config`` says, in ``run_dir``; returns ``{"table": str, "final": metrics}``.

    Writes ``embeddings/<test split>.npz`` of the final evaluation, ``embeddings/raw_pixels/<test split>.npz``
    (with ``eval.pixel_baseline``), rank 0 only (``recallk train`` then writes ``report.html``). The table leads
    with the trained model, then raw pixels and the trained model's gain over them, then the model before training.
    """
    seed_everything(config["seed"])
    main_process = os.environ.get("RANK", "0") == "0"
    warning = same_images_warning(config)
    if warning and main_process:
        _log_at_start(warning, run_dir, warning=True)
    model = model_from_config(config)
    train_set, val_set, test_set = split_datasets_from_config(config, model, progress=progress)
    if val_set is not None and main_process:
        d = config["data"]
        _log_at_start(f"validation   {len(val_set)} images, {_count(len(val_set.classes), 'class')} held out of "
                      f"{d['train_split']} (data.val_classes={d['val_classes']}, data.val_seed={d['val_seed']}); "
                      f"they choose best.pt by val/{config['train']['best_metric']}", run_dir)
    criterion = criterion_from_config(config, train_set.labels)
    settings = train_settings(config, progress=progress, distributed=int(os.environ.get("WORLD_SIZE", "1")) > 1)
    last: dict[str, np.ndarray] = {}
    eval_fn = _eval_callback(config, test_set, resolve_device(settings.device), progress, last, val_set=val_set)
    trainer = Trainer(model, criterion, train_set, run_dir, settings, eval_fn=eval_fn, config=config,
                      resume_command=resume_command(config))
    final = trainer.fit(resume=resume)
    if trainer.rank != 0:
        return {"table": "", "final": final}
    if last:
        _save_embeddings(run_dir / "embeddings" / f"{config['data']['test_split']}.npz", last["embeddings"],
                         last["labels"])
    # _comparison_rows also writes the raw pixels the report reads
    rows = _comparison_rows(config, run_dir, progress, final_step=trainer.step)
    table = format_metrics_table(rows)
    if any(name.startswith("last evaluation") for name in rows):
        table += (f"\nnote: training went on to step {trainer.step} after the last evaluation (train.max_steps "
                  f"stopped it inside an epoch); the columns show that evaluation. Evaluate the final weights with: "
                  f"recallk eval --checkpoint {run_dir / 'checkpoints' / 'last.pt'}")
    _append_to_log(run_dir, table)  # the final table, as stdout shows it
    return {"table": table,
            "final": {k: v for k, v in final.items() if isinstance(v, (int, float))}}


__all__ = [
    "criterion_from_config",
    "datasets_from_config",
    "finished_run_message",
    "model_from_config",
    "resume_command",
    "same_images_warning",
    "split_datasets_from_config",
    "train_from_config",
]
