"""Large-batch training: the cached two-pass step, checkpoints, several processes and the trainer.

Imports only from ``recallk.data``, ``recallk.utils`` and torch; the evaluation comes in as a callback.
"""

from recallk.engine.cached import (
    backward_chunks,
    cached_backward,
    embed_without_grad,
    freeze_batchnorm,
    loss_and_embedding_grad,
    split_into_chunks,
)
from recallk.engine.checkpoint import load_checkpoint, save_checkpoint
from recallk.engine.distributed import (
    DistributedContext,
    all_reduce_gradients,
    distributed_cached_backward,
    init_distributed,
)
from recallk.engine.optim import build_optimizer, build_scheduler
from recallk.engine.rng import RngState, capture_all_rng, restore_all_rng
from recallk.engine.trainer import NonFiniteLossError, Trainer

__all__ = [
    "DistributedContext",
    "NonFiniteLossError",
    "RngState",
    "Trainer",
    "all_reduce_gradients",
    "backward_chunks",
    "build_optimizer",
    "build_scheduler",
    "cached_backward",
    "capture_all_rng",
    "distributed_cached_backward",
    "embed_without_grad",
    "freeze_batchnorm",
    "init_distributed",
    "load_checkpoint",
    "loss_and_embedding_grad",
    "restore_all_rng",
    "save_checkpoint",
    "split_into_chunks",
]
