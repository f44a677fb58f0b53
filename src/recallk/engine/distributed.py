"""Several processes (GPUs or machines) sharing one global batch through torch.distributed.

Each rank embeds its own slice of the global batch (pass 1), the detached embeddings and labels are all-gathered,
every rank computes the loss of the global batch and its gradient (identical on every rank), takes the rows of
its own slice and runs pass 2 on them. A rank's model gradient is then its slice's share of the global
gradient, so the model gradients are SUMMED across ranks; the criterion's parameters get the full gradient on
every rank, so theirs are AVERAGED. The result equals the single-process gradient of the global batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from recallk.engine.cached import (
    Criterion,
    backward_chunks,
    embed_without_grad,
    loss_and_embedding_grad,
    resolve_step_device,
    split_into_chunks,
)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its machine, its ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None) -> DistributedContext:
    """Join the process group described by torchrun's environment variables.

    Reads RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR / MASTER_PORT through the ``env://`` method). The
    backend defaults to nccl when CUDA is available, gloo otherwise; with nccl each rank uses
    ``cuda:LOCAL_RANK``, with gloo the CPU. In a process whose group is already initialised it only describes
    that group.
    Raises ValueError when the variables are missing (start the program with ``torchrun``).
    """
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        use_cuda = dist.get_backend() == "nccl"
    else:
        needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        missing = [name for name in needed if name not in os.environ]
        if missing:
            raise ValueError(f"distributed training needs the environment variables {missing}; start the "
                             "program with `torchrun --nproc_per_node N ...` (or set them yourself)")
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        use_cuda = backend == "nccl"
        if use_cuda:  # bind the device before the group forms, so NCCL uses the right GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def all_gather_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every rank's ``tensor`` (n_r, ...) along dim 0 in rank order; n_r may differ by rank.

    Returns (the gathered tensor (sum n_r, ...), the list of n_r). No autograd through it.
    """
    world_size = dist.get_world_size()
    count = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.int64)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    largest = max(sizes)
    padded = tensor.new_zeros((largest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)]), sizes


def _shared_rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rank 0's CPU (and CUDA device) generator state, broadcast to every rank."""
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    payload = [torch.get_rng_state(), cuda_state]
    dist.broadcast_object_list(payload, src=0, device=device if device.type == "cuda" else None)
    return payload[0], payload[1]


def _loss_with_shared_rng(criterion: Criterion, embeddings: torch.Tensor, labels: torch.Tensor,
                          scaler: torch.amp.GradScaler | None, device: torch.device
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    # A criterion that draws random numbers (SiMix) must draw the same ones on every rank, or the ranks would
    # hold gradients of different losses. Rank 0 draws from its own generators (which advance, as in a single
    # process); the other ranks replay rank 0's state in a fork, leaving their own streams untouched.
    cpu_state, cuda_state = _shared_rng_state(device)
    if dist.get_rank() == 0:
        return loss_and_embedding_grad(criterion, embeddings, labels, scaler=scaler)
    devices = [] if cuda_state is None else [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
        return loss_and_embedding_grad(criterion, embeddings, labels, scaler=scaler)


def all_reduce_gradients(parameters: Iterable[nn.Parameter], *, average: bool) -> None:
    """Sum (``average=False``) or average the ``.grad`` of ``parameters`` over all ranks, in one flat buffer.

    Every rank must pass the same list; a parameter without a gradient on this rank takes part with zeros and
    keeps ``grad = None``.
    """
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    if average:
        flat /= dist.get_world_size()
    offset = 0
    for param, grad in zip(params, grads):
        numel = grad.numel()
        if param.grad is not None:  # a parameter unused by this model's forward keeps grad None, as in one process
            param.grad.copy_(flat[offset: offset + numel].view_as(grad))
        offset += numel


def distributed_cached_backward(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    criterion: Criterion,
    chunk_size: int,
    *,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """:func:`recallk.engine.cached_backward` for this rank's slice of a global batch.

    ``images`` (n_r, C, H, W) and ``labels`` (n_r,) are this rank's rows of the global batch (rank order = row
    order). On return every rank holds, in ``.grad``, the gradient of the loss of the whole global batch (model
    gradients summed over ranks, criterion gradients averaged), i.e. what one process would get on the global
    batch; gradients already in ``.grad`` before the call are reduced too, so zero them first. Returns the
    global loss (detached, identical on every rank).
    """
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images has {images.shape[0]} rows but labels has {labels.shape[0]}; they must match")
    run_device = resolve_step_device(model, images, device)
    chunks = split_into_chunks(images, chunk_size)
    local, rng_states = embed_without_grad(model, chunks, device=run_device, autocast_dtype=autocast_dtype)
    global_embeddings, sizes = all_gather_rows(local)
    global_labels, _ = all_gather_rows(labels.to(run_device))
    loss, grad = _loss_with_shared_rng(criterion, global_embeddings, global_labels, scaler, run_device)
    start = sum(sizes[: dist.get_rank()])
    local_grad = grad[start: start + images.shape[0]]
    del global_embeddings, grad
    backward_chunks(model, chunks, local_grad, rng_states, device=run_device, autocast_dtype=autocast_dtype)
    all_reduce_gradients(model.parameters(), average=False)
    if isinstance(criterion, nn.Module):
        all_reduce_gradients(criterion.parameters(), average=True)
    return loss
