"""Capture and replay random-number-generator state.

Two uses: the cached two-pass step replays each chunk's RNG state in pass 2 so that dropout and drop-path draw
the same masks as in pass 1 (:class:`RngState`), and checkpoints save and restore every generator a run uses
(:func:`capture_all_rng` / :func:`restore_all_rng`).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def _cuda_devices(device: torch.device | None) -> list[int]:
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


class RngState:
    """The torch CPU generator's state and, for a CUDA ``device``, that device's generator state.

    Create it just before a forward pass; later ``with state.replay(): forward(...)`` runs the same forward with
    the same random draws, and afterwards puts the generators back where they were before the ``with`` block,
    so the replay does not disturb the random stream of the rest of the program.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.cpu_state = torch.get_rng_state()
        self.cuda_devices = _cuda_devices(device)
        self.cuda_states = [torch.cuda.get_rng_state(d) for d in self.cuda_devices]

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Context manager: inside it, the generators start from the captured state."""
        with torch.random.fork_rng(devices=self.cuda_devices):
            torch.set_rng_state(self.cpu_state)
            for device, cuda_state in zip(self.cuda_devices, self.cuda_states):
                torch.cuda.set_rng_state(cuda_state, device)
            yield


def capture_all_rng() -> dict[str, Any]:
    """State of Python's ``random``, NumPy's global generator, torch CPU and every CUDA device.

    Plain Python containers and tensors only, so that ``torch.load(..., weights_only=True)`` accepts it.
    """
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(mt_state), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_all_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_all_rng`. CUDA states are restored only when CUDA is in use here."""
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state.get("torch_cuda") or []
    if cuda_states and torch.cuda.is_available():
        count = min(len(cuda_states), torch.cuda.device_count())
        for device in range(count):
            torch.cuda.set_rng_state(cuda_states[device], device)
