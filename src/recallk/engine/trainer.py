"""The training loop: class-balanced large batches, cached two-pass steps, evaluation, checkpoints, clean stops.

The run's files are written by :mod:`recallk.engine.run_log` (logs, metrics), :mod:`recallk.engine.trainer_state`
(checkpoints) and :mod:`recallk.engine.best` (which evaluation chooses best.pt); stop signals are recorded by
:mod:`recallk.engine.stop` and acted on here, at step boundaries.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from recallk.data.loading import ChunkedBatchLoader
from recallk.data.samplers import ClassBalancedBatchSampler
from recallk.data.transforms import with_device_normalize
from recallk.engine.best import BestChoice, record_evaluation
from recallk.engine.cached import Prepare, cached_backward_stream
from recallk.engine.checkpoint import load_checkpoint
from recallk.engine.distributed import DistributedContext, DistributedGather, init_distributed
from recallk.engine.optim import build_scheduler, optimizer_for_groups
from recallk.engine.param_groups import freeze_blocks, groups_text, parameter_groups
from recallk.engine.run_config import merge_run_config, trainer_run_config
from recallk.engine.run_log import IntervalMeter, RunLog, duration, eval_summary, start_block
from recallk.engine.settings import TrainSettings, check_amp_device, check_per_class
from recallk.engine.step_checks import IdleSteps, NonFiniteLossError, TrainingStalledError, check_finite
from recallk.engine.stop import Stopped, StopSignals
from recallk.engine.trainer_state import restore_trainer, save_last
from recallk.run_folder import RunFolder
from recallk.utils import autocast_dtype, count_text, resolve_device, seed_everything

EvalFn = Callable[[nn.Module, int], Mapping[str, Any]]
__all__ = ["NonFiniteLossError", "Stopped", "Trainer", "TrainingStalledError"]
class Trainer:
    """Trains ``model`` with ``criterion`` on ``train_dataset``, writing logs and checkpoints into ``run_dir``.

    Every step takes one class-balanced batch of ``batch_size`` images (``per_class`` per class), embeds it in
    chunks of ``chunk_size`` with :func:`recallk.engine.cached_backward` (several processes: with a
    :class:`recallk.engine.DistributedGather`) and makes one optimiser step. One learning rate for all
    parameters, the criterion's included, unless the settings ask for fine-tuning groups (``fc_lr_mul``,
    ``layer_decay``, ``filter_bias_and_bn``, ``loss_lr_multiplier``; :mod:`recallk.engine.param_groups`;
    ``freeze_blocks`` sets ``requires_grad=False`` on the model's stem and first blocks); MultiStepLR steps once
    per epoch, scaling every group's rate alike.

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
            (:func:`recallk.engine.run_config.merge_run_config`, the given values winning; the CLI passes its whole
            resolved config); written to ``run_dir/config.yaml`` when ``fit`` starts and stored in every checkpoint
            with ``model_spec`` and ``recallk_version``, so ``recallk.load_model`` and ``recallk eval
            --checkpoint`` use one alone; ``best.pt`` is weights-only.
        resume_command: how to continue the run after a stop, as the stop message says it (the CLI passes
            ``recallk train --name <run> --resume``); default: ``Trainer(...).fit(resume=True)`` on the run folder.

    Raises:
        ValueError: bad settings, before any training and before the epoch-0 evaluation: a batch the sampler
            cannot form (too few classes with ``per_class`` items), or ``per_class`` below the criterion's
            ``min_per_class`` (2 for pair- and rank-based losses), or ``amp="fp16"`` on the CPU.
    """

    def __init__(self, model: nn.Module, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 train_dataset: Dataset, run_dir: str | os.PathLike, settings: TrainSettings | None = None, *,
                 eval_fn: EvalFn | None = None, config: Mapping[str, Any] | None = None,
                 resume_command: str | None = None, **settings_kwargs: Any) -> None:
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
        context = (init_distributed(device=s.device) if s.distributed
                   else DistributedContext(0, 1, 0, resolve_device(s.device)))
        self.rank, self.world_size, self.device = context.rank, context.world_size, context.device
        self.is_main = self.rank == 0
        self.gather = DistributedGather(s.loss_sharding) if s.distributed else None

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
        # Fine-tuning groups (recallk.engine.param_groups): the defaults give one group, the authors' single rate.
        frozen = set(freeze_blocks(self.model, s.freeze_blocks))  # requires_grad=False: in no group, never changed
        self.frozen_weights = sum(p.numel() for n, p in self.model.named_parameters() if n in frozen)
        groups = parameter_groups(
            self.model, self.criterion if isinstance(self.criterion, nn.Module) else None, lr=s.lr,
            weight_decay=s.weight_decay, fc_lr_mul=s.fc_lr_mul, loss_lr_multiplier=s.loss_lr_multiplier,
            layer_decay=s.layer_decay, filter_bias_and_bn=s.filter_bias_and_bn)
        self.optimizer_text = groups_text(groups, self.frozen_weights)  # the start block's optimiser line
        self.optimizer = optimizer_for_groups(groups, s.optimizer, lr=s.lr, weight_decay=s.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, s.milestones, s.gamma)
        check_amp_device(s.amp, self.device)
        self.autocast_dtype = autocast_dtype(s.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.autocast_dtype == torch.float16 else None

        self.folder = RunFolder(self.run_dir)
        self.log = RunLog(self.folder, self.is_main)
        self.best = BestChoice(s.best_metric)
        self.epoch = self.position = self.step = self.epoch_steps = 0
        self.epoch_loss_sum = 0.0
        self.last_train_loss: float | None = None
        self.last_eval: dict[str, Any] = {}
        self.stop_signals = StopSignals()
        self._idle = IdleSteps()
        self._epoch_times: list[float] = []
        self._epoch_start, self._epoch_first_step = time.perf_counter(), 0

    def current_lr(self) -> float:
        """``train.lr`` as the scheduler has it now: the rate of a group at ``train.lr`` (the only group by
        default), else ``train.lr`` times the scheduler's factor (fine-tuning groups, where no group trains at
        exactly ``train.lr``); the logs' and metrics' ``lr``."""
        for group in self.optimizer.param_groups:
            if group.get("initial_lr", group["lr"]) == self.settings.lr:
                return group["lr"]
        group = self.optimizer.param_groups[0]
        return self.settings.lr * group["lr"] / group.get("initial_lr", group["lr"])

    def fit(self, resume: bool | str | os.PathLike = False) -> dict[str, Any]:
        """Train to the last epoch (or ``max_steps``); returns the final evaluation metrics (empty without
        ``eval_fn``) plus ``train_loss`` (mean of the last epoch) and ``best_<metric>``, the value that chose
        best.pt (``best_val/map@r`` when the evaluation has a validation split, else ``best_map@r``).

        ``resume``: True continues from ``run_dir/checkpoints/last.pt``, a path from that checkpoint; the
        continued run ends with the weights an uninterrupted run would have (any num_workers). On resume,
        ``metrics.jsonl`` is cut back to the checkpoint's step.

        Progress goes to ``run_dir/train.log`` and to the ``recallk.train`` logger (INFO): a block at the start, a
        line per epoch (loss, images/s, evaluation metrics, time left). Ctrl-C, SIGTERM and SIGUSR1 are recorded
        and acted on after the optimiser update, or the evaluation, under way (:mod:`recallk.engine.stop`): every
        rank stops at the same step, ``checkpoints/last.pt`` is saved and :class:`Stopped` raised. A second Ctrl-C
        aborts at once (KeyboardInterrupt, nothing saved).

        Raises:
            NonFiniteLossError: NaN/Inf loss or gradient (names epoch and step; checkpoints stay as they were).
            TrainingStalledError: ``MAX_IDLE_STEPS`` steps in a row changed no weight (GradScaler skips, zero
                gradients); checkpoints stay as they were.
            Stopped: after saving ``checkpoints/last.pt`` on a stop signal (a KeyboardInterrupt).
            FileNotFoundError: ``resume`` names no checkpoint.
        """
        seed_everything(self.settings.seed + self.rank)
        resumed, s = bool(resume), self.settings
        with self.stop_signals.installed():
            if resumed:
                path = self.folder.last_pt if resume is True else Path(resume)
                restore_trainer(self, load_checkpoint(path, map_location=self.device), path)
            self.log.write_config(self.run_config, resumed)
            self.log.line(start_block(self, resumed))
            if self.gather is not None:  # how the ranks split the loss, said once (a loss that cannot shard: why)
                self.log.line(f"sharding     {self.gather.note(self.criterion)}")
            self.log.open_tensorboard(s.tensorboard)
            try:
                if not resumed:
                    self._evaluate(0)
                    self.log.line(self._eval_text(0))
                    self._stop_if_requested()
                elif self._finished():
                    self.log.line(f"nothing to train: {self._position_text()}, and the run asks for "
                                  f"{count_text(s.epochs, 'epoch')}"
                                  + (f", {count_text(s.max_steps, 'step')}" if s.max_steps is not None else ""))
                while self.epoch < s.epochs and not self._finished():
                    if self._train_epoch(self.epoch + 1):  # max_steps reached inside the epoch
                        save_last(self)
                        break
                    self._finish_epoch(self.epoch + 1)
                self._stop_if_requested()  # a signal after the last check
            except Stopped as stop:
                if self.log.said_nowhere():
                    warnings.warn(str(stop), stacklevel=2)  # nobody shows the log: say it once this way
                raise
            finally:
                if self._batches is not None:
                    self._batches.close()
                    self._batches = None
                self.log.close()
        extra = {"train_loss": self.last_train_loss, f"best_{self.best.metric}": self.best.value}
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

    def _stop_if_requested(self, save: bool = True) -> None:
        """A safe point (a step boundary: after an optimiser update, or an epoch's end): when a stop signal came
        (to any rank: all agree here), save ``last.pt`` (unless ``save`` is False: just saved), say so once and
        raise :class:`Stopped`."""
        signum = self.stop_signals.requested(self.settings.distributed, self.device)
        if signum is None:
            return
        path = save_last(self) if save else self.folder.last_pt
        how = self.resume_command or f"Trainer(...).fit(resume=True) with run_dir {self.run_dir}"
        stop = Stopped(signum, path, self.epoch, self.step, self._position_text(), how)
        self.log.line(str(stop))
        raise stop

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

    def _train_epoch(self, epoch: int) -> bool:
        """The steps left in ``epoch``, a stop check after each; returns True when ``max_steps`` is reached."""
        self.model.train()
        if isinstance(self.criterion, nn.Module):
            self.criterion.train()
        total = self._steps_in_epoch(epoch)
        self._epoch_start, self._epoch_first_step = time.perf_counter(), self.step
        if self.position >= total:
            return False
        s = self.settings
        bar = tqdm(total=total * s.batch_size, initial=self.position * s.batch_size, unit="img", unit_scale=True,
                   desc=f"epoch {epoch}/{s.epochs}", disable=not (s.progress and self.is_main), dynamic_ncols=True,
                   leave=False)
        batches = self._loader()
        meter = IntervalMeter(s.log_every, s.batch_size, lambda: batches.wait_s)

        def after_update(loss: float) -> None:
            if (values := meter.add(loss)) is not None:
                self._log_train(epoch, values.pop("loss"), "interval", **values)

        try:
            for chunks in batches.epoch(epoch, self.position, total):
                loss = self._train_step(chunks, epoch, after_update)
                bar.update(s.batch_size)
                bar.set_postfix(loss=f"{loss:.4f}")
                self._stop_if_requested()
                if s.max_steps is not None and self.step >= s.max_steps:
                    return True
                if self.position >= total:
                    break
        finally:
            bar.close()
        return False

    def _train_step(self, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], epoch: int,
                    after_update: Callable[[float], None] | None = None) -> float:
        """One optimiser step on a batch arriving as chunks (streaming pass 1: each chunk is embedded as it
        arrives, while the workers load the next ones); ``after_update(loss)`` runs after the update."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = cached_backward_stream(self.model, chunks, self.criterion, prepare=self.prepare, scaler=self.scaler,
                                      autocast_dtype=self.autocast_dtype, device=self.device, gather=self.gather)
        value = float(loss)
        where = (f"at epoch {epoch}, step {self.step + 1} (batch {self.position + 1} of the epoch); the last "
                 f"good checkpoint in {self.folder.checkpoints} was kept. Lower the learning rate or try amp=fp32")
        zero = check_finite(value, self.optimizer, self.scaler is not None, where)
        updated = not zero
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
        if after_update is not None:
            after_update(value)
        self._idle.after(updated, self.scaler is not None and not zero, epoch, self.step)
        return value

    def _finish_epoch(self, epoch: int) -> None:
        """The epoch's line, the scheduler's step, the evaluation, ``last.pt``; then a stop check."""
        train_s = time.perf_counter() - self._epoch_start
        steps_here = self.step - self._epoch_first_step  # 0 when resumed at the epoch's last batch
        images_per_s = steps_here * self.settings.batch_size / max(train_s, 1e-9) if steps_here else None
        evaluated = epoch % self.settings.eval_every == 0 or epoch == self.settings.epochs
        lr = self.current_lr()  # the epoch's, before the scheduler steps to the next one's
        loss = "-"
        if self.epoch_steps:
            self.last_train_loss = self.epoch_loss_sum / self.epoch_steps
            loss = f"{self.last_train_loss:.4f}"
            self._log_train(epoch, self.last_train_loss, "epoch",
                            **({} if images_per_s is None else {"images_per_s": images_per_s}))
        self.epoch_loss_sum, self.epoch_steps = 0.0, 0  # the next epoch's, as every checkpoint from here holds
        with warnings.catch_warnings():
            # After resuming exactly at an epoch's end this process has made no optimiser step yet: harmless.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()
        self.epoch, self.position = epoch, 0
        if evaluated:
            self._evaluate(epoch)
        self._epoch_times.append(time.perf_counter() - self._epoch_start)
        left = sum(self._epoch_times) / len(self._epoch_times) * (self.settings.epochs - epoch)
        rate = "-" if images_per_s is None else f"{images_per_s:.1f}"
        text = f"epoch {epoch}/{self.settings.epochs}  step {self.step}  loss {loss}  lr {lr:.3g}  {rate} img/s"
        if evaluated:
            text += "  |  " + self._eval_text()
        save_last(self)
        self.log.line(f"{text}  |  {duration(time.perf_counter() - self._epoch_start)} this epoch, "
                      f"about {duration(left)} left")
        self._stop_if_requested(save=False)

    def _evaluate(self, epoch: int) -> None:
        if self.eval_fn is None:
            return
        if self.is_main:
            self.model.eval()
            record_evaluation(self, epoch, dict(self.eval_fn(self.model, epoch)))
        if self.settings.distributed:
            dist.barrier()

    def _eval_text(self, epoch: int | None = None) -> str:
        return eval_summary(self.last_eval if self.eval_fn is not None else {}, epoch)

    def _log_train(self, epoch: int, loss: float, scope: str, **extra: float) -> None:
        lr = self.current_lr()
        self.log.metrics("train", epoch, self.step, {"scope": scope, "loss": loss, "lr": lr, **extra})
