"""The training loop: class-balanced large batches, cached two-pass steps, evaluation, logs and checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import json
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

from recallk.data.loading import ChunkedBatchLoader, SeededItems, item_seed
from recallk.data.samplers import ClassBalancedBatchSampler
from recallk.data.transforms import with_device_normalize
from recallk.engine.cached import Prepare, cached_backward_stream
from recallk.engine.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from recallk.engine.distributed import DistributedContext, DistributedGather, init_distributed
from recallk.engine.optim import build_optimizer, build_scheduler
from recallk.engine.rng import capture_all_rng, restore_all_rng
from recallk.engine.settings import TrainSettings
from recallk.utils import autocast_dtype, resolve_device, seed_everything

EvalFn = Callable[[nn.Module, int], Mapping[str, Any]]
# Progress kept in a checkpoint as is: completed epochs, batches done in the epoch under way, global optimiser
# steps, the running epoch loss, the last epoch's mean loss and the last evaluation.
__all__ = ["NonFiniteLossError", "SeededItems", "Trainer", "item_seed"]  # item_seed, SeededItems: recallk.data.loading
_PROGRESS = ("epoch", "position", "step", "epoch_loss_sum", "epoch_steps", "last_train_loss", "last_eval")


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN or infinite; the run stopped without saving the bad weights."""


class _StopRequested(Exception):
    """Internal: the step budget ``max_steps`` is spent."""


@contextlib.contextmanager
def _interrupt_deferred() -> Iterator[None]:
    """Hold back a Ctrl-C (SIGINT) until the block ends, then raise KeyboardInterrupt: the optimiser update and
    the step counters are applied together or not at all. Only in the main thread (elsewhere: no effect)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


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
            last; ``best_metric`` (higher is better) picks ``checkpoints/best.pt``.

    Raises:
        ValueError: bad settings, before any training and before the epoch-0 evaluation: a batch the sampler
            cannot form (too few classes with ``per_class`` items), or ``per_class`` below the criterion's
            ``min_per_class`` (2 for pair- and rank-based losses).
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
        **settings_kwargs: Any,
    ) -> None:
        s = TrainSettings(**settings_kwargs) if settings is None else dataclasses.replace(settings, **settings_kwargs)
        labels = getattr(train_dataset, "labels", None)
        if labels is None:
            raise ValueError("train_dataset must have a .labels attribute (one class id per item) for the "
                             "class-balanced sampler")
        need = int(getattr(criterion, "min_per_class", 1))
        if s.per_class < need:
            raise ValueError(
                f"per_class={s.per_class} cannot train {type(criterion).__name__}: a query needs another item of its "
                f"class in the batch (a positive), so each class needs at least {need} items per batch; set "
                f"per_class={max(need, 4)} (train.per_class in a config; the paper uses 4)"
            )
        self.settings, self.eval_fn = s, eval_fn
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
        self.autocast_dtype = autocast_dtype(s.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.autocast_dtype == torch.float16 else None

        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.epoch = self.position = self.step = self.epoch_steps = 0
        self.epoch_loss_sum = 0.0
        self.last_train_loss: float | None = None
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.last_eval: dict[str, Any] = {}
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
        ``eval_fn``) plus ``train_loss`` (mean of the last epoch) and ``best_<best_metric>``.

        ``resume``: True continues from ``run_dir/checkpoints/last.pt``, a path from that checkpoint; the
        continued run ends with the weights an uninterrupted run would have (any num_workers; a Ctrl-C inside
        a step resumes from the last completed step).

        Raises:
            NonFiniteLossError: NaN/Inf loss or gradient (names epoch and step; checkpoints stay as they were).
            KeyboardInterrupt: after saving ``checkpoints/last.pt`` (Ctrl-C).
            FileNotFoundError: ``resume`` names no checkpoint.
        """
        seed_everything(self.settings.seed + self.rank)
        resumed = bool(resume)
        if resumed:
            path = self.checkpoint_dir / "last.pt" if resume is True else Path(resume)
            self._restore(load_checkpoint(path, map_location=self.device))
        self._open_tensorboard()
        try:
            if not resumed:
                self._evaluate(0)
                self._mark_completed()
            while self.epoch < self.settings.epochs:
                self._train_epoch(self.epoch + 1)
                self._finish_epoch(self.epoch + 1)
        except _StopRequested:
            self._save("last.pt")
        except KeyboardInterrupt:
            if self._rng_snapshot is not None:
                self._save("last.pt", gather_rng=False)  # other ranks may be stopped anywhere: no collective
                warnings.warn(f"interrupted: saved {self.checkpoint_dir / 'last.pt'} (epoch {self.epoch}, "
                              f"step {self.step}); continue with resume", stacklevel=2)
            raise
        finally:
            if self._batches is not None:
                self._batches.close()
                self._batches = None
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        extra = {"train_loss": self.last_train_loss, f"best_{self.settings.best_metric}": self.best_value}
        return {**self.last_eval, **{key: value for key, value in extra.items() if value is not None}}

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
            "model": model_state,
            "criterion": criterion_state,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "sampler": {"epoch": self.epoch + 1, "position": self.position, "seed": self.settings.seed},
            "rng": self._rng_snapshot if self._rng_snapshot is not None else capture_all_rng(),
            **{key: getattr(self, key) for key in _PROGRESS},
            "best": {"metric": self.settings.best_metric, "value": self.best_value, "epoch": self.best_epoch},
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
        if self.position >= total:
            return
        s = self.settings
        bar = tqdm(total=total * s.batch_size, initial=self.position * s.batch_size, unit="img", unit_scale=True,
                   desc=f"epoch {epoch}/{s.epochs}", disable=not (s.progress and self.is_main), dynamic_ncols=True,
                   leave=False)
        interval_loss, interval_steps, interval_start = 0.0, 0, time.perf_counter()
        batches = self._loader()
        wait_start = batches.wait_s
        try:
            for chunks in batches.epoch(epoch, self.position, total):
                loss = self._train_step(chunks, epoch)
                interval_loss += loss
                interval_steps += 1
                bar.update(s.batch_size)
                bar.set_postfix(loss=f"{loss:.4f}")
                if interval_steps == s.log_every:
                    elapsed = time.perf_counter() - interval_start
                    self._log_train(epoch, interval_loss / interval_steps, "interval",
                                    images_per_s=interval_steps * s.batch_size / max(elapsed, 1e-9),
                                    data_wait_s=batches.wait_s - wait_start)
                    interval_loss, interval_steps, interval_start = 0.0, 0, time.perf_counter()
                    wait_start = batches.wait_s
                if s.max_steps is not None and self.step >= s.max_steps:
                    raise _StopRequested
                if self.position >= total:
                    break
        finally:
            bar.close()

    def _train_step(self, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], epoch: int) -> float:
        """One optimiser step on a batch arriving as chunks (streaming pass 1: each chunk is embedded as it
        arrives, while the workers load the next ones)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = cached_backward_stream(self.model, chunks, self.criterion, prepare=self.prepare, scaler=self.scaler,
                                      autocast_dtype=self.autocast_dtype, device=self.device, gather=self.gather)
        value = float(loss)
        where = (f"at epoch {epoch}, step {self.step + 1} (batch {self.position + 1} of the epoch); the last "
                 f"good checkpoint in {self.checkpoint_dir} was kept. Lower the learning rate or try amp=None")
        if not math.isfinite(value):
            raise NonFiniteLossError(f"the loss is {value} {where}")
        if self.scaler is None and not self._gradients_finite():
            raise NonFiniteLossError(f"a parameter gradient is not finite {where}")
        with _interrupt_deferred():  # the update and the counters go together
            if self.scaler is not None:  # fp16: the scaler skips steps with overflowing gradients by design
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.step += 1
            self.position += 1
            self.epoch_loss_sum += value
            self.epoch_steps += 1
            self._mark_completed()
        return value

    def _gradients_finite(self) -> bool:
        norms = [torch.linalg.vector_norm(p.grad.float()) for group in self.optimizer.param_groups
                 for p in group["params"] if p.grad is not None]
        return not norms or bool(torch.isfinite(torch.stack(norms)).all())

    def _finish_epoch(self, epoch: int) -> None:
        if self.epoch_steps:
            self.last_train_loss = self.epoch_loss_sum / self.epoch_steps
            self._log_train(epoch, self.last_train_loss, "epoch")
        with warnings.catch_warnings():
            # After resuming exactly at an epoch's end this process has made no optimiser step yet: harmless.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()
        self.epoch = epoch
        self.position = 0
        if epoch % self.settings.eval_every == 0 or epoch == self.settings.epochs:
            self._evaluate(epoch)
        self._mark_completed()
        self._save("last.pt")
        self.epoch_loss_sum, self.epoch_steps = 0.0, 0

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
            value = float(self.last_eval[self.settings.best_metric])
            if self.best_value is None or value > self.best_value:
                self.best_value, self.best_epoch = value, epoch
                self._mark_completed()
                self._save("best.pt", gather_rng=False)  # rank 0 alone here: no collective
        if self.settings.distributed:
            dist.barrier()

    # ------------------------------------------------------------------------------------- logs, checkpoints
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
        state = self.state_dict()
        if self.settings.distributed and gather_rng:
            per_rank: list[Any] = [None] * self.world_size
            dist.all_gather_object(per_rank, state["rng"])
            state["rng_per_rank"] = per_rank
        if self.is_main:
            save_checkpoint(state, self.checkpoint_dir / name)

    def _restore(self, state: dict[str, Any]) -> None:
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
        per_rank = state.get("rng_per_rank")
        rng = per_rank[self.rank] if per_rank and len(per_rank) > self.rank else state["rng"]
        restore_all_rng(rng)
        self._mark_completed()  # the restored model and criterion are the checkpoint's completed step
        self._rng_snapshot = rng
