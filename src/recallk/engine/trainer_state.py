"""The trainer's checkpoint: what ``last.pt`` holds (:func:`trainer_state`), its weights-only ``best.pt`` and the
restore on resume with its checks (:func:`restore_trainer`). Checkpoints are written only at step boundaries
(an epoch's end, ``max_steps``, a stop), where every piece of state is that of one completed step."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch import nn

from recallk import __version__
from recallk.engine.checkpoint import CHECKPOINT_FORMAT, is_weights_only, save_checkpoint, weights_only_state
from recallk.engine.rng import capture_all_rng, restore_all_rng
from recallk.utils import seed_everything

if TYPE_CHECKING:
    from recallk.engine.trainer import Trainer

#: progress kept in a checkpoint as is: completed epochs, batches done in the epoch under way, global optimiser
#: steps, the running epoch loss, the last epoch's mean loss and the last evaluation
PROGRESS = ("epoch", "position", "step", "epoch_loss_sum", "epoch_steps", "last_train_loss", "last_eval")


def trainer_state(trainer: Trainer) -> dict[str, Any]:
    """Everything a resume needs (docs/run-folder.md), as of now: call it at a step boundary."""
    s = trainer.settings
    criterion = trainer.criterion.state_dict() if isinstance(trainer.criterion, nn.Module) else None
    return {
        "format": CHECKPOINT_FORMAT,
        "config": trainer.run_config, "model_spec": trainer.model_spec, "recallk_version": __version__,
        "model": trainer.model.state_dict(),
        "criterion": criterion,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "sampler": {"epoch": trainer.epoch + 1, "position": trainer.position, "seed": s.seed},
        "rng": capture_all_rng(),
        **{key: getattr(trainer, key) for key in PROGRESS},
        "best": trainer.best.state_dict(),
        "settings": {"batch_size": s.batch_size, "per_class": s.per_class, "seed": s.seed,
                     "world_size": trainer.world_size},
    }


def save_last(trainer: Trainer) -> Path:
    """``checkpoints/last.pt``: a collective under several processes (every rank calls it at the same point; each
    rank's random state goes into ``rng_per_rank``), written by rank 0. Returns its path."""
    state, path = trainer_state(trainer), trainer.folder.last_pt
    if trainer.settings.distributed:
        per_rank: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(per_rank, state["rng"])
        state["rng_per_rank"] = per_rank
    if trainer.is_main:
        with trainer.stop_signals.writing():
            save_checkpoint(state, path)
    return path


def save_best(trainer: Trainer) -> None:
    """``checkpoints/best.pt`` (rank 0 alone: no collective): weights-only (``engine.checkpoint.WEIGHTS_ONLY_KEYS``:
    no optimizer, scheduler, scaler or random state)."""
    if trainer.is_main:
        with trainer.stop_signals.writing():
            save_checkpoint(weights_only_state(trainer_state(trainer)), trainer.folder.best_pt)


def restore_trainer(trainer: Trainer, state: dict[str, Any], path: Path) -> None:
    """Put ``trainer`` back where checkpoint ``state`` (read from ``path``) left it; ``metrics.jsonl`` is cut back
    to its step.

    Raises:
        ValueError: a weights-only checkpoint (best.pt), or a checkpoint of another batch_size, per_class or seed.
    """
    if is_weights_only(state):
        raise ValueError(f"{path} is a weights-only checkpoint (best.pt keeps no optimizer or random state): it "
                         f"cannot resume a run; resume from {trainer.folder.last_pt}")
    settings = state.get("settings", {})
    for key in ("batch_size", "per_class", "seed"):
        mine = getattr(trainer.settings, key)
        if key in settings and settings[key] != mine:
            raise ValueError(f"the checkpoint was written with {key}={settings[key]} but this run has "
                             f"{key}={mine}; resume with the same {key}")
    trainer.model.load_state_dict(state["model"])
    if isinstance(trainer.criterion, nn.Module) and state.get("criterion") is not None:
        trainer.criterion.load_state_dict(state["criterion"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.scaler is not None and state.get("scaler") is not None:
        trainer.scaler.load_state_dict(state["scaler"])
    for key in PROGRESS:
        setattr(trainer, key, state.get(key, getattr(trainer, key)))
    trainer.best.load_state_dict(state.get("best", {}))
    restore_all_rng(rank_rng(state, trainer.rank, trainer.settings.seed))
    trainer.log.trim(trainer.step)


def rank_rng(state: dict[str, Any], rank: int, seed: int) -> dict[str, Any]:
    """Rank ``rank``'s random state for a resume from checkpoint ``state``: from ``rng_per_rank``; rank 0's is
    ``rng``; failing both (a checkpoint of fewer processes), a fresh stream seeded from (seed, rank, step), with a
    warning (never rank 0's stream replayed)."""
    per_rank = state.get("rng_per_rank")
    if per_rank and len(per_rank) > rank:
        return per_rank[rank]
    if rank == 0:
        return state["rng"]
    warnings.warn(f"rank {rank}: no random state of step {state.get('step')} in the checkpoint; this rank "
                  f"continues with a stream seeded from (seed, rank, step)", stacklevel=3)
    seed_everything(seed + 1_000_003 * rank + 7919 * int(state.get("step", 0)))
    return capture_all_rng()


__all__ = ["PROGRESS", "rank_rng", "restore_trainer", "save_best", "save_last", "trainer_state"]
