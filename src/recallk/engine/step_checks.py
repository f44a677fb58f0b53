"""The checks after each training step: a loss or gradient that is not finite, and steps that change no weight."""

from __future__ import annotations

import math

import torch

#: consecutive steps without an update (every one skipped by the GradScaler, or all gradients exactly zero) after
#: which the run stops with :class:`TrainingStalledError`. The GradScaler skips a few steps by design while it
#: calibrates its scale (halving it from 2**16 each time), far fewer than this.
MAX_IDLE_STEPS = 20


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN or infinite; the run stopped without saving the bad weights."""


class TrainingStalledError(RuntimeError):
    """Steps are being made without changing the weights (GradScaler skips, zero gradients); the run stopped."""


def gradient_norms(optimizer: torch.optim.Optimizer) -> tuple[bool, bool]:
    """(every gradient is finite, every gradient is exactly zero or absent) over ``optimizer``'s parameters."""
    norms = [torch.linalg.vector_norm(p.grad.float()) for group in optimizer.param_groups
             for p in group["params"] if p.grad is not None]
    if not norms:
        return True, True
    stacked = torch.stack(norms)
    return bool(torch.isfinite(stacked).all()), bool((stacked == 0).all())


def check_finite(loss: float, optimizer: torch.optim.Optimizer, scaler_in_use: bool, where: str) -> bool:
    """Before the update: raise :class:`NonFiniteLossError` for a NaN/Inf ``loss``, or a NaN/Inf gradient when no
    fp16 GradScaler will skip the step (``scaler_in_use``); ``where`` ends the message. Returns whether every
    gradient is exactly zero (the update would change nothing)."""
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"the loss is {loss} {where}")
    finite, zero = gradient_norms(optimizer)
    if not scaler_in_use and not finite:
        raise NonFiniteLossError(f"a parameter gradient is not finite {where}")
    return zero


class IdleSteps:
    """Counts the steps in a row that changed no weight; :meth:`after` raises :class:`TrainingStalledError` at
    ``MAX_IDLE_STEPS``."""

    def __init__(self) -> None:
        self.count = 0

    def after(self, updated: bool, scaler_skipped: bool, epoch: int, step: int) -> None:
        """Record one step (``updated``: it changed the weights; ``scaler_skipped``: the fp16 GradScaler skipped
        it, as opposed to all gradients being zero)."""
        self.count = 0 if updated else self.count + 1
        if self.count >= MAX_IDLE_STEPS:
            why = ("the fp16 GradScaler skipped every one (overflowing gradients: use amp=bf16 or amp=fp32)"
                   if scaler_skipped else "every gradient was exactly zero (check the loss and the batch: "
                   "per_class, labels)")
            raise TrainingStalledError(f"{self.count} steps in a row did not change the weights: {why}; stopped at "
                                       f"epoch {epoch}, step {step}")


__all__ = ["MAX_IDLE_STEPS", "IdleSteps", "NonFiniteLossError", "TrainingStalledError", "check_finite",
           "gradient_norms"]
