"""A training run of ``recallk train``: objects from the config (:mod:`recallk.cli.wiring`), the Trainer, the start
lines of ``train.log``, the final embeddings and the comparison table; what continues a stopped run
(:func:`resume_command`) and what a finished one says (:func:`finished_run_message`)."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from recallk.cli.retrieval import progress_option
from recallk.cli.wiring import (
    count,
    criterion_from_config,
    eval_callback,
    eval_ks,
    model_from_config,
    same_images_warning,
    split_datasets_from_config,
    test_options,
)
from recallk.config import DEFAULTS, section_arguments, train_settings
from recallk.data import build_dataset, dataset_spec
from recallk.engine import Trainer
from recallk.evaluation import (
    embed_dataset,
    format_metrics_table,
    pixel_embeddings,
    pretrained_embedding_model,
    retrieval_metrics,
)
from recallk.report.comparison import comparison_columns
from recallk.run_folder import (
    RunFolder,
    append_log,
    read_best,
    read_embeddings_npz,
    read_metrics,
    write_embeddings_npz,
)
from recallk.utils import resolve_device, seed_everything

GAIN_COLUMN = "after - raw pixels"
#: the column of the pretrained network as it is (its own embedding, no head, no training)
ZERO_SHOT_COLUMN = "pretrained, zero-shot"


def comparison_rows(config: dict[str, Any], run_dir: Path, progress: bool = True,
                    final_step: int | None = None) -> dict[str, dict[str, Any]]:
    """Columns of the final table (:func:`recallk.report.comparison.comparison_columns`), in reading order: the
    last evaluation (``after training (epoch N)``; ``last evaluation (epoch N, step S)`` when training went on to
    ``final_step`` after it, as ``train.max_steps`` stops a run inside an epoch), the epoch a validation split
    chose for ``best.pt`` when it is another one (its test metrics; ``best.json``), raw pixels and the gain over
    them in points (when ``eval.pixel_baseline``), the pretrained network zero-shot (a run from pretrained
    weights: ``embeddings/zero_shot/<test split>.npz``, written by :func:`write_zero_shot` at the start), the
    evaluation before training.

    The raw-pixel embeddings (:func:`recallk.evaluation.pixel_embeddings` of the test split at
    ``data.image_size``) are also written to ``embeddings/raw_pixels/<test split>.npz`` (``embeddings``,
    ``labels``), where the report finds them for its model-vs-pixels examples.
    """
    d, folder = config["data"], RunFolder(run_dir)
    evals = [r for r in read_metrics(folder.metrics) if r["kind"] == "eval"]
    last = evals[-1] if evals else None
    names = {"baseline": "raw pixels", "gain": GAIN_COLUMN, "zero_shot": ZERO_SHOT_COLUMN, "before": "before training"}
    if last is not None:
        stale = final_step is not None and int(last.get("step", 0)) < final_step
        names["last"] = (f"last evaluation (epoch {last['epoch']}, step {last.get('step', 0)})" if stale
                         else f"after training (epoch {last['epoch']})")
    best = None
    chosen = read_best(folder.best_json)
    if chosen is not None and chosen.get("split") == "validation" and last is not None \
            and chosen["epoch"] != last["epoch"]:
        # the test numbers of the epoch the validation split chose for best.pt
        at_best = [r for r in evals if r["epoch"] == chosen["epoch"]]
        if at_best:
            best = at_best[-1]
            names["best"] = f"best.pt (epoch {chosen['epoch']}, chosen on {chosen['split']})"
    baseline = None
    if config["eval"]["pixel_baseline"]:
        raw = build_dataset(d["dataset"], d["root"], d["test_split"], transform=None,
                            **{**test_options(config), **progress_option(d["dataset"], progress)})
        size = d["image_size"] or dataset_spec(d["dataset"]).image_size or 64
        pixels, labels = pixel_embeddings(raw, size)
        write_embeddings_npz(folder.raw_pixels(d["test_split"]), pixels, labels)
        baseline = retrieval_metrics(pixels, labels, eval_ks(config))
    zero_shot = None
    if folder.zero_shot(d["test_split"]).is_file():
        zero_shot = retrieval_metrics(*read_embeddings_npz(folder.zero_shot(d["test_split"])), eval_ks(config))
    return comparison_columns(names, last, best=best, baseline=baseline, before=evals[0] if evals else None,
                              zero_shot=zero_shot)


def starts_pretrained(config: dict[str, Any]) -> bool:
    """Whether the run's backbone starts from pretrained weights (``model.pretrained`` true, a file or a weights
    package name), so that its table has a "pretrained, zero-shot" column."""
    return config["model"].get("pretrained") not in (None, False, "")


def write_zero_shot(config: dict[str, Any], test_set: Any, run_dir: Path, device: Any,
                    progress: bool = True) -> dict[str, Any]:
    """Embed the run's test split (``test_set``, with the run's test transform) with the pretrained network as it
    is: ``build_model(model.name, embed_dim=None, pooling=None, ...)`` with the run's other model arguments (its
    own embedding, L2-normalised, no head of ours, no training:
    :func:`recallk.evaluation.pretrained_embedding_model`); write the embeddings to
    ``embeddings/zero_shot/<test split>.npz`` and return their metrics at the run's ks (the "pretrained,
    zero-shot" column of the final table and of report.html: the floor the fine-tuned model is compared with).
    """
    arguments = section_arguments(config, "model")
    for key in ("embed_dim", "pooling"):  # no head of ours; the pooling the network was trained with
        arguments.pop(key, None)
    network = pretrained_embedding_model(config["model"]["name"], image_size=config["data"]["image_size"],
                                         **arguments)
    embeddings, labels = embed_dataset(network, test_set, batch_size=config["eval"]["batch_size"], device=device,
                                       num_workers=config["data"]["num_workers"], progress=progress)
    write_embeddings_npz(RunFolder(run_dir).zero_shot(config["data"]["test_split"]), embeddings, labels)
    return retrieval_metrics(embeddings, labels, eval_ks(config))


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
    (``train.epochs`` completed, or ``train.max_steps`` steps made), naming the key to raise; None when there is
    training left."""
    from recallk.engine import load_checkpoint

    state = load_checkpoint(RunFolder(run_dir).last_pt, map_location="cpu")
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


def log_at_start(message: str, run_dir: Path, warning: bool = False) -> None:
    """A line of the start (rank 0): appended to ``run_dir/train.log`` with a timestamp, and printed: a
    ``warning`` on stderr (always, whatever the warning filters), anything else through the ``recallk.train``
    logger (stdout under the CLI)."""
    append_log(RunFolder(run_dir).train_log, message)
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
    with the trained model, then raw pixels and the trained model's gain over them, then the pretrained network
    zero-shot (a run from pretrained weights: :func:`write_zero_shot`, once at the start, rank 0), then the model
    before training.
    """
    seed_everything(config["seed"])
    folder = RunFolder(run_dir)
    main_process = os.environ.get("RANK", "0") == "0"
    warning = same_images_warning(config)
    if warning and main_process:
        log_at_start(warning, run_dir, warning=True)
    model = model_from_config(config)
    train_set, val_set, test_set = split_datasets_from_config(config, model, progress=progress)
    if val_set is not None and main_process:
        d = config["data"]
        log_at_start(f"validation   {len(val_set)} images, {count(len(val_set.classes), 'class')} held out of "
                     f"{d['train_split']} (data.val_classes={d['val_classes']}, data.val_seed={d['val_seed']}); "
                     f"they choose best.pt by val/{config['train']['best_metric']}", run_dir)
    criterion = criterion_from_config(config, train_set.labels)
    settings = train_settings(config, progress=progress, distributed=int(os.environ.get("WORLD_SIZE", "1")) > 1)
    zero_path = folder.zero_shot(config["data"]["test_split"])
    if main_process and starts_pretrained(config) and not zero_path.is_file():
        zero = write_zero_shot(config, test_set, run_dir, resolve_device(settings.device), progress)
        log_at_start(f"zero-shot    the pretrained network as it is (its own embedding, no head, no training) on "
                     f"{config['data']['test_split']}: recall@1 {100 * zero['recall@1']:.2f}, map@r "
                     f"{100 * zero['map@r']:.2f} (the floor of fine-tuning; {zero_path.relative_to(run_dir)})",
                     run_dir)
    last: dict[str, np.ndarray] = {}
    eval_fn = eval_callback(config, test_set, resolve_device(settings.device), progress, last, val_set=val_set)
    trainer = Trainer(model, criterion, train_set, run_dir, settings, eval_fn=eval_fn, config=config,
                      resume_command=resume_command(config))
    final = trainer.fit(resume=resume)
    if trainer.rank != 0:
        return {"table": "", "final": final}
    if last:
        write_embeddings_npz(folder.embeddings(config["data"]["test_split"]), last["embeddings"], last["labels"])
    # comparison_rows also writes the raw pixels the report reads
    rows = comparison_rows(config, run_dir, progress, final_step=trainer.step)
    table = format_metrics_table(rows)
    if any(name.startswith("last evaluation") for name in rows):
        table += (f"\nnote: training went on to step {trainer.step} after the last evaluation (train.max_steps "
                  f"stopped it inside an epoch); the columns show that evaluation. Evaluate the final weights with: "
                  f"recallk eval --checkpoint {folder.last_pt}")
    append_log(folder.train_log, table)  # the final table, as stdout shows it
    return {"table": table,
            "final": {k: v for k, v in final.items() if isinstance(v, (int, float))}}


__all__ = [
    "GAIN_COLUMN",
    "ZERO_SHOT_COLUMN",
    "comparison_rows",
    "finished_run_message",
    "log_at_start",
    "resume_command",
    "starts_pretrained",
    "train_from_config",
    "write_zero_shot",
]
