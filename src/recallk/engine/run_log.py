"""What a training run writes as it goes (rank 0 only; docs/run-folder.md): ``train.log`` lines (also logged to
the ``recallk.train`` logger), ``metrics.jsonl`` lines and their trim on resume, TensorBoard scalars,
``config.yaml`` and ``best.json``. Every file is written through :mod:`recallk.run_folder`."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from recallk.engine.run_config import describe_loss
from recallk.run_folder import (
    VALIDATION_PREFIX,
    RunFolder,
    append_log,
    append_metrics,
    trim_metrics,
    write_best,
    write_config,
)
from recallk.utils import count_text

if TYPE_CHECKING:
    from recallk.engine.trainer import Trainer

logger = logging.getLogger("recallk.train")


class RunLog:
    """The run's progress files in ``folder``; every method does nothing on a rank other than 0 (``is_main``)."""

    def __init__(self, folder: RunFolder, is_main: bool) -> None:
        self.folder, self.is_main = folder, is_main
        self._writer: Any = None

    def line(self, text: str) -> None:
        """One line (or block) of progress: appended to ``train.log`` and logged to ``recallk.train`` (INFO)."""
        if self.is_main and text:
            append_log(self.folder.train_log, text)
            logger.info(text)

    def said_nowhere(self) -> bool:
        """Whether nobody shows the ``recallk.train`` log (no handler at INFO): then a stop is said as a warning."""
        return self.is_main and not (logger.isEnabledFor(logging.INFO) and logger.hasHandlers())

    def metrics(self, kind: str, epoch: int, step: int, values: Mapping[str, Any]) -> None:
        """One ``metrics.jsonl`` line ``{"kind", "epoch", "step", "time", **values}`` and its numbers to
        TensorBoard (``<kind>/<key>`` at ``step``)."""
        if not self.is_main:
            return
        append_metrics(self.folder.metrics, kind, epoch, step, values)
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)
            self._writer.flush()

    def trim(self, step: int) -> None:
        """On resume: cut ``metrics.jsonl`` back to ``step`` (lines written after the checkpoint go)."""
        if self.is_main:
            trim_metrics(self.folder.metrics, step)

    def write_config(self, config: Mapping[str, Any], resumed: bool) -> None:
        """``config.yaml``: written at the start of a new run; a resumed run keeps the file it has (never
        silently rewritten) and writes it only when it is missing."""
        if self.is_main and not (resumed and self.folder.config.exists()):
            write_config(config, self.folder.config)

    def write_best(self, metric: str, split: str, value: float, epoch: int, step: int) -> None:
        """``best.json``: which evaluation chose ``checkpoints/best.pt``."""
        if self.is_main:
            write_best(self.folder.best_json, metric, split, value, epoch, step)

    def open_tensorboard(self, enabled: bool) -> None:
        if not (enabled and self.is_main):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # tensorboard is optional at run time
            warnings.warn(f"TensorBoard logging is off ({error}); `pip install tensorboard` to enable it",
                          stacklevel=3)
            return
        self._writer = SummaryWriter(log_dir=str(self.folder.tensorboard))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class IntervalMeter:
    """The ``interval`` lines of ``metrics.jsonl``: mean loss, images/s and data wait (``wait_s()``: the loader's
    seconds spent waiting so far) over every ``every`` steps."""

    def __init__(self, every: int, batch_size: int, wait_s: Callable[[], float]) -> None:
        self.every, self.batch_size, self._wait_s = every, batch_size, wait_s
        self._reset()

    def _reset(self) -> None:
        self.loss, self.steps, self.start, self.wait_start = 0.0, 0, time.perf_counter(), self._wait_s()

    def add(self, loss: float) -> dict[str, float] | None:
        """Count one step of ``loss``; returns ``{"loss", "images_per_s", "data_wait_s"}`` every ``every`` steps."""
        self.loss += loss
        self.steps += 1
        if self.steps != self.every:
            return None
        elapsed = time.perf_counter() - self.start
        values = {"loss": self.loss / self.steps, "images_per_s": self.steps * self.batch_size / max(elapsed, 1e-9),
                  "data_wait_s": self._wait_s() - self.wait_start}
        self._reset()
        return values


def eval_summary(last_eval: Mapping[str, Any], epoch: int | None = None) -> str:
    """recall@k and map@r of an evaluation in percent, as the CLI's table (the validation split's as
    ``val/recall@k``, ``val/map@r`` after the test split's); with ``epoch``, as the line ``evaluation after epoch
    E: ...``. Empty without an evaluation."""
    if not last_eval:
        return ""
    shown = [(k, v) for k, v in last_eval.items()
             if (k.removeprefix(VALIDATION_PREFIX).startswith("recall@") or k.removeprefix(VALIDATION_PREFIX)
                 == "map@r") and isinstance(v, float)]
    text = "  ".join(f"{k} {100 * v:.2f}" for k, v in shown)
    return text if epoch is None else f"evaluation after epoch {epoch}: {text}"


def start_block(trainer: Trainer, resumed: bool) -> str:
    """The block of lines a run starts with: folder (new, or where it resumed), device (and the torch.distributed
    backend under torchrun), model (pretrained or random weights, BatchNorm frozen or not), data, batch, loss,
    precision and optimiser."""
    s, labels = trainer.settings, trainer.train_dataset.labels
    precision = {None: "float32", torch.bfloat16: "bfloat16 autocast",
                 torch.float16: "float16 autocast + GradScaler"}[trainer.autocast_dtype]
    if not resumed:
        where = "new run"
    elif trainer.position == 0:
        where = f"resumed {trainer._position_text()}: " + (
            f"continuing with epoch {trainer.epoch + 1}" if trainer.epoch < s.epochs else "all epochs done")
    elif trainer.position < trainer._steps_in_epoch(trainer.epoch + 1):
        where = f"resumed {trainer._position_text()}: continuing with batch {trainer.position + 1}"
    else:  # stopped after the epoch's last step, before its end: its evaluation (if any) and last.pt come next
        where = f"resumed {trainer._position_text()}: continuing with the end of epoch {trainer.epoch + 1}"
    world_size = trainer.world_size
    joined = s.distributed and dist.is_available() and dist.is_initialized()
    backend = f" (torch.distributed backend {dist.get_backend()})" if joined else ""
    return "\n".join([
        f"run folder   {trainer.run_dir} ({where})",
        f"device       {trainer.device}, {world_size} process(es){backend}",
        f"model        {model_text(getattr(trainer, 'model_spec', None), trainer.model)}",
        f"train data   {len(labels)} images, {len(set(int(c) for c in labels))} classes; "
        f"{count_text(trainer._steps_in_epoch(trainer.epoch + 1), 'step')} per epoch, {count_text(s.epochs, 'epoch')}",
        f"batch        {s.batch_size} images ({s.per_class} per class) in chunks of {s.chunk_size}"
        + (f", {s.batch_size // world_size} per process" if world_size > 1 else ""),
        f"loss         {loss_text(describe_loss(trainer.criterion), trainer.criterion)}",
        f"precision    {precision}; optimizer {s.optimizer}, "
        + getattr(trainer, "optimizer_text", f"lr {s.lr:g}"),  # its groups' rates: engine.param_groups.groups_text
    ])


def model_text(spec: Mapping[str, Any] | None, model: Any) -> str:
    """The model as the start block names it, from the ``model_spec`` that ``build_model`` records: name,
    embedding size, pretrained or random weights, BatchNorm frozen or trained (or none); a model without a spec
    by its class name."""
    has_batchnorm = isinstance(model, nn.Module) and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if spec is None:
        name = type(model).__name__
        return name + ("" if has_batchnorm else ", no BatchNorm")
    weights = ("pretrained weights" if spec.get("pretrained")
               else "random weights (model.pretrained: false: trained from scratch)")
    if not has_batchnorm:
        norm = "no BatchNorm"
    else:
        norm = "BatchNorm frozen" if spec.get("freeze_bn") else "BatchNorm trained (model.freeze_bn: false)"
    size = f" ({spec['embed_dim']}-d)" if spec.get("embed_dim") else ""
    return f"{spec.get('name')}{size}, {weights}, {norm}"


def loss_text(spec: Mapping[str, Any] | None, criterion: Any) -> str:
    """The loss as the start block names it: from ``describe_loss``'s ``spec`` when the loss describes itself."""
    if spec is None:
        return type(criterion).__name__ if isinstance(criterion, nn.Module) else repr(criterion)
    if spec.get("name") == "rsk":
        return f"rsk (ks {list(spec['ks'])}, SiMix {'on' if spec.get('simix') else 'off'})"
    options = {k: v for k, v in spec.items() if k != "name"}
    return str(spec["name"]) + (f" {options}" if options else "")


def duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m"``, ``75`` -> ``"1m15s"``, ``4.2`` -> ``"4s"``."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


__all__ = ["IntervalMeter", "RunLog", "duration", "eval_summary", "loss_text", "model_text", "start_block"]
