"""The settings of a training run, checked once, as one frozen value."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recallk.engine.distributed import check_sharding
from recallk.engine.optim import check_optimizer
from recallk.engine.param_groups import check_group_settings
from recallk.utils import autocast_dtype


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """Everything a :class:`recallk.engine.Trainer` run is set up with besides model, criterion, data and folder.

    Attributes:
        batch_size, chunk_size, per_class: global batch, images per forward pass, images per class in a batch.
        epochs: number of training epochs (epoch 0 is the evaluation before training).
        optimizer, lr, weight_decay, milestones, gamma: see :mod:`recallk.engine.optim` (``OPTIMIZERS``).
        loss_lr_multiplier: learning rate of the criterion's own parameters (Proxy-Anchor's proxies) as a
            multiple of ``lr``; 1 = the authors' single learning rate.
        fc_lr_mul, layer_decay, filter_bias_and_bn, freeze_blocks: fine-tuning a pretrained backbone
            (:mod:`recallk.engine.param_groups`): the embedding head trains at ``lr * fc_lr_mul`` (the authors'
            name; 1 = one rate), the backbone's layers at ``lr * layer_decay ** (depth from the top)`` (None = no
            decay; 0.65-0.75 for ViTs), ``filter_bias_and_bn`` takes weight decay off biases, norms and
            position/class/register tokens (timm's rule), and ``freeze_blocks`` freezes the stem and the first N
            blocks (transformer blocks, CNN stages). The defaults give the authors' single group.
        amp: one of ``recallk.utils.AMP_CHOICES`` (:func:`recallk.utils.autocast_dtype`): None/"fp32" float32,
            "bf16", "fp16" (with a GradScaler), "auto" (bf16 on CUDA).
        device: "auto" (CUDA if available), "cpu", "cuda:1", ...; ignored when distributed (each rank uses
            cuda:LOCAL_RANK or the CPU).
        seed: seeds Python, NumPy and torch at the start of ``fit`` (plus the rank when distributed) and the
            sampler's shuffles.
        eval_every, best_metric: evaluate every this many epochs (and after the last); the metric (higher is
            better) that picks ``checkpoints/best.pt``.
        num_workers: loader worker processes; they load chunks of the same batch at once
            (:class:`recallk.data.loading.ChunkedBatchLoader`) and persist across epochs. Any number gives the
            same run: each item's augmentation randomness is seeded from (seed, epoch, item)
            (:func:`recallk.data.loading.item_seed`), so resume is bit-identical with workers too.
        prefetch_factor: chunks each worker loads ahead (the next batch loads while the current step runs).
        channels_last: run the model in the channels_last memory layout (pays with CUDA tensor cores, e.g.
            ResNet-50 + bf16 on an H200: 1.18x; same maths).
        device_normalize: when the dataset's transform ends with ``ToTensor() + Normalize`` (as
            :func:`recallk.data.build_transforms` makes it), load uint8 images (a quarter of the bytes; kept
            as such for pass 2) and convert + normalise on the device
            (:func:`recallk.data.transforms.split_device_normalize`; the same values bit for bit).
        max_steps_per_epoch: cap on steps per epoch (quick runs); max_steps: stop (and save) after this many
            global steps; a later ``fit(resume=True)`` continues.
        log_every: write a train line every this many steps (plus one per epoch).
        progress, tensorboard: tqdm bars (images/s, ETA) and TensorBoard scalars.
        distributed: join the torchrun process group (:func:`recallk.engine.distributed.init_distributed`).
        loss_sharding: how the processes split the global-batch loss (:class:`recallk.engine.DistributedGather`):
            "auto" (rows for a loss that can shard, RS@k; else replicate), "rows" (each process ranks its share
            of the queries against all references: about 1/N of the loss's time and memory each), "ring" (rows
            with the references passed around the ring: no process holds all of them) or "replicate" (every
            process computes the whole loss). A loss that cannot shard (the pytorch-metric-learning baselines)
            is replicated whatever is set, and the log says so. Ignored in one process.

    Raises:
        ValueError: an unknown optimizer or amp value, a non-positive ``fc_lr_mul`` or ``loss_lr_multiplier``, a
            ``layer_decay`` outside (0, 1], a negative ``freeze_blocks``, a negative ``epochs``/``num_workers``, a
            non-positive ``batch_size``/``per_class`` or a ``batch_size`` that is not a multiple of ``per_class``, a
            non-positive ``chunk_size``, ``prefetch_factor``, ``eval_every``, ``log_every``,
            ``max_steps_per_epoch`` or ``max_steps``, an unknown ``loss_sharding``.
    """

    batch_size: int
    chunk_size: int
    per_class: int = 4
    epochs: int
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 4e-4
    milestones: tuple[int, ...] = ()
    gamma: float = 0.3
    loss_lr_multiplier: float = 1.0
    fc_lr_mul: float = 1.0
    layer_decay: float | None = None
    filter_bias_and_bn: bool = False
    freeze_blocks: int = 0
    amp: str | bool | None = None
    device: str | torch.device = "auto"
    seed: int = 1
    eval_every: int = 1
    best_metric: str = "map@r"
    num_workers: int = 0
    prefetch_factor: int = 2
    channels_last: bool = False
    device_normalize: bool = True
    max_steps_per_epoch: int | None = None
    max_steps: int | None = None
    log_every: int = 1
    progress: bool = True
    tensorboard: bool = True
    distributed: bool = False
    loss_sharding: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(self.milestones))
        autocast_dtype(self.amp, torch.device("cpu"))  # raises ValueError for an unknown value
        check_sharding(self.loss_sharding)
        check_optimizer(self.optimizer)
        check_group_settings(self.fc_lr_mul, self.layer_decay, self.loss_lr_multiplier)
        if isinstance(self.freeze_blocks, bool) or not isinstance(self.freeze_blocks, int) or self.freeze_blocks < 0:
            raise ValueError(f"freeze_blocks must be an integer >= 0 (the stem and this many first blocks of the "
                             f"backbone are frozen), got {self.freeze_blocks!r}")
        if not isinstance(self.filter_bias_and_bn, bool):
            raise ValueError(f"filter_bias_and_bn must be true or false, got {self.filter_bias_and_bn!r}")
        for name, value in (("epochs", self.epochs), ("num_workers", self.num_workers)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name, value in (("batch_size", self.batch_size), ("per_class", self.per_class)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.batch_size % self.per_class:
            fixed = max(self.batch_size // self.per_class, 1) * self.per_class
            raise ValueError(f"batch_size {self.batch_size} is not divisible by per_class {self.per_class}: choose a "
                             f"multiple of per_class, e.g. batch_size={fixed}")
        for name, value in (("chunk_size", self.chunk_size), ("eval_every", self.eval_every),
                            ("prefetch_factor", self.prefetch_factor),
                            ("log_every", self.log_every), ("max_steps_per_epoch", self.max_steps_per_epoch or 1),
                            ("max_steps", self.max_steps or 1)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")


def check_per_class(per_class: int, need: int, loss: str) -> None:
    """Refuse ``per_class`` below ``need``, the loss's ``min_per_class`` (2 for pair- and rank-based losses: a query
    needs a positive in the batch). Raises ValueError with the fix."""
    if per_class < need:
        raise ValueError(
            f"per_class={per_class} cannot train {loss}: a query needs another item of its class in the batch (a "
            f"positive), so each class needs at least {need} items per batch; set per_class={max(need, 4)} (the "
            "paper uses 4)"
        )


def check_amp_device(amp: str | bool | None, device: torch.device) -> None:
    """Refuse fp16 on the CPU: the GradScaler would skip every step there and the weights would never change."""
    if device.type == "cpu" and autocast_dtype(amp, device) == torch.float16:
        raise ValueError("amp=fp16 cannot train on the CPU (the GradScaler skips every step there, so the weights "
                         "never change): use amp=bf16 or amp=fp32 on the CPU, or a CUDA device")
