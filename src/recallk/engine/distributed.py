"""Several processes (GPUs or machines) sharing one global batch through torch.distributed.

``cached_backward(..., gather=DistributedGather())``: each rank embeds its own slice of the global batch (pass
1), the detached embeddings and labels are all-gathered, every rank computes the loss of the global batch and
its gradient (identical on every rank), takes the rows of its own slice and runs pass 2 on them. A rank's model
gradient is then its slice's share of the global gradient, so the model gradients are SUMMED across ranks; the
criterion's parameters get the full gradient on every rank, so theirs are AVERAGED. The result equals the
single-process gradient of the global batch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recallk.engine.cached import Criterion
from recallk.engine.rng import RngState
from recallk.utils import resolve_device


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its machine, its ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def distributed_backend(device: str | torch.device | None = "auto") -> str:
    """The torch.distributed backend for a training ``device`` (``train.device``): ``"nccl"`` for CUDA (``"auto"``
    or None where CUDA is available), ``"gloo"`` for everything else (the CPU: several CPU processes under
    torchrun work on any machine, CUDA or not). Raises ValueError for an unreadable device string."""
    try:
        kind = resolve_device(device).type
    except RuntimeError as e:
        raise ValueError(f"unknown training device {device!r} ({e}); use cpu, cuda, cuda:N or auto") from e
    return "nccl" if kind == "cuda" else "gloo"


def init_distributed(backend: str | None = None, device: str | torch.device | None = "auto") -> DistributedContext:
    """Join the process group described by torchrun's environment variables.

    Reads RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR / MASTER_PORT through the ``env://`` method). The
    backend defaults to :func:`distributed_backend` of the training ``device``: nccl for CUDA, gloo for the CPU
    (``device="cpu"`` trains on the CPU with gloo even where CUDA exists); with nccl each rank uses
    ``cuda:LOCAL_RANK``, with gloo the CPU. In a process whose group is already initialised it only describes
    that group.
    Raises ValueError when the variables are missing (start the program with ``torchrun``).
    """
    joined = dist.is_initialized()
    if joined:
        rank, world_size, backend = dist.get_rank(), dist.get_world_size(), dist.get_backend()
    else:
        needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        missing = [name for name in needed if name not in os.environ]
        if missing:
            raise ValueError(f"distributed training needs the environment variables {missing}; start the "
                             "program with `torchrun --nproc_per_node N ...` (or set them yourself)")
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        backend = backend or distributed_backend(device)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":  # bound before the group forms, so that NCCL uses the right GPU
        torch.cuda.set_device(device)
    if not joined:
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
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


def _stateful_modules(criterion: Criterion) -> list[nn.Module]:
    """Sub-modules of ``criterion`` whose class overrides ``get_extra_state`` (e.g. a loss's own generator)."""
    if not isinstance(criterion, nn.Module):
        return []
    return [m for m in criterion.modules() if type(m).get_extra_state is not nn.Module.get_extra_state]


class DistributedGather:
    """The :class:`recallk.engine.cached.Gather` of the current torch.distributed process group."""

    def gather(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, slice]:
        global_embeddings, sizes = all_gather_rows(embeddings)
        global_labels, _ = all_gather_rows(labels)
        start = sum(sizes[: dist.get_rank()])
        return global_embeddings, global_labels, slice(start, start + embeddings.shape[0])

    @contextlib.contextmanager
    def shared_randomness(self, criterion: Criterion, device: torch.device) -> Iterator[None]:
        """Every rank draws rank 0's random numbers in the loss, or the ranks would hold gradients of different
        losses. The criterion's own generators (its modules' extra state) take rank 0's state for good, so they
        stay in step; the global generators: rank 0 draws from its own (which advance, as in one process), the
        other ranks replay rank 0's state in a fork, leaving their own streams untouched."""
        modules = _stateful_modules(criterion)
        payload: list[Any] = [RngState(device), [module.get_extra_state() for module in modules]]
        dist.broadcast_object_list(payload, src=0, device=device if device.type == "cuda" else None)
        if dist.get_rank() == 0:
            yield
            return
        for module, state in zip(modules, payload[1]):
            module.set_extra_state(state)
        shared = RngState(device)  # this rank's devices, rank 0's states
        shared.cpu_state, shared.cuda_states = payload[0].cpu_state, payload[0].cuda_states
        with shared.replay():
            yield

    def reduce_gradients(self, model: nn.Module, criterion: Criterion) -> None:
        all_reduce_gradients(model.parameters(), average=False)
        if isinstance(criterion, nn.Module):
            all_reduce_gradients(criterion.parameters(), average=True)

