"""Checkpoints written atomically: a crash while writing never leaves a truncated or missing file behind.

Every trainer checkpoint also says what it is (docs/run-folder.md): ``config`` (the run's resolved config, as
``config.yaml`` holds it), ``model_spec`` (``{"name": ..., **build_model keyword arguments}``, None for a model
that ``recallk.models.build_model`` did not build) and ``recallk_version``, so that it can be used alone, copied
anywhere. ``best.pt`` is weights-only (:func:`weights_only_state`): it cannot resume a run.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from recallk.run_folder import write_atomic

CHECKPOINT_FORMAT = 2  # 1 kept a loss's generator beside its state dict, as "criterion_generator"
#: what a weights-only checkpoint (best.pt) keeps of a trainer checkpoint: no optimizer, scheduler, scaler, rng,
#: criterion or progress counters beyond epoch and step.
WEIGHTS_ONLY_KEYS = ("format", "model", "config", "model_spec", "recallk_version", "best", "epoch", "step")


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` with torch.save to ``path`` atomically; returns the path.

    The state goes to a temporary file in the same folder, is flushed and fsync'ed, then ``os.replace`` puts it
    in place (atomic on POSIX and Windows). If anything fails, the temporary file is removed, the previous file
    at ``path`` is untouched and the error propagates. The file gets the mode of any file the process creates
    (``0o666 & ~umask``: group-readable under the usual umask 022 or 002), like the run's other files.
    """
    return write_atomic(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain containers only).

    Uses ``torch.load(weights_only=True)``, so a file cannot run code when loaded.
    Raises FileNotFoundError with the path when it does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # MultiStepLR keeps its milestones in a Counter.
    with torch.serialization.safe_globals([collections.Counter]):
        return torch.load(path, map_location=map_location, weights_only=True)


def weights_only_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The weights-only export of a trainer checkpoint (what ``best.pt`` holds): the entries of
    ``WEIGHTS_ONLY_KEYS`` that ``state`` has (model weights, config, model_spec, recallk_version, best, epoch,
    step), without optimizer, scheduler, scaler, random state and criterion. It evaluates and loads
    (``recallk.load_model``) but cannot resume training."""
    return {key: state[key] for key in WEIGHTS_ONLY_KEYS if key in state}


def is_weights_only(state: Mapping[str, Any]) -> bool:
    """Whether a trainer checkpoint lacks the optimizer state a resume needs (``best.pt``, a weights export)."""
    return "model" in state and "optimizer" not in state
