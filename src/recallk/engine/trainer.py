"""The training loop: class-balanced large batches, cached two-pass steps, evaluation, logs and checkpoints."""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from recallk.data.samplers import ClassBalancedBatchSampler
from recallk.engine.cached import cached_backward
from recallk.engine.checkpoint import load_checkpoint, save_checkpoint
from recallk.engine.optim import build_optimizer, build_scheduler
from recallk.engine.rng import capture_all_rng, restore_all_rng
from recallk.utils import resolve_device, seed_everything

EvalFn = Callable[[nn.Module, int], Mapping[str, Any]]
AMP_DTYPES: dict[str | None, torch.dtype | None] = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT_FORMAT = 1


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN or infinite; the run stopped without saving the bad weights."""


class _StopRequested(Exception):
    """Internal: the step budget ``max_steps`` is spent."""


def _json_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


class Trainer:
    """Trains ``model`` with ``criterion`` on ``train_dataset``, writing logs and checkpoints into ``run_dir``.

    Every step takes one class-balanced batch of ``batch_size`` images (``per_class`` per class), embeds it in
    chunks of ``chunk_size`` with :func:`recallk.engine.cached_backward` (several processes:
    :func:`recallk.engine.distributed.distributed_cached_backward`) and makes one optimiser step. One learning
    rate for all parameters, the criterion's included; MultiStepLR steps once per epoch.

    Args:
        model: maps images to L2-normalised (n, d) embeddings. BatchNorm freezing is the model's business
            (``build_model(freeze_bn=True)`` or :func:`recallk.engine.freeze_batchnorm`).
        criterion: ``criterion(embeddings (B, d) float32, labels (B,)) -> scalar``; an nn.Module's parameters
            and state are trained and checkpointed too.
        train_dataset: items ``(image tensor, label)`` (augmentation in its transform, run once per step on the
            CPU by the loader) and ``.labels`` (N,) class ids.
        run_dir: the run folder (docs/run-folder.md): ``metrics.jsonl``, ``checkpoints/``, ``tensorboard/``.
        batch_size, chunk_size, per_class: global batch, images per forward pass, images per class in a batch.
        epochs: number of training epochs (epoch 0 is the evaluation before training).
        optimizer, lr, weight_decay, milestones, gamma: see :mod:`recallk.engine.optim`.
        loss_lr_multiplier: learning rate of the criterion's own parameters (Proxy-Anchor's proxies) as a
            multiple of ``lr``; 1 = the authors' single learning rate.
        amp: "bf16", "fp16" (with a GradScaler) or None (float32).
        device: "auto" (CUDA if available), "cpu", "cuda:1", ...; ignored when distributed (each rank uses
            cuda:LOCAL_RANK or the CPU).
        seed: seeds Python, NumPy and torch at the start of :meth:`fit` (plus the rank when distributed) and
            the sampler's shuffles.
        eval_fn: ``eval_fn(model, epoch) -> metrics`` run on epoch 0, every ``eval_every`` epochs and after the
            last; ``best_metric`` (higher is better) picks ``checkpoints/best.pt``.
        num_workers: DataLoader workers. Bit-identical resume needs 0 (workers draw augmentation randomness
            from seeds that depend on where the loader started).
        max_steps_per_epoch: cap on steps per epoch (quick runs); max_steps: stop (and save) after this many
            global steps; a later ``fit(resume=True)`` continues.
        log_every: write a train line every this many steps (plus one per epoch).
        progress, tensorboard: tqdm bars (images/s, ETA) and TensorBoard scalars.
        distributed: join the torchrun process group (:func:`recallk.engine.distributed.init_distributed`).

    Raises:
        ValueError: bad settings (including a batch the sampler cannot form), before any training.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        train_dataset: Dataset,
        run_dir: str | os.PathLike,
        *,
        batch_size: int,
        chunk_size: int,
        per_class: int = 4,
        epochs: int,
        optimizer: str = "adam",
        lr: float = 1e-4,
        weight_decay: float = 4e-4,
        milestones: tuple[int, ...] | list[int] = (),
        gamma: float = 0.3,
        loss_lr_multiplier: float = 1.0,
        amp: str | None = None,
        device: str | torch.device = "auto",
        seed: int = 1,
        eval_fn: EvalFn | None = None,
        eval_every: int = 1,
        best_metric: str = "map@r",
        num_workers: int = 0,
        max_steps_per_epoch: int | None = None,
        max_steps: int | None = None,
        log_every: int = 1,
        progress: bool = True,
        tensorboard: bool = True,
        distributed: bool = False,
    ) -> None:
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of 'bf16', 'fp16' or None, got {amp!r}")
        for name, value in (("epochs", epochs), ("num_workers", num_workers)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name, value in (("chunk_size", chunk_size), ("eval_every", eval_every), ("log_every", log_every),
                            ("max_steps_per_epoch", max_steps_per_epoch or 1), ("max_steps", max_steps or 1)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        labels = getattr(train_dataset, "labels", None)
        if labels is None:
            raise ValueError("train_dataset must have a .labels attribute (one class id per item) for the "
                             "class-balanced sampler")

        self.rank, self.world_size = 0, 1
        if distributed:
            from recallk.engine.distributed import init_distributed

            context = init_distributed()
            self.rank, self.world_size, self.device = context.rank, context.world_size, context.device
        else:
            self.device = resolve_device(device)
        self.distributed = distributed
        self.is_main = self.rank == 0

        self.model = model.to(self.device)
        self.criterion = criterion.to(self.device) if isinstance(criterion, nn.Module) else criterion
        self.train_dataset = train_dataset
        self.run_dir = Path(run_dir)
        self.batch_size, self.chunk_size, self.per_class = batch_size, chunk_size, per_class
        self.epochs, self.seed = epochs, seed
        self.sampler = ClassBalancedBatchSampler(labels, batch_size, per_class=per_class, seed=seed,
                                                 rank=self.rank, world_size=self.world_size)
        modules = [self.model] + ([self.criterion] if isinstance(self.criterion, nn.Module) else [])
        multipliers = [1.0, loss_lr_multiplier][: len(modules)]
        self.optimizer = build_optimizer(modules, optimizer, lr=lr, weight_decay=weight_decay,
                                         lr_multipliers=multipliers)
        self.scheduler = build_scheduler(self.optimizer, milestones, gamma)
        self.autocast_dtype = AMP_DTYPES[amp]
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None
        self.eval_fn, self.eval_every, self.best_metric = eval_fn, eval_every, best_metric
        self.num_workers = num_workers
        self.max_steps_per_epoch, self.max_steps = max_steps_per_epoch, max_steps
        self.log_every, self.progress, self.use_tensorboard = log_every, progress, tensorboard

        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        # Progress: completed epochs, batches done in the epoch under way, global optimiser steps.
        self.epoch = 0
        self.position = 0
        self.step = 0
        self.epoch_loss_sum = 0.0
        self.epoch_steps = 0
        self.last_train_loss: float | None = None
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.last_eval: dict[str, Any] = {}
        self._rng_snapshot: dict[str, Any] | None = None
        self._writer: Any = None

    # ----------------------------------------------------------------------------------------------- public
    def fit(self, resume: bool | str | os.PathLike = False) -> dict[str, Any]:
        """Train to the last epoch (or ``max_steps``); returns the final evaluation metrics (empty without
        ``eval_fn``) plus ``train_loss`` (mean of the last epoch) and ``best_<best_metric>``.

        ``resume``: True continues from ``run_dir/checkpoints/last.pt``, a path from that checkpoint; the
        continued run ends with the weights an uninterrupted run would have (one process, num_workers=0).

        Raises:
            NonFiniteLossError: NaN/Inf loss or gradient (names epoch and step; checkpoints stay as they were).
            KeyboardInterrupt: after saving ``checkpoints/last.pt`` (Ctrl-C).
            FileNotFoundError: ``resume`` names no checkpoint.
        """
        seed_everything(self.seed + self.rank)
        resumed = bool(resume)
        if resumed:
            path = self.checkpoint_dir / "last.pt" if resume is True else Path(resume)
            self._restore(load_checkpoint(path, map_location=self.device))
        self._open_tensorboard()
        try:
            if not resumed:
                self._evaluate(0)
                self._rng_snapshot = capture_all_rng()
            while self.epoch < self.epochs:
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
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        result = dict(self.last_eval)
        if self.last_train_loss is not None:
            result["train_loss"] = self.last_train_loss
        if self.best_value is not None:
            result[f"best_{self.best_metric}"] = self.best_value
        return result

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint holds (see :meth:`fit`); RNG states as of the last completed step."""
        criterion_state = self.criterion.state_dict() if isinstance(self.criterion, nn.Module) else None
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "criterion": criterion_state,
            # A loss that draws from its own generator (SiMix alphas) must resume that stream too.
            "criterion_generator": None if (gen := self._criterion_generator()) is None else gen.get_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "sampler": {"epoch": self.epoch + 1, "position": self.position, "seed": self.seed},
            "rng": self._rng_snapshot if self._rng_snapshot is not None else capture_all_rng(),
            "epoch": self.epoch,
            "position": self.position,
            "step": self.step,
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_steps": self.epoch_steps,
            "last_train_loss": self.last_train_loss,
            "best": {"metric": self.best_metric, "value": self.best_value, "epoch": self.best_epoch},
            "last_eval": self.last_eval,
            "settings": {"batch_size": self.batch_size, "per_class": self.per_class, "seed": self.seed,
                         "world_size": self.world_size},
        }

    def _criterion_generator(self) -> torch.Generator | None:
        generator = getattr(self.criterion, "generator", None)
        return generator if isinstance(generator, torch.Generator) else None

    # ----------------------------------------------------------------------------------------------- epochs
    def _steps_in_epoch(self) -> int:
        steps = len(self.sampler)
        return min(steps, self.max_steps_per_epoch) if self.max_steps_per_epoch else steps

    def _loader(self, epoch: int) -> DataLoader:
        self.sampler.load_state_dict({"epoch": epoch, "position": self.position, "seed": self.seed})
        # A private generator: creating the loader must not draw from the global RNG (exact resume).
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return DataLoader(self.train_dataset, batch_sampler=self.sampler, num_workers=self.num_workers,
                          pin_memory=self.device.type == "cuda", generator=generator)

    def _train_epoch(self, epoch: int) -> None:
        self.model.train()
        if isinstance(self.criterion, nn.Module):
            self.criterion.train()
        total = self._steps_in_epoch()
        if self.position >= total:
            return
        bar = tqdm(total=total * self.batch_size, initial=self.position * self.batch_size, unit="img",
                   unit_scale=True, desc=f"epoch {epoch}/{self.epochs}", disable=not (self.progress and self.is_main),
                   dynamic_ncols=True, leave=False)
        interval_loss, interval_steps, interval_start = 0.0, 0, time.perf_counter()
        try:
            for images, labels in self._loader(epoch):
                loss = self._train_step(images, labels, epoch)
                interval_loss += loss
                interval_steps += 1
                bar.update(self.batch_size)
                bar.set_postfix(loss=f"{loss:.4f}")
                if interval_steps == self.log_every:
                    elapsed = time.perf_counter() - interval_start
                    self._log_train(epoch, interval_loss / interval_steps,
                                    interval_steps * self.batch_size / max(elapsed, 1e-9), scope="interval")
                    interval_loss, interval_steps, interval_start = 0.0, 0, time.perf_counter()
                if self.max_steps is not None and self.step >= self.max_steps:
                    raise _StopRequested
                if self.position >= total:
                    break
        finally:
            bar.close()

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        step_fn = cached_backward
        if self.distributed:
            from recallk.engine.distributed import distributed_cached_backward

            step_fn = distributed_cached_backward
        loss = step_fn(self.model, images, labels, self.criterion, self.chunk_size, scaler=self.scaler,
                       autocast_dtype=self.autocast_dtype, device=self.device)
        value = float(loss)
        where = (f"at epoch {epoch}, step {self.step + 1} (batch {self.position + 1} of the epoch); the last "
                 f"good checkpoint in {self.checkpoint_dir} was kept. Lower the learning rate or try amp=None")
        if not math.isfinite(value):
            raise NonFiniteLossError(f"the loss is {value} {where}")
        if self.scaler is None and not self._gradients_finite():
            raise NonFiniteLossError(f"a parameter gradient is not finite {where}")
        if self.scaler is not None:  # fp16: the scaler skips steps with overflowing gradients by design
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step += 1
        self.position += 1
        self.epoch_loss_sum += value
        self.epoch_steps += 1
        self._rng_snapshot = capture_all_rng()
        return value

    def _gradients_finite(self) -> bool:
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return True
        norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
        return bool(torch.isfinite(norms).all())

    def _finish_epoch(self, epoch: int) -> None:
        if self.epoch_steps:
            self.last_train_loss = self.epoch_loss_sum / self.epoch_steps
            self._log_train(epoch, self.last_train_loss, None, scope="epoch")
        with warnings.catch_warnings():
            # After resuming exactly at an epoch's end this process has made no optimiser step yet: harmless.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()
        self.epoch = epoch
        self.position = 0
        if epoch % self.eval_every == 0 or epoch == self.epochs:
            self._evaluate(epoch)
        self._rng_snapshot = capture_all_rng()
        self._save("last.pt")
        self.epoch_loss_sum, self.epoch_steps = 0.0, 0

    # ------------------------------------------------------------------------------------------ evaluation
    def _evaluate(self, epoch: int) -> None:
        if self.eval_fn is None:
            return
        if self.is_main:
            self.model.eval()
            metrics = dict(self.eval_fn(self.model, epoch))
            if self.best_metric not in metrics:
                raise ValueError(f"best_metric {self.best_metric!r} is not among the evaluation metrics "
                                 f"{sorted(metrics)}; pass one of them as best_metric")
            self.last_eval = {k: _json_value(v) for k, v in metrics.items()}
            record = {"split": "test", **self.last_eval}
            self._write_metrics("eval", epoch, record)
            value = float(self.last_eval[self.best_metric])
            if self.best_value is None or value > self.best_value:
                self.best_value, self.best_epoch = value, epoch
                self._rng_snapshot = capture_all_rng()
                self._save("best.pt", gather_rng=False)  # rank 0 alone here: no collective
        if self.distributed:
            import torch.distributed as dist

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

    def _log_train(self, epoch: int, loss: float, images_per_s: float | None, scope: str) -> None:
        values: dict[str, Any] = {"scope": scope, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"]}
        if images_per_s is not None:
            values["images_per_s"] = images_per_s
        self._write_metrics("train", epoch, values)

    def _open_tensorboard(self) -> None:
        if not (self.use_tensorboard and self.is_main):
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
        if self.distributed and gather_rng:
            import torch.distributed as dist

            per_rank: list[Any] = [None] * self.world_size
            dist.all_gather_object(per_rank, state["rng"])
            state["rng_per_rank"] = per_rank
        if self.is_main:
            save_checkpoint(state, self.checkpoint_dir / name)

    def _restore(self, state: dict[str, Any]) -> None:
        settings = state.get("settings", {})
        for key, mine in (("batch_size", self.batch_size), ("per_class", self.per_class), ("seed", self.seed)):
            if key in settings and settings[key] != mine:
                raise ValueError(f"the checkpoint was written with {key}={settings[key]} but this run has "
                                 f"{key}={mine}; resume with the same {key}")
        self.model.load_state_dict(state["model"])
        if isinstance(self.criterion, nn.Module) and state.get("criterion") is not None:
            self.criterion.load_state_dict(state["criterion"])
        generator = self._criterion_generator()
        if generator is not None and state.get("criterion_generator") is not None:
            generator.set_state(state["criterion_generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.position, self.step = int(state["epoch"]), int(state["position"]), int(state["step"])
        self.epoch_loss_sum = float(state.get("epoch_loss_sum", 0.0))
        self.epoch_steps = int(state.get("epoch_steps", 0))
        self.last_train_loss = state.get("last_train_loss")
        best = state.get("best", {})
        self.best_value, self.best_epoch = best.get("value"), best.get("epoch")
        self.last_eval = dict(state.get("last_eval", {}))
        per_rank = state.get("rng_per_rank")
        rng = per_rank[self.rank] if per_rank and len(per_rank) > self.rank else state["rng"]
        restore_all_rng(rng)
        self._rng_snapshot = rng
