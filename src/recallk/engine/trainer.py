"""The training loop: class-balanced large batches, cached two-pass steps, evaluation, logs and checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from recallk import __version__
from recallk.data.loading import ChunkedBatchLoader
from recallk.data.samplers import ClassBalancedBatchSampler
from recallk.data.transforms import with_device_normalize
from recallk.engine.cached import Prepare, cached_backward_stream
from recallk.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    is_weights_only,
    load_checkpoint,
    save_checkpoint,
    weights_only_state,
)
from recallk.engine.distributed import DistributedContext, DistributedGather, init_distributed
from recallk.engine.optim import build_optimizer, build_scheduler
from recallk.engine.rng import capture_all_rng, restore_all_rng
from recallk.engine.run_config import describe_loss, merge_run_config, trainer_run_config
from recallk.engine.settings import TrainSettings, check_amp_device, check_per_class
from recallk.run_folder import write_config
from recallk.utils import autocast_dtype, resolve_device, seed_everything, write_text_atomic

EvalFn = Callable[[nn.Module, int], Mapping[str, Any]]
__all__ = ["NonFiniteLossError", "Preempted", "Trainer", "TrainingStalledError"]
# Progress kept in a checkpoint as is: completed epochs, batches done in the epoch under way, global optimiser
# steps, the running epoch loss, the last epoch's mean loss and the last evaluation.
# ``pending_eval``: the epoch whose evaluation was under way when the run stopped (run again on resume).
_PROGRESS = ("epoch", "position", "step", "epoch_loss_sum", "epoch_steps", "last_train_loss", "last_eval",
             "pending_eval")
#: consecutive steps without an update (every one skipped by the GradScaler, or all gradients exactly zero) after
#: which the run stops with :class:`TrainingStalledError`. The GradScaler skips a few steps by design while it
#: calibrates its scale (halving it from 2**16 each time), far fewer than this.
MAX_IDLE_STEPS = 20
#: the prefix of validation metrics in what ``eval_fn`` returns (``val/map@r``): when ``val/<best_metric>`` is
#: there, it (not the test split's ``best_metric``) chooses ``checkpoints/best.pt`` (docs/run-folder.md, best.json)
VALIDATION_PREFIX = "val/"
#: the signals that stop a run with a checkpoint: Ctrl-C, and what Slurm and Kubernetes send at pre-emption or at
#: the time limit (SIGTERM; SIGUSR1 with ``sbatch --signal=USR1@90``).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))
logger = logging.getLogger("recallk.train")


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN or infinite; the run stopped without saving the bad weights."""


class TrainingStalledError(RuntimeError):
    """Steps are being made without changing the weights (GradScaler skips, zero gradients); the run stopped."""


class Preempted(KeyboardInterrupt):
    """SIGTERM or SIGUSR1 stopped the run (after saving, like Ctrl-C); ``signum`` is the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop_exception(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Preempted(signum)


def _raise_stop(signum: int, frame: Any) -> None:
    raise _stop_exception(signum)


@contextlib.contextmanager
def _signal_handlers(handler: Any, signums: Iterable[int] = STOP_SIGNALS) -> Iterator[bool]:
    """``handler`` for ``signums`` inside the block, the previous handlers after it; yields whether it was
    installed: only the main thread can (elsewhere the block runs with no effect and yields False)."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield True
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _stop_signals_raise() -> contextlib.AbstractContextManager[bool]:
    """Inside the block SIGTERM and SIGUSR1 raise :class:`Preempted` (SIGINT raises KeyboardInterrupt as usual), so
    that all stop signals save a checkpoint the same way. Only in the main thread (elsewhere: no effect)."""
    return _signal_handlers(_raise_stop, [s for s in STOP_SIGNALS if s != signal.SIGINT])


def _stop_signals_ignored() -> contextlib.AbstractContextManager[bool]:
    """Ignore further stop signals (Ctrl-C, SIGTERM, SIGUSR1) inside the block: the run is already stopping and
    saving. A second signal comes within milliseconds when both the launcher and the ranks are signalled (Slurm
    signals the whole job step, then torchrun forwards the signal to its ranks); raised inside ``torch.save`` it
    aborted the write, leaving no ``last.pt``. Only in the main thread (elsewhere: no effect)."""
    return _signal_handlers(signal.SIG_IGN)


class _StopRequested(Exception):
    """Internal: the step budget ``max_steps`` is spent."""


_held_signals: list[int] | None = None  # while an _interrupt_deferred block runs: the stop signals it holds back


@contextlib.contextmanager
def _interrupt_deferred() -> Iterator[None]:
    """Hold back the stop signals (Ctrl-C, SIGTERM, SIGUSR1) until the block ends, then raise KeyboardInterrupt
    (:class:`Preempted` for SIGTERM/SIGUSR1): what the block does (the optimiser update with the step counters and
    the step's metrics line; a routine checkpoint write, which a signal inside ``torch.save`` would abort with a
    RuntimeError and no file; the new best value with ``best.pt`` and ``best.json``) is done whole or not at all.
    A block inside another is part of the outer one. Only in the main thread (elsewhere: no effect)."""
    global _held_signals
    if _held_signals is not None:  # inside another block: its handler holds the signals
        yield
        return
    received: list[int] = []
    with _signal_handlers(lambda signum, frame: received.append(signum)) as installed:
        if installed:
            _held_signals = received
        try:
            yield
        finally:
            if installed:
                _held_signals = None
    if received:
        raise _stop_exception(received[0])


def _json_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        return value.tolist()
    return value.item() if callable(getattr(value, "item", None)) else value  # one-element tensor, numpy scalar


class Trainer:
    """Trains ``model`` with ``criterion`` on ``train_dataset``, writing logs and checkpoints into ``run_dir``.

    Every step takes one class-balanced batch of ``batch_size`` images (``per_class`` per class), embeds it in
    chunks of ``chunk_size`` with :func:`recallk.engine.cached_backward` (several processes: with a
    :class:`recallk.engine.DistributedGather`) and makes one optimiser step. One learning rate for all
    parameters, the criterion's included; MultiStepLR steps once per epoch.

    Args:
        model: maps images to L2-normalised (n, d) embeddings. BatchNorm freezing is the model's business
            (``build_model(freeze_bn=True)`` or :func:`recallk.engine.freeze_batchnorm`).
        criterion: ``criterion(embeddings (B, d) float32, labels (B,)) -> scalar``; an nn.Module's parameters
            and state (its own random generator included, as extra state) are trained and checkpointed too.
        train_dataset: items ``(image tensor, label)`` (augmentation in its transform, run once per step on the
            CPU by the loader) and ``.labels`` (N,) class ids.
        run_dir: the run folder (docs/run-folder.md): ``metrics.jsonl``, ``checkpoints/``, ``tensorboard/``.
        settings: a :class:`TrainSettings`; ``**settings_kwargs`` build one (or override fields of ``settings``).
        eval_fn: ``eval_fn(model, epoch) -> metrics`` run on epoch 0, every ``eval_every`` epochs and after the
            last; ``best_metric`` (higher is better) picks ``checkpoints/best.pt``: ``val/<best_metric>`` when the
            metrics hold it (a validation split carved from the training classes), else ``best_metric`` (the test
            split). Each new best also writes ``run_dir/best.json`` (metric, split, value, epoch, step).
        config: more of the run's config (plain values), merged section by section over what the trainer knows
            (:func:`recallk.engine.run_config.trainer_run_config`: the model's ``model_spec`` from
            ``build_model``, the settings, the loss when it can describe itself, the training set's dataset,
            root, split, options and transform size), the given values winning
            (:func:`recallk.engine.run_config.merge_run_config`; the CLI passes its whole resolved config). The
            result is written to ``run_dir/config.yaml`` when ``fit`` starts and stored in every checkpoint.
            Checkpoints also carry ``model_spec`` and ``recallk_version``, so ``recallk.load_model`` and
            ``recallk eval --checkpoint`` use one alone; ``best.pt`` is weights-only.
        resume_command: how to continue the run after a stop, as the stop message says it (the CLI passes
            ``recallk train --name <run> --resume``); default: ``Trainer(...).fit(resume=True)`` on the run folder.

    Raises:
        ValueError: bad settings, before any training and before the epoch-0 evaluation: a batch the sampler
            cannot form (too few classes with ``per_class`` items), or ``per_class`` below the criterion's
            ``min_per_class`` (2 for pair- and rank-based losses), or ``amp="fp16"`` on the CPU.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        train_dataset: Dataset,
        run_dir: str | os.PathLike,
        settings: TrainSettings | None = None,
        *,
        eval_fn: EvalFn | None = None,
        config: Mapping[str, Any] | None = None,
        resume_command: str | None = None,
        **settings_kwargs: Any,
    ) -> None:
        s = TrainSettings(**settings_kwargs) if settings is None else dataclasses.replace(settings, **settings_kwargs)
        labels = getattr(train_dataset, "labels", None)
        if labels is None:
            raise ValueError("train_dataset must have a .labels attribute (one class id per item) for the "
                             "class-balanced sampler")
        check_per_class(s.per_class, int(getattr(criterion, "min_per_class", 1)), type(criterion).__name__)
        self.settings, self.eval_fn = s, eval_fn
        self.resume_command = resume_command
        # What the checkpoints and config.yaml say the run is (docs/run-folder.md): the caller's resolved config, or
        # what this trainer knows (model spec, settings, the loss when it can describe itself).
        self.model_spec = getattr(model, "model_spec", None)
        self.run_config = merge_run_config(trainer_run_config(model, criterion, s, train_dataset), config)
        context = init_distributed() if s.distributed else DistributedContext(0, 1, 0, resolve_device(s.device))
        self.rank, self.world_size, self.device = context.rank, context.world_size, context.device
        self.is_main = self.rank == 0
        self.gather = DistributedGather() if s.distributed else None

        self.model = model.to(self.device)
        if s.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.criterion = criterion.to(self.device) if isinstance(criterion, nn.Module) else criterion
        self.train_dataset = train_dataset
        # The loader hands uint8 images when the dataset's transform ends with ToTensor + Normalize; the float
        # conversion and normalisation run on the device (same values bit for bit).
        self._host_dataset, normalize = with_device_normalize(train_dataset) if s.device_normalize else (
            train_dataset, None)
        layout = torch.channels_last if s.channels_last else torch.contiguous_format
        if normalize is not None:
            normalize.memory_format = layout
        self.prepare: Prepare | None = normalize if normalize is not None else (
            (lambda images: images.contiguous(memory_format=layout)) if s.channels_last else None)
        self._batches: ChunkedBatchLoader | None = None  # built at the first epoch; its workers persist
        self.run_dir = Path(run_dir)
        self.sampler = ClassBalancedBatchSampler(labels, s.batch_size, per_class=s.per_class, seed=s.seed,
                                                 rank=self.rank, world_size=self.world_size)
        modules = [self.model] + ([self.criterion] if isinstance(self.criterion, nn.Module) else [])
        multipliers = [1.0, s.loss_lr_multiplier][: len(modules)]
        self.optimizer = build_optimizer(modules, s.optimizer, lr=s.lr, weight_decay=s.weight_decay,
                                         lr_multipliers=multipliers)
        self.scheduler = build_scheduler(self.optimizer, s.milestones, s.gamma)
        check_amp_device(s.amp, self.device)
        self.autocast_dtype = autocast_dtype(s.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.autocast_dtype == torch.float16 else None

        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.epoch = self.position = self.step = self.epoch_steps = 0
        self.epoch_loss_sum = 0.0
        self.last_train_loss: float | None = None
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        # the metric and split that chose best.pt: ``val/<best_metric>`` on "validation" when eval_fn returns it
        self.best_metric, self.best_split = s.best_metric, "test"
        self.last_eval: dict[str, Any] = {}
        self.pending_eval: int | None = None
        self._idle_steps = 0
        self._epoch_times: list[float] = []
        self._epoch_start, self._epoch_first_step = time.perf_counter(), 0
        self._rng_snapshot: dict[str, Any] | None = None
        # What a step changes before its optimiser update (model buffers such as BatchNorm running statistics in
        # pass 1, the criterion's extra state such as SiMix's generator in the loss), as of the last completed
        # step: a checkpoint written on Ctrl-C takes these, so that all its state is of one completed step.
        self._buffer_snapshot: dict[str, torch.Tensor] = {}
        self._criterion_snapshot: dict[str, Any] = {}
        self._writer: Any = None

    # ----------------------------------------------------------------------------------------------- public
    def fit(self, resume: bool | str | os.PathLike = False) -> dict[str, Any]:
        """Train to the last epoch (or ``max_steps``); returns the final evaluation metrics (empty without
        ``eval_fn``) plus ``train_loss`` (mean of the last epoch) and ``best_<metric>``, the value that chose
        best.pt (``best_val/map@r`` when the evaluation has a validation split, else ``best_map@r``).

        ``resume``: True continues from ``run_dir/checkpoints/last.pt``, a path from that checkpoint; the
        continued run ends with the weights an uninterrupted run would have (any num_workers; a Ctrl-C inside
        a step resumes from the last completed step).

        Progress goes to ``run_dir/train.log`` and to the ``recallk.train`` logger (INFO): a block at the start, a
        line per epoch (loss, images/s, evaluation metrics, time left). SIGTERM and SIGUSR1 (pre-emption, time
        limits) stop the run like Ctrl-C: ``checkpoints/last.pt`` as of the last completed step, every rank's
        random state beside it. On resume, ``metrics.jsonl`` is cut back to the checkpoint's step and an
        evaluation the stop interrupted is run again.

        Raises:
            NonFiniteLossError: NaN/Inf loss or gradient (names epoch and step; checkpoints stay as they were).
            TrainingStalledError: ``MAX_IDLE_STEPS`` steps in a row changed no weight (GradScaler skips, zero
                gradients); checkpoints stay as they were.
            KeyboardInterrupt: after saving ``checkpoints/last.pt`` (Ctrl-C); :class:`Preempted`, a subclass,
                for SIGTERM and SIGUSR1.
            FileNotFoundError: ``resume`` names no checkpoint.
        """
        seed_everything(self.settings.seed + self.rank)
        resumed = bool(resume)
        with _stop_signals_raise():
            if resumed:
                path = self.checkpoint_dir / "last.pt" if resume is True else Path(resume)
                self._restore(load_checkpoint(path, map_location=self.device), path)
            self._write_config(resumed)
            self._log_start(resumed)
            self._open_tensorboard()
            try:
                if not resumed:
                    self._evaluate(0)
                    self._log(self._eval_text(0))
                    self._mark_completed()
                elif self.pending_eval is not None:  # the stop came during this evaluation: run it again
                    self._evaluate(self.pending_eval)
                    self._log(self._eval_text(self.pending_eval))
                    with _interrupt_deferred():
                        self.pending_eval = None
                        self._mark_completed()
                        self._save("last.pt")
                if resumed and self._finished():
                    self._log(f"nothing to train: {self._position_text()}, and the run asks for "
                              f"{self.settings.epochs} epochs" + (f", {self.settings.max_steps} steps"
                                                                   if self.settings.max_steps is not None else ""))
                while self.epoch < self.settings.epochs and not self._finished():
                    self._train_epoch(self.epoch + 1)
                    self._finish_epoch(self.epoch + 1)
            except _StopRequested:
                with _interrupt_deferred():
                    self._save("last.pt")
            except KeyboardInterrupt as stop:
                if self._rng_snapshot is not None:
                    with _stop_signals_ignored():  # a second signal must not abort the save
                        self._save("last.pt", gather_rng=False)  # other ranks may be stopped anywhere: no collective
                        self._save_rank_rng()
                    what = stop.args[0] if isinstance(stop, Preempted) else "Ctrl-C"
                    how = self.resume_command or f"Trainer(...).fit(resume=True) with run_dir {self.run_dir}"
                    message = (f"stopped by {what}: saved {self.checkpoint_dir / 'last.pt'} ({self._position_text()}); "
                               f"continue with: {how}")
                    self._log(message)
                    if self.is_main and not (logger.isEnabledFor(logging.INFO) and logger.hasHandlers()):
                        warnings.warn(message, stacklevel=2)  # nobody shows the log: say it once this way
                    stop.saved_to = self.checkpoint_dir / "last.pt"  # type: ignore[attr-defined]  # said: the CLI adds nothing
                raise
            finally:
                if self._batches is not None:
                    self._batches.close()
                    self._batches = None
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
        extra = {"train_loss": self.last_train_loss, f"best_{self.best_metric}": self.best_value}
        return {**self.last_eval, **{key: value for key, value in extra.items() if value is not None}}

    def _finished(self) -> bool:
        """All the run asks is done: ``epochs`` completed, or ``max_steps`` steps made."""
        s = self.settings
        return self.epoch >= s.epochs or (s.max_steps is not None and self.step >= s.max_steps)

    def _position_text(self) -> str:
        """Where the run stands, unambiguously: ``after epoch 5 (step 50)`` at an epoch's end, ``in epoch 6 after
        batch 3 of 10 (step 53)`` inside one."""
        if self.position == 0:
            return f"after epoch {self.epoch} (step {self.step})"
        total = self._steps_in_epoch(self.epoch + 1)
        return f"in epoch {self.epoch + 1} after batch {self.position} of {total} (step {self.step})"

    def _mark_completed(self) -> None:
        """Record the state a step changes before its optimiser update (RNG streams, model buffers, the
        criterion's extra state) as that of the last completed step."""
        self._rng_snapshot = capture_all_rng()
        self._buffer_snapshot = {name: b.detach().clone() for name, b in self.model.named_buffers()}
        self._criterion_snapshot = {}
        if isinstance(self.criterion, nn.Module):
            self._criterion_snapshot = {k: v for k, v in self.criterion.state_dict().items()
                                        if k.endswith("_extra_state")}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint holds (see :meth:`fit`), all of it as of the last completed step: RNG states,
        model buffers and the criterion's extra state are taken from the snapshot of that step (a Ctrl-C inside
        pass 1, the loss or pass 2 has already changed them); parameters and optimiser state change only in the
        optimiser update, which a Ctrl-C cannot split."""
        model_state = self.model.state_dict()
        model_state.update({k: v for k, v in self._buffer_snapshot.items() if k in model_state})
        criterion_state = None
        if isinstance(self.criterion, nn.Module):
            criterion_state = self.criterion.state_dict()
            criterion_state.update(self._criterion_snapshot)
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.run_config, "model_spec": self.model_spec, "recallk_version": __version__,
            "model": model_state,
            "criterion": criterion_state,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "sampler": {"epoch": self.epoch + 1, "position": self.position, "seed": self.settings.seed},
            "rng": self._rng_snapshot if self._rng_snapshot is not None else capture_all_rng(),
            **{key: getattr(self, key) for key in _PROGRESS},
            "best": {"metric": self.best_metric, "split": self.best_split, "value": self.best_value,
                     "epoch": self.best_epoch},
            "settings": {"batch_size": self.settings.batch_size, "per_class": self.settings.per_class,
                         "seed": self.settings.seed, "world_size": self.world_size},
        }

    # ----------------------------------------------------------------------------------------------- epochs
    def _steps_in_epoch(self, epoch: int) -> int:
        self.sampler.set_epoch(epoch)
        steps = len(self.sampler)
        return min(steps, self.settings.max_steps_per_epoch) if self.settings.max_steps_per_epoch else steps

    def _loader(self) -> ChunkedBatchLoader:
        """The sample-parallel loader (built once; workers persist across epochs): every worker loads chunks of
        the same batch, each item augmented from its own seed (seed, epoch, item), so any num_workers and any
        resume point give the same images."""
        if self._batches is None:
            s = self.settings
            self._batches = ChunkedBatchLoader(self._host_dataset, self.sampler, s.chunk_size, seed=s.seed,
                                               num_workers=s.num_workers, pin_memory=self.device.type == "cuda",
                                               prefetch_factor=s.prefetch_factor)
        return self._batches

    def _train_epoch(self, epoch: int) -> None:
        self.model.train()
        if isinstance(self.criterion, nn.Module):
            self.criterion.train()
        total = self._steps_in_epoch(epoch)
        self._epoch_start, self._epoch_first_step = time.perf_counter(), self.step
        if self.position >= total:
            return
        s = self.settings
        bar = tqdm(total=total * s.batch_size, initial=self.position * s.batch_size, unit="img", unit_scale=True,
                   desc=f"epoch {epoch}/{s.epochs}", disable=not (s.progress and self.is_main), dynamic_ncols=True,
                   leave=False)
        interval_loss, interval_steps, interval_start = 0.0, 0, time.perf_counter()
        batches = self._loader()
        wait_start = batches.wait_s

        def after_update(loss: float) -> None:  # with the update: a stop cannot drop the step's metrics line
            nonlocal interval_loss, interval_steps, interval_start, wait_start
            interval_loss += loss
            interval_steps += 1
            if interval_steps == s.log_every:
                elapsed = time.perf_counter() - interval_start
                self._log_train(epoch, interval_loss / interval_steps, "interval",
                                images_per_s=interval_steps * s.batch_size / max(elapsed, 1e-9),
                                data_wait_s=batches.wait_s - wait_start)
                interval_loss, interval_steps, interval_start = 0.0, 0, time.perf_counter()
                wait_start = batches.wait_s

        try:
            for chunks in batches.epoch(epoch, self.position, total):
                loss = self._train_step(chunks, epoch, after_update)
                bar.update(s.batch_size)
                bar.set_postfix(loss=f"{loss:.4f}")
                if s.max_steps is not None and self.step >= s.max_steps:
                    raise _StopRequested
                if self.position >= total:
                    break
        finally:
            bar.close()

    def _train_step(self, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], epoch: int,
                    after_update: Callable[[float], None] | None = None) -> float:
        """One optimiser step on a batch arriving as chunks (streaming pass 1: each chunk is embedded as it
        arrives, while the workers load the next ones); ``after_update(loss)`` runs with the update, before a
        stop signal held back during it is raised."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = cached_backward_stream(self.model, chunks, self.criterion, prepare=self.prepare, scaler=self.scaler,
                                      autocast_dtype=self.autocast_dtype, device=self.device, gather=self.gather)
        value = float(loss)
        where = (f"at epoch {epoch}, step {self.step + 1} (batch {self.position + 1} of the epoch); the last "
                 f"good checkpoint in {self.checkpoint_dir} was kept. Lower the learning rate or try amp=fp32")
        if not math.isfinite(value):
            raise NonFiniteLossError(f"the loss is {value} {where}")
        finite, zero = self._gradient_norms()
        if self.scaler is None and not finite:
            raise NonFiniteLossError(f"a parameter gradient is not finite {where}")
        updated = not zero
        with _interrupt_deferred():  # the update and the counters go together
            if self.scaler is not None:  # fp16: the scaler skips steps with overflowing gradients by design
                scale = self.scaler.get_scale()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                updated = updated and self.scaler.get_scale() >= scale  # a skipped step lowers the scale
            else:
                self.optimizer.step()
            self.step += 1
            self.position += 1
            self.epoch_loss_sum += value
            self.epoch_steps += 1
            self._mark_completed()
            if after_update is not None:
                after_update(value)
        self._idle_steps = 0 if updated else self._idle_steps + 1
        if self._idle_steps >= MAX_IDLE_STEPS:
            why = ("the fp16 GradScaler skipped every one (overflowing gradients: use amp=bf16 or amp=fp32)"
                   if self.scaler is not None and not zero else "every gradient was exactly zero (check the loss "
                   "and the batch: per_class, labels)")
            raise TrainingStalledError(f"{self._idle_steps} steps in a row did not change the weights: {why}; "
                                       f"stopped at epoch {epoch}, step {self.step}")
        return value

    def _gradient_norms(self) -> tuple[bool, bool]:
        """(every gradient is finite, every gradient is exactly zero or absent)."""
        norms = [torch.linalg.vector_norm(p.grad.float()) for group in self.optimizer.param_groups
                 for p in group["params"] if p.grad is not None]
        if not norms:
            return True, True
        norms = torch.stack(norms)
        return bool(torch.isfinite(norms).all()), bool((norms == 0).all())

    def _finish_epoch(self, epoch: int) -> None:
        train_s = time.perf_counter() - self._epoch_start
        steps_here = self.step - self._epoch_first_step  # 0 when resumed at the epoch's last batch
        images_per_s = steps_here * self.settings.batch_size / max(train_s, 1e-9) if steps_here else None
        evaluated = epoch % self.settings.eval_every == 0 or epoch == self.settings.epochs
        lr = self.optimizer.param_groups[0]["lr"]  # the epoch's, before the scheduler steps to the next one's
        with _interrupt_deferred():  # the epoch's line, the scheduler and the counters go together
            loss = "-"
            if self.epoch_steps:
                self.last_train_loss = self.epoch_loss_sum / self.epoch_steps
                loss = f"{self.last_train_loss:.4f}"
                rate = {} if images_per_s is None else {"images_per_s": images_per_s}
                self._log_train(epoch, self.last_train_loss, "epoch", **rate)
            self.epoch_loss_sum, self.epoch_steps = 0.0, 0  # the next epoch's, as every checkpoint from here holds
            with warnings.catch_warnings():
                # After resuming exactly at an epoch's end this process has made no optimiser step yet: harmless.
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                self.scheduler.step()
            self.epoch = epoch
            self.position = 0
            if evaluated:
                self.pending_eval = epoch  # saved as such if a stop comes during the evaluation
        if evaluated:
            self._evaluate(epoch)
        self._epoch_times.append(time.perf_counter() - self._epoch_start)
        left = sum(self._epoch_times) / len(self._epoch_times) * (self.settings.epochs - epoch)
        rate = "-" if images_per_s is None else f"{images_per_s:.1f}"
        text = (f"epoch {epoch}/{self.settings.epochs}  step {self.step}  loss {loss}  "
                f"lr {lr:.3g}  {rate} img/s")
        if evaluated:
            text += "  |  " + self._eval_text(epoch, prefix=False)
        with _interrupt_deferred():  # a stop during the write: after it (and the epoch's line), the epoch done
            self.pending_eval = None
            self._mark_completed()
            self._save("last.pt")
            self._log(f"{text}  |  {_duration(time.perf_counter() - self._epoch_start)} this epoch, "
                      f"about {_duration(left)} left")

    # ------------------------------------------------------------------------------------------ evaluation
    def _evaluate(self, epoch: int) -> None:
        if self.eval_fn is None:
            return
        if self.is_main:
            self.model.eval()
            metrics = dict(self.eval_fn(self.model, epoch))
            if self.settings.best_metric not in metrics:
                raise ValueError(f"best_metric {self.settings.best_metric!r} is not among the evaluation metrics "
                                 f"{sorted(metrics)}; pass one of them as best_metric")
            self.last_eval = {k: _json_value(v) for k, v in metrics.items()}
            self._write_metrics("eval", epoch, {"split": "test", **self.last_eval})
            metric, split = self._selection_metric(metrics)
            value = float(self.last_eval[metric])
            if self.best_value is None or metric != self.best_metric or value > self.best_value:
                with _interrupt_deferred():  # the best value, best.pt and best.json change together
                    self.best_value, self.best_epoch, self.best_metric, self.best_split = value, epoch, metric, split
                    self._mark_completed()
                    self._save("best.pt", gather_rng=False)  # rank 0 alone here: no collective
                    self._write_best_json()
                    self._log(f"best.pt = epoch {epoch} ({metric} {100 * value:.2f} on the {split} split)")
        if self.settings.distributed:
            dist.barrier()

    def _selection_metric(self, metrics: Mapping[str, Any]) -> tuple[str, str]:
        """(metric key, split) that chooses best.pt: ``val/<best_metric>`` on the validation split when the
        evaluation has it, else ``best_metric`` on the test split."""
        validation = VALIDATION_PREFIX + self.settings.best_metric
        return (validation, "validation") if validation in metrics else (self.settings.best_metric, "test")

    def _write_best_json(self) -> None:
        """``run_dir/best.json`` (rank 0), atomically: which evaluation chose ``checkpoints/best.pt``:
        ``{"metric", "split" ("validation" or "test"), "value" (fraction as in metrics.jsonl), "epoch", "step"}``."""
        if not self.is_main:
            return
        record = {"metric": self.best_metric, "split": self.best_split, "value": self.best_value,
                  "epoch": self.best_epoch, "step": self.step}
        write_text_atomic(self.run_dir / "best.json", json.dumps(record) + "\n")

    # ------------------------------------------------------------------------------------- logs, checkpoints
    def _log(self, text: str) -> None:
        """One line of progress (rank 0): appended to ``run_dir/train.log`` and logged to ``recallk.train``."""
        if not self.is_main or not text:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.run_dir / "train.log", "a", encoding="utf-8") as handle:
            handle.write("".join(f"{stamp} {line}\n" for line in text.splitlines()))
        logger.info(text)

    def _eval_text(self, epoch: int, prefix: bool = True) -> str:
        """The summary of the evaluation of ``epoch`` (recall@k and map@r in percent, as the CLI's table; the
        validation split's as ``val/recall@k``, ``val/map@r`` after the test split's)."""
        if self.eval_fn is None or not self.last_eval:
            return ""
        shown = [(k, v) for k, v in self.last_eval.items()
                 if (k.removeprefix(VALIDATION_PREFIX).startswith("recall@") or k.removeprefix(VALIDATION_PREFIX)
                     == "map@r") and isinstance(v, float)]
        text = "  ".join(f"{k} {100 * v:.2f}" for k, v in shown)
        return f"evaluation after epoch {epoch}: {text}" if prefix else text

    def _log_start(self, resumed: bool) -> None:
        s, labels = self.settings, self.train_dataset.labels
        precision = {None: "float32", torch.bfloat16: "bfloat16 autocast",
                     torch.float16: "float16 autocast + GradScaler"}[self.autocast_dtype]
        classes = len(set(int(c) for c in labels))
        if not resumed:
            where = "new run"
        elif self.position == 0:
            where = f"resumed {self._position_text()}: " + (
                f"continuing with epoch {self.epoch + 1}" if self.epoch < s.epochs else "all epochs done")
        else:
            where = f"resumed {self._position_text()}: continuing with batch {self.position + 1}"
        spec = describe_loss(self.criterion)
        if spec is None:
            loss = type(self.criterion).__name__ if isinstance(self.criterion, nn.Module) else repr(self.criterion)
        elif spec.get("name") == "rsk":
            loss = f"rsk (ks {list(spec['ks'])}, SiMix {'on' if spec.get('simix') else 'off'})"
        else:
            options = {k: v for k, v in spec.items() if k != "name"}
            loss = str(spec["name"]) + (f" {options}" if options else "")
        self._log("\n".join([
            f"run folder   {self.run_dir} ({where})",
            f"device       {self.device}, {self.world_size} process(es)",
            f"train data   {len(labels)} images, {classes} classes; {self._steps_in_epoch(self.epoch + 1)} steps "
            f"per epoch, {s.epochs} epochs",
            f"batch        {s.batch_size} images ({s.per_class} per class) in chunks of {s.chunk_size}"
            + (f", {s.batch_size // self.world_size} per process" if self.world_size > 1 else ""),
            f"loss         {loss}",
            f"precision    {precision}; optimizer {s.optimizer}, lr {s.lr:g}",
        ]))

    def _rank_rng_path(self, rank: int) -> Path:
        return self.checkpoint_dir / f"last.rng.rank{rank}.pt"

    def _save_rank_rng(self) -> None:
        """After a stop (no collective possible): every rank but 0 writes its own random state, with its step,
        beside ``last.pt`` (rank 0's is in ``last.pt``)."""
        if self.settings.distributed and not self.is_main and self._rng_snapshot is not None:
            save_checkpoint({"step": self.step, "rng": self._rng_snapshot}, self._rank_rng_path(self.rank))

    def _rank_rng(self, state: dict[str, Any], path: Path) -> dict[str, Any]:
        """This rank's random state for a resume from ``state``: from ``rng_per_rank``, else from the rank's own
        file of the same step, else (no such file) a fresh stream seeded from (seed, rank, step), with a warning."""
        per_rank = state.get("rng_per_rank")
        if per_rank and len(per_rank) > self.rank:
            return per_rank[self.rank]
        if self.rank == 0:
            return state["rng"]
        side = path.with_name(self._rank_rng_path(self.rank).name)
        if side.is_file():
            mine = load_checkpoint(side)
            if mine.get("step") == state.get("step"):
                return mine["rng"]
        warnings.warn(f"rank {self.rank}: no random state of step {state.get('step')} in the checkpoint; this rank "
                      f"continues with a stream seeded from (seed, rank, step)", stacklevel=3)
        seed_everything(self.settings.seed + 1_000_003 * self.rank + 7919 * int(state.get("step", 0)))
        return capture_all_rng()

    def _trim_metrics(self) -> None:
        """Cut ``metrics.jsonl`` back to the restored step: drop lines of later steps (written after the checkpoint)
        and those of an evaluation that will run again, so that resuming never duplicates a line."""
        if not (self.is_main and self.metrics_path.is_file()):
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get("step", 0) > self.step:
                continue
            if (self.pending_eval is not None and record.get("kind") == "eval"
                    and record.get("epoch") == self.pending_eval):
                continue
            kept.append(line)
        tmp = self.metrics_path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.metrics_path)

    def _write_metrics(self, kind: str, epoch: int, values: Mapping[str, Any]) -> None:
        if not self.is_main:
            return
        record = {"kind": kind, "epoch": epoch, "step": self.step, "time": time.time(), **values}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(_json_value(record)) + "\n")
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{kind}/{key}", value, self.step)
            self._writer.flush()

    def _log_train(self, epoch: int, loss: float, scope: str, **extra: float) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        self._write_metrics("train", epoch, {"scope": scope, "loss": loss, "lr": lr, **extra})

    def _open_tensorboard(self) -> None:
        if not (self.settings.tensorboard and self.is_main):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # tensorboard is optional at run time
            warnings.warn(f"TensorBoard logging is off ({error}); `pip install tensorboard` to enable it",
                          stacklevel=3)
            return
        self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def _save(self, name: str, gather_rng: bool = True) -> None:
        """Write checkpoint ``name`` (rank 0); ``best.pt`` is weights-only (``engine.checkpoint.WEIGHTS_ONLY_KEYS``:
        no optimizer, scheduler, scaler or random state), the others hold everything a resume needs."""
        if name == "best.pt":
            if self.is_main:
                save_checkpoint(weights_only_state(self.state_dict()), self.checkpoint_dir / name)
            return
        state = self.state_dict()
        if self.settings.distributed and gather_rng:
            per_rank: list[Any] = [None] * self.world_size
            dist.all_gather_object(per_rank, state["rng"])
            state["rng_per_rank"] = per_rank
        if self.is_main:
            save_checkpoint(state, self.checkpoint_dir / name)

    def _write_config(self, resumed: bool) -> None:
        """``run_dir/config.yaml`` (rank 0): written at the start of a new run; a resumed run keeps the file it
        has (never silently rewritten) and writes it only when it is missing."""
        path = self.run_dir / "config.yaml"
        if self.is_main and not (resumed and path.exists()):
            write_config(self.run_config, path)

    def _restore(self, state: dict[str, Any], path: Path | None = None) -> None:
        if is_weights_only(state):
            raise ValueError(f"{path} is a weights-only checkpoint (best.pt keeps no optimizer or random state): it "
                             f"cannot resume a run; resume from {self.checkpoint_dir / 'last.pt'}")
        settings = state.get("settings", {})
        for key in ("batch_size", "per_class", "seed"):
            mine = getattr(self.settings, key)
            if key in settings and settings[key] != mine:
                raise ValueError(f"the checkpoint was written with {key}={settings[key]} but this run has "
                                 f"{key}={mine}; resume with the same {key}")
        self.model.load_state_dict(state["model"])
        if isinstance(self.criterion, nn.Module) and state.get("criterion") is not None:
            self.criterion.load_state_dict(state["criterion"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        for key in _PROGRESS:
            setattr(self, key, state.get(key, getattr(self, key)))
        best = state.get("best", {})
        self.best_value, self.best_epoch = best.get("value"), best.get("epoch")
        self.best_metric = best.get("metric") or self.settings.best_metric
        self.best_split = best.get("split") or ("validation" if self.best_metric.startswith(VALIDATION_PREFIX)
                                                else "test")
        rng = self._rank_rng(state, path if path is not None else self.checkpoint_dir / "last.pt")
        restore_all_rng(rng)
        self._mark_completed()  # the restored model and criterion are the checkpoint's completed step
        self._rng_snapshot = rng
        self._trim_metrics()


def _duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m"``, ``75`` -> ``"1m15s"``, ``4.2`` -> ``"4s"``."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
