"""Large-batch training: the cached two-pass step, checkpoints, several processes and the trainer.

Imports only from ``recallk.data``, ``recallk.models``, ``recallk.utils`` and torch; evaluation is a callback.
"""

from recallk.engine.cached import (
    Gather,
    backward_chunks,
    cached_backward,
    cached_backward_stream,
    embed_without_grad,
    loss_and_embedding_grad,
    split_into_chunks,
)
from recallk.engine.checkpoint import load_checkpoint, save_checkpoint
from recallk.engine.distributed import (
    DistributedContext,
    DistributedGather,
    all_reduce_gradients,
    init_distributed,
)
from recallk.engine.optim import OPTIMIZERS, build_optimizer, build_scheduler
from recallk.engine.rng import RngState, capture_all_rng, restore_all_rng
from recallk.engine.settings import TrainSettings
from recallk.engine.stop import Stopped
from recallk.engine.trainer import NonFiniteLossError, Trainer
from recallk.models import freeze_batchnorm
from recallk.utils import AMP_CHOICES

__all__ = [
    "AMP_CHOICES",
    "OPTIMIZERS",
    "DistributedContext",
    "DistributedGather",
    "Gather",
    "NonFiniteLossError",
    "RngState",
    "Stopped",
    "TrainSettings",
    "Trainer",
    "all_reduce_gradients",
    "backward_chunks",
    "build_optimizer",
    "build_scheduler",
    "cached_backward",
    "cached_backward_stream",
    "capture_all_rng",
    "embed_without_grad",
    "freeze_batchnorm",
    "init_distributed",
    "load_checkpoint",
    "loss_and_embedding_grad",
    "restore_all_rng",
    "save_checkpoint",
    "split_into_chunks",
]
