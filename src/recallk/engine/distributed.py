"""Several processes (GPUs or machines) sharing one global batch through torch.distributed.

``cached_backward(..., gather=DistributedGather(sharding))``: each rank embeds its own slice of the global batch
(pass 1); the gather's :meth:`DistributedGather.loss_and_grad` gives every rank the loss of the global batch and
its own rows of G = dL/dE; pass 2 back-propagates them. How the loss's work is split (``train.loss_sharding``):

- ``replicate``: the detached embeddings and labels are all-gathered, every rank computes the whole global-batch
  loss and its whole gradient (identical on every rank) and takes its own rows. O(B^2) loss time and memory on
  every rank. The only path for a loss that cannot shard (``MetricLoss.shardable`` False: the
  pytorch-metric-learning baselines, any plain callable).
- ``rows`` (what ``auto`` picks with several processes and a shardable loss, RS@k): after the same all-gather,
  every rank forms the same augmented batch (SiMix's pairs and alphas drawn from rank 0's generator state, see
  :meth:`DistributedGather.shared_randomness`) and computes only its share of the query rows against all
  references (:meth:`recallk.losses.MetricLoss.sharded_forward`; the shares sum to the global loss). Its
  backward gives dShare/dE for every row of the global batch; the ranks' (B, d) gradients are summed to the
  rows' owners by one reduce-scatter (gloo and NCCL, uneven slices allowed), the shares by one scalar all-reduce
  (``REDUCE_SCATTER_BACKENDS`` has the measurement; other backends: one all-reduce of the (B * d + 1) buffer,
  then this rank's slice). Loss time and memory per rank: about 1/N of one process's.
- ``ring``: :func:`recallk.engine.ring.ring_loss_and_grad`: the reference blocks travel around the ring, so no
  rank holds all B references (memory O(B/N x d + one block)).

A rank's model gradient is then its slice's share of the global gradient, so the model gradients are SUMMED
across ranks (one flat all-reduce per step). The criterion's own parameters get the full gradient on every rank
under ``replicate`` (AVERAGED) and a share of it under ``rows``/``ring`` (SUMMED). The result equals the
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

from recallk.engine.cached import Criterion, loss_and_embedding_grad
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


#: ``train.loss_sharding`` values (see the module docstring); ``auto``: ``rows`` with several processes and a
#: shardable loss, else ``replicate`` (docs/benchmarks.md, "The sharded loss across processes", has the
#: measurement it follows: rows was the fastest mode in every configuration measured, ring slower than one process)
SHARDINGS = ("auto", "replicate", "rows", "ring")
#: how ``rows`` sums the ranks' (B, d) embedding gradients to their owners: "reduce_scatter" (each rank receives
#: only its rows; the loss's shares then take one scalar all-reduce) or "all_reduce" (every rank receives all of
#: them and keeps its slice; the share rides in the same buffer, so one collective). The backends listed here use
#: the reduce-scatter. Measured with gloo on this project's 2-core CPU machine (torch 2.14, 1 thread per process,
#: median of 15, load average 17): (65,536 x 128) float32: 130 ms against 241 ms for 2 processes, 152 ms against
#: 412 ms for 4; at (6,000 x 64) 4.2 against 4.1 ms (2 processes). NCCL's reduce-scatter moves (N - 1) / N of the
#: bytes of its all-reduce. Other backends (mpi, ucc) take the all-reduce.
REDUCE_SCATTER_BACKENDS = ("gloo", "nccl")
REDUCES = ("auto", "all_reduce", "reduce_scatter")


def check_sharding(sharding: str) -> str:
    """``sharding`` if it is one of :data:`SHARDINGS`; ValueError naming the choices otherwise."""
    if sharding not in SHARDINGS:
        raise ValueError(f"train.loss_sharding must be one of {list(SHARDINGS)}, got {sharding!r}: rows (each process "
                         "computes its share of the loss), ring (rows with the references passed around), replicate "
                         "(every process computes the whole loss) or auto")
    return sharding


def loss_name(criterion: Criterion) -> str:
    """A criterion as messages name it: its ``loss_spec`` name, else its class name."""
    spec = getattr(criterion, "loss_spec", None)
    return str(spec["name"]) if isinstance(spec, dict) and "name" in spec else type(criterion).__name__


class DistributedGather:
    """The :class:`recallk.engine.cached.Gather` of the current torch.distributed process group.

    Args:
        sharding: how the global-batch loss is split between the ranks (:data:`SHARDINGS`, the module
            docstring): "auto" (default: "rows" with several processes when the criterion is shardable, else
            "replicate"), "replicate", "rows" or "ring". A criterion that cannot shard (``shardable`` False)
            falls back to "replicate" whatever is asked: :meth:`note` says so, and the Trainer logs it once.
        reduce: how "rows" sums the embedding gradients to their owners: "auto" (reduce-scatter on the
            backends of :data:`REDUCE_SCATTER_BACKENDS`, else one all-reduce + slice), "all_reduce" or
            "reduce_scatter". Same result either way.

    Raises:
        ValueError: an unknown ``sharding`` or ``reduce``.
    """

    def __init__(self, sharding: str = "auto", reduce: str = "auto") -> None:
        self.sharding = check_sharding(sharding)
        if reduce not in REDUCES:
            raise ValueError(f"reduce must be one of {list(REDUCES)}, got {reduce!r}")
        self.reduce = reduce
        self._summed_criterion = False  # whether the last step left a share of the criterion's gradient per rank

    def sharding_for(self, criterion: Criterion) -> str:
        """The sharding a step with ``criterion`` uses in this process group: "replicate", "rows" or "ring"."""
        if self.sharding == "replicate" or not getattr(criterion, "shardable", False):
            return "replicate"
        if self.sharding == "auto":
            return "rows" if dist.get_world_size() > 1 else "replicate"
        return self.sharding

    def note(self, criterion: Criterion) -> str:
        """One line on the sharding a step with ``criterion`` uses, for the start of a run's log."""
        used = self.sharding_for(criterion)
        if used == "replicate" and not getattr(criterion, "shardable", False):
            asked = (f" (train.loss_sharding: {self.sharding} asked; only RS@k shards)"
                     if self.sharding in ("rows", "ring") else "")
            return (f"replicate: loss {loss_name(criterion)} cannot be sharded: every rank computes the whole "
                    "global-batch loss" + asked)
        return {"replicate": "replicate: every rank computes the whole global-batch loss",
                "rows": "rows: each rank ranks its share of the queries against all references",
                "ring": "ring: each rank ranks its queries against reference blocks passed around the ring"}[used] + (
            " (train.loss_sharding: auto)" if self.sharding == "auto" else "")

    def loss_and_grad(
        self, criterion: Criterion, embeddings: torch.Tensor, labels: torch.Tensor, *,
        scaler: torch.amp.GradScaler | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The loss of the global batch and this rank's rows of its gradient (see the module docstring).

        Args:
            criterion: ``criterion(embeddings, labels) -> scalar``; a shardable one (``MetricLoss.shardable``)
                also ``criterion.sharded_forward(embeddings, labels, shard, shards)``.
            embeddings: (n_r, d) this rank's pass-1 embeddings (float32 or float64; n_r may differ by rank).
            labels: (n_r,) int64.
            scaler: optional GradScaler: G is scaled as ``scaler.scale(loss).backward()`` scales it.

        Returns:
            (the global-batch loss, a detached scalar equal on every rank, G's rows of this rank (n_r, d) in the
            dtype of ``embeddings``).

        Raises:
            ValueError: a criterion that returns no scalar; what the criterion raises (no query with a positive).
        """
        used = self.sharding_for(criterion)
        self._summed_criterion = used != "replicate"
        if used == "ring":
            from recallk.engine.ring import ring_loss_and_grad  # the ring's own module (layer 5)

            scale = float(scaler.get_scale()) if scaler is not None else 1.0
            return ring_loss_and_grad(criterion, embeddings, labels, scale)  # type: ignore[arg-type]
        global_embeddings, sizes = all_gather_rows(embeddings)
        global_labels, _ = all_gather_rows(labels)
        start = sum(sizes[: dist.get_rank()])
        rows = slice(start, start + embeddings.shape[0])
        if used == "replicate":
            loss, grad = loss_and_embedding_grad(criterion, global_embeddings, global_labels, scaler=scaler)
            return loss, grad[rows]
        leaf = global_embeddings.detach().requires_grad_(True)
        share = criterion.sharded_forward(leaf, global_labels, dist.get_rank(), dist.get_world_size())  # type: ignore[attr-defined]
        if not isinstance(share, torch.Tensor) or share.ndim != 0:
            raise ValueError(f"{loss_name(criterion)}.sharded_forward must return a scalar tensor")
        if share.requires_grad:
            (scaler.scale(share) if scaler is not None else share).backward()
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        return self._sum_to_owners(grad, share.detach(), sizes)

    def _sum_to_owners(self, grad: torch.Tensor, share: torch.Tensor,
                       sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum the ranks' (B, d) ``grad`` and scalar ``share``: (the summed loss, this rank's rows of the summed
        gradient); ``sizes``: every rank's number of rows, in rank order."""
        start = sum(sizes[: dist.get_rank()])
        rows = slice(start, start + sizes[dist.get_rank()])
        method = self.reduce
        if method == "auto":
            method = "reduce_scatter" if dist.get_backend() in REDUCE_SCATTER_BACKENDS else "all_reduce"
        if method == "all_reduce":
            flat = torch.cat([grad.reshape(-1), share.reshape(1).to(grad.dtype)])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            return flat[-1].to(share.dtype), flat[:-1].view_as(grad)[rows].clone()
        own = grad.new_empty((sizes[dist.get_rank()], *grad.shape[1:]))
        dist.reduce_scatter(own, [part.contiguous() for part in grad.split(sizes)], op=dist.ReduceOp.SUM)
        loss = share.clone()
        dist.all_reduce(loss, op=dist.ReduceOp.SUM)
        return loss, own

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
        """Sum the model's gradients over the ranks (one flat all-reduce); the criterion's parameters (if any):
        averaged after a replicated loss (every rank holds the whole gradient), summed after a sharded one."""
        all_reduce_gradients(model.parameters(), average=False)
        if isinstance(criterion, nn.Module):
            all_reduce_gradients(criterion.parameters(), average=not self._summed_criterion)
