"""Checkpoints written atomically: a crash while writing never leaves a truncated or missing file behind."""

from __future__ import annotations

import collections
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = 2  # 1 kept a loss's generator beside its state dict, as "criterion_generator"


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/file system allows opening a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` with torch.save to ``path`` atomically; returns the path.

    The state goes to a temporary file in the same folder, is flushed and fsync'ed, then ``os.replace`` puts it
    in place (atomic on POSIX and Windows). If anything fails, the temporary file is removed, the previous file
    at ``path`` is untouched and the error propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain containers only).

    Uses ``torch.load(weights_only=True)``, so a file cannot run code when loaded. A trainer checkpoint of an
    older format comes back in the current one (``CHECKPOINT_FORMAT``).
    Raises FileNotFoundError with the path when it does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # MultiStepLR keeps its milestones in a Counter.
    with torch.serialization.safe_globals([collections.Counter]):
        state = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(state, dict) and "criterion_generator" in state:  # format 1
        generator_state = state.pop("criterion_generator")
        if generator_state is not None and state.get("criterion") is not None:
            state["criterion"]["_extra_state"] = {"generator_state": generator_state}
        state["format"] = CHECKPOINT_FORMAT
    return state
