"""Stopping a run cleanly: the stop signals are only recorded; the training loop acts on them at safe points.

While :meth:`recallk.engine.Trainer.fit` runs, Ctrl-C (SIGINT), SIGTERM and SIGUSR1 (what Slurm and Kubernetes
send at pre-emption or at the time limit; ``sbatch --signal=USR1@90``) only set a flag (:class:`StopSignals`).
The loop looks at it after each optimiser update and at each epoch's end (after its evaluation), where every
piece of state is that of a completed step: it saves ``checkpoints/last.pt`` and raises :class:`Stopped`. The cost
is the latency: at most one step, plus the evaluation under way. A second Ctrl-C aborts at once (no save).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

#: the signals that stop a run with a checkpoint (those the platform has)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


class Stopped(KeyboardInterrupt):
    """A stop signal ended the run after ``checkpoints/last.pt`` was saved (raised by the training loop, never by a
    signal handler). ``str()`` is the message the run logged: which signal, what was saved, where the run stands
    and how to continue.

    Attributes: ``signal_name`` ("SIGINT", "SIGTERM", "SIGUSR1"), ``signum``, ``saved_to`` (the Path of last.pt),
    ``epoch`` (completed epochs), ``step`` (optimiser steps made), ``position_text`` (``after epoch 5 (step 50)``
    or ``in epoch 6 after batch 3 of 10 (step 53)``), ``resume_command``."""

    def __init__(self, signum: int, saved_to: Path, epoch: int, step: int, position_text: str,
                 resume_command: str) -> None:
        self.signum, self.signal_name = int(signum), signal.Signals(signum).name
        self.saved_to, self.epoch, self.step = Path(saved_to), epoch, step
        self.position_text, self.resume_command = position_text, resume_command
        what = "Ctrl-C" if self.signum == signal.SIGINT else self.signal_name
        super().__init__(f"stopped by {what}: saved {self.saved_to} ({position_text}); continue with: "
                         f"{resume_command}")

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (multiprocessing) with its own arguments
        return (type(self), (self.signum, self.saved_to, self.epoch, self.step, self.position_text,
                             self.resume_command))


class StopSignals:
    """Records the stop signals while installed (:meth:`installed`); the loop asks :meth:`requested`.

    A handler only notes the signal (the first one is the one reported), except that a second Ctrl-C aborts at
    once with a plain KeyboardInterrupt (nothing saved), as an impatient user means; during a checkpoint write
    (:meth:`writing`) the abort waits for the write's end, since a KeyboardInterrupt raised inside ``torch.save``
    comes out of its C++ writer as a RuntimeError ("unexpected pos") instead of an abort. A SIGTERM or SIGUSR1 after a
    pending stop is only noted: torchrun and Slurm signal a rank twice within milliseconds (the whole job step,
    then the forwarded signal), and the save must not be cut short by the second.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._interrupts = 0
        self._writing, self._abort = False, False

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                if self._writing:
                    self._abort = True  # raised by writing() when the write is done
                    return
                raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Inside the block the handlers record stop signals; the previous handlers come back after it. Only the
        main thread can install handlers: elsewhere the block has no effect (signals act as they did)."""
        self.signum, self._interrupts, self._writing, self._abort = None, 0, False, False
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        try:
            yield self
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """A checkpoint write: a second Ctrl-C arriving inside it aborts (KeyboardInterrupt) right after it,
        with the file complete, instead of inside ``torch.save``."""
        self._writing = True
        try:
            yield
        finally:
            self._writing = False
        if self._abort:
            raise KeyboardInterrupt

    def requested(self, distributed: bool = False, device: torch.device | None = None) -> int | None:
        """The signal number of a pending stop, or None. With ``distributed`` every rank calls it at the same
        point and all agree (an all-reduce MAX of the signal numbers), so that all stop at the same step even when
        the signal reached some ranks only, or at different moments."""
        if not distributed:
            return self.signum
        flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = int(flag.item())
        return agreed or None


__all__ = ["STOP_SIGNALS", "StopSignals", "Stopped"]
