"""Which evaluation chooses ``checkpoints/best.pt``: the highest value of ``val/<best_metric>`` when the evaluation
has a validation split, else of ``best_metric`` on the test split (the one rule:
:func:`recallk.run_folder.selection_metric`); :func:`record_evaluation` writes what an evaluation changes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from recallk.engine.trainer_state import save_best
from recallk.run_folder import VALIDATION_PREFIX, json_value, selection_metric

if TYPE_CHECKING:
    from recallk.engine.trainer import Trainer


class BestChoice:
    """The evaluation that chose best.pt so far: ``metric`` (with the ``val/`` prefix on the validation split),
    ``split`` ("validation" or "test"), ``value`` (a fraction; None before any evaluation), ``epoch``."""

    def __init__(self, best_metric: str) -> None:
        self.best_metric = best_metric  # the setting, without prefix
        self.metric, self.split = best_metric, "test"
        self.value: float | None = None
        self.epoch: int | None = None

    def offer(self, metrics: Mapping[str, Any], epoch: int) -> bool:
        """Take the evaluation of ``epoch`` when it beats the best so far (or chooses on another metric, as when a
        validation split appears); returns whether it did (then best.pt and best.json are to be written).

        Raises:
            ValueError: ``best_metric`` is not among the metrics.
        """
        if self.best_metric not in metrics:
            raise ValueError(f"best_metric {self.best_metric!r} is not among the evaluation metrics "
                             f"{sorted(metrics)}; pass one of them as best_metric")
        metric, split = selection_metric(metrics, self.best_metric)
        value = float(metrics[metric])
        if self.value is not None and metric == self.metric and value <= self.value:
            return False
        self.metric, self.split, self.value, self.epoch = metric, split, value, epoch
        return True

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's ``best`` entry."""
        return {"metric": self.metric, "split": self.split, "value": self.value, "epoch": self.epoch}

    def load_state_dict(self, best: Mapping[str, Any]) -> None:
        """Back from a checkpoint's ``best`` entry (an older one may lack ``metric`` and ``split``)."""
        self.value, self.epoch = best.get("value"), best.get("epoch")
        self.metric = best.get("metric") or self.best_metric
        self.split = best.get("split") or ("validation" if self.metric.startswith(VALIDATION_PREFIX) else "test")


def record_evaluation(trainer: Trainer, epoch: int, metrics: Mapping[str, Any]) -> None:
    """Rank 0, after the evaluation of ``epoch``: ``trainer.last_eval``, its ``metrics.jsonl`` line and, when it is
    the new best, ``best.pt``, ``best.json`` and a line saying so (``best.pt = epoch 3 (val/map@r 61.23 on the
    validation split)``).

    Raises:
        ValueError: ``best_metric`` is not among the metrics (before anything is written).
    """
    best = trainer.best
    improved = best.offer(metrics, epoch)
    trainer.last_eval = {k: json_value(v) for k, v in metrics.items()}
    trainer.log.metrics("eval", epoch, trainer.step, {"split": "test", **trainer.last_eval})
    if improved:
        save_best(trainer)
        trainer.log.write_best(best.metric, best.split, best.value, epoch, trainer.step)
        trainer.log.line(f"best.pt = epoch {epoch} ({best.metric} {100 * best.value:.2f} on the {best.split} split)")


__all__ = ["BestChoice", "record_evaluation"]
