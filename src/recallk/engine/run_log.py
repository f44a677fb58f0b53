"""What a training run writes as it goes (rank 0 only; docs/run-folder.md): ``train.log`` lines (also logged to
the ``recallk.train`` logger), ``metrics.jsonl`` lines and their trim on resume, TensorBoard scalars,
``config.yaml`` and ``best.json``. Every file is written through :mod:`recallk.run_folder`."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

from torch import nn

from recallk.run_folder import (
    VALIDATION_PREFIX,
    RunFolder,
    append_log,
    append_metrics,
    trim_metrics,
    write_best,
    write_config,
)

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


def eval_summary(last_eval: Mapping[str, Any]) -> str:
    """recall@k and map@r of an evaluation in percent, as the CLI's table (the validation split's as
    ``val/recall@k``, ``val/map@r`` after the test split's)."""
    shown = [(k, v) for k, v in last_eval.items()
             if (k.removeprefix(VALIDATION_PREFIX).startswith("recall@") or k.removeprefix(VALIDATION_PREFIX)
                 == "map@r") and isinstance(v, float)]
    return "  ".join(f"{k} {100 * v:.2f}" for k, v in shown)


def start_block(run_dir: Any, where: str, device: Any, world_size: int, images: int, classes: int,
                steps_per_epoch: int, settings: Any, loss: str, precision: str) -> str:
    """The block of lines a run starts with: folder (new or where it resumed), device, data, batch, loss,
    precision and optimiser."""
    s = settings
    return "\n".join([
        f"run folder   {run_dir} ({where})",
        f"device       {device}, {world_size} process(es)",
        f"train data   {images} images, {classes} classes; {steps_per_epoch} steps per epoch, {s.epochs} epochs",
        f"batch        {s.batch_size} images ({s.per_class} per class) in chunks of {s.chunk_size}"
        + (f", {s.batch_size // world_size} per process" if world_size > 1 else ""),
        f"loss         {loss}",
        f"precision    {precision}; optimizer {s.optimizer}, lr {s.lr:g}",
    ])


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


__all__ = ["RunLog", "duration", "eval_summary", "loss_text", "start_block"]
