"""The RS@k loss (method.md section 1): its parameters, the positive layout, the backend registry and the two
checked entry points.

For queries ``q`` (rows of the similarity ``s``) against a reference set (columns):

    D(q)      = every column except ``self_index[q]`` (kept when ``include_query``; never a positive)
    P(q)      = {j != self_index[q] : ref_labels[j] == query_labels[q]}
    rank(q,p) = 1 + sum_{z in D(q), z != p} sig((s_qz - s_qp) / tau_rank)
    R^k(q)    = min(sum_{p in P(q)} sig((k - rank(q,p)) / tau_k), k) / min(k, |P(q)|)
    loss      = mean over queries with |P(q)| > 0 of (1 - mean_k R^k(q))

with ``sig(u) = 1 / (1 + exp(-u))`` and ``u`` clamped to [-CLAMP, CLAMP].

A backend is one file holding an object with the :class:`Backend` methods and one ``register_backend(...)`` line;
``recallk.kernels`` imports it. Inputs are checked once, here; backends receive them checked and prepared.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from recallk import checks
from recallk.kernels.dispatch import MATRIX_BUDGET_BYTES, choose_path

__all__ = [
    "CLAMP",
    "MATRIX_BUDGET_BYTES",
    "Backend",
    "Positives",
    "RSkParams",
    "auto_path",
    "backend_names",
    "get_backend",
    "no_autocast",
    "positive_layout",
    "register_backend",
    "resolve_backend",
    "rsk_loss_from_embeddings",
    "rsk_loss_from_similarity",
]

#: Every sigmoid argument is clamped to [-CLAMP, CLAMP] (method.md section 1).
CLAMP = 50.0


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that turns ``torch.autocast`` off for ``device``'s type (a no-op where autocast does not exist).

    The loss is computed in float32 (float64 for float64 input) whatever autocast a user's training loop has
    active: autocast would run its matmuls in bf16/fp16 and hand float32 buffers half tensors.
    """
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class RSkParams:
    """The hyper-parameters of RS@k, checked once when built.

    Args:
        ks: the k values, positive integers (paper: (1, 2, 4, 8, 16)); stored as a tuple of ints.
        tau_rank: temperature of the rank sigmoids, positive and finite (paper: 0.01).
        tau_k: temperature of the k sigmoids: one number or one per k (paper: 1.0); stored as one float per k.
        include_query: count the query's own column (``self_index[q]``) when ranking its positives, as the
            authors' code does (shifts every rank by about +1); it is never a positive. This is NOT
            pytorch-metric-learning's ``ref_includes_query``, which says that the reference set contains the
            queries: here ``self_index`` says that.

    Raises:
        ValueError: ks not positive integers, a temperature not positive and finite, or tau_k of the wrong length.
    """

    ks: tuple[int, ...] = (1, 2, 4, 8, 16)
    tau_rank: float = 0.01
    tau_k: tuple[float, ...] = (1.0,)
    include_query: bool = False

    def __post_init__(self) -> None:
        ks, tau_rank, tau_k = checks.check_ks_and_taus(self.ks, self.tau_rank, self.tau_k)
        for name, value in zip(("ks", "tau_rank", "tau_k", "include_query"),
                               (ks, tau_rank, tau_k, bool(self.include_query))):  # fmt: skip
            object.__setattr__(self, name, value)


class Positives(NamedTuple):
    """Each query's positive columns: ``columns`` (Q, Pmax) int64, ascending in ``columns[q, :counts[q]]``, 0 in
    the padding; ``counts`` (Q,) int64 = |P(q)|; ``self_index`` (Q,) int64, -1 where the query is no column."""

    columns: torch.Tensor
    counts: torch.Tensor
    self_index: torch.Tensor

    def padded(self) -> torch.Tensor:
        """``columns`` as a contiguous (Q, Pmax) int32 tensor with -1 in the padding (the Triton kernels' form)."""
        padding = torch.arange(self.columns.shape[1], device=self.columns.device) >= self.counts[:, None]
        return self.columns.masked_fill(padding, -1).to(torch.int32).contiguous()


def positive_layout(
    query_labels: torch.Tensor, ref_labels: torch.Tensor, self_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of each query's positives, padded to a rectangle.

    Args:
        query_labels: (Q,) int64 labels of the queries. ref_labels: (N,) int64 labels of the reference columns.
        self_index: (Q,) int64 column of each query in the reference set, or -1.

    Returns:
        ``(columns, counts)`` as in :class:`Positives`; ``Pmax = max(counts)`` (possibly 0). Cost
        O(N log N + Q * max class size); no (Q, N) tensor is built.
    """
    device = query_labels.device
    n, q = ref_labels.numel(), query_labels.numel()
    empty = (torch.zeros(q, 0, dtype=torch.long, device=device), torch.zeros(q, dtype=torch.long, device=device))
    if n == 0 or q == 0:
        return empty
    sorted_labels, order = torch.sort(ref_labels, stable=True)
    lo = torch.searchsorted(sorted_labels, query_labels, side="left")
    hi = torch.searchsorted(sorted_labels, query_labels, side="right")
    width = int((hi - lo).max().item())
    if width == 0:
        return empty
    slots = lo[:, None] + torch.arange(width, device=device)
    valid = slots < hi[:, None]
    cols = order[slots.clamp_(max=n - 1)]
    valid &= cols != self_index[:, None]
    counts = valid.sum(1)
    # Move the valid slots to the front of each row (at most one hole per row: the query itself).
    key = torch.where(valid, torch.arange(width, device=device), width)
    cols = cols.gather(1, torch.sort(key, dim=1, stable=True).indices)
    pmax = int(counts.max().item())
    padding = torch.arange(pmax, device=device) >= counts[:, None]
    return cols[:, :pmax].masked_fill_(padding, 0).contiguous(), counts


class Backend(Protocol):
    """An implementation of RS@k; register an instance with :func:`register_backend`.

    ``name`` is its ``backend=`` value; ``backend="auto"`` picks among the usable backends
    (``available(device, auto=True)``) by the measured rule of :mod:`recallk.kernels.dispatch`. ``dtypes`` lists
    the input dtypes it takes; ``requirement`` says what it needs to run (for the error when it cannot). The two
    loss methods get checked inputs on one device and return a scalar loss differentiable w.r.t. the similarity
    or embeddings.
    """

    name: str
    dtypes: tuple[torch.dtype, ...]
    requirement: str

    def available(self, device: torch.device, auto: bool = False) -> bool: ...

    def from_similarity(
        self, sim: torch.Tensor, positives: Positives, params: RSkParams, block_size: int | None
    ) -> torch.Tensor: ...

    def from_embeddings(
        self, query_emb: torch.Tensor, ref_emb: torch.Tensor, positives: Positives, params: RSkParams,
        block_size: int | None,
    ) -> torch.Tensor: ...  # fmt: skip


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Make ``backend`` available as ``backend=backend.name``; returns it. Raises ValueError on a taken name."""
    if backend.name == "auto" or backend.name in _BACKENDS:
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    _BACKENDS[backend.name] = backend
    return backend


def backend_names() -> tuple[str, ...]:
    """Every ``backend=`` value: "auto" and the registered backends."""
    return ("auto", *_BACKENDS)


def auto_path(
    device: torch.device, rows: int, cols: int, backend: str = "auto", memory: str = "auto",
    budget_bytes: int = MATRIX_BUDGET_BYTES, dim: int | None = None,
) -> tuple[str, str]:  # fmt: skip
    """:func:`recallk.kernels.dispatch.choose_path` with what is usable on ``device``: ``(backend, memory)``."""
    triton = "triton" in _BACKENDS and _BACKENDS["triton"].available(device, auto=True)
    return choose_path(device, rows, cols, backend, memory, triton, budget_bytes, dim)


def resolve_backend(backend: str, device: torch.device, memory: str = "matrix") -> str:
    """Map ``"auto"`` to the fastest measured backend for ``device`` and the ``memory`` path ("matrix": from a
    similarity matrix, "recompute": from embeddings; :mod:`recallk.kernels.dispatch`); check the name."""
    if backend == "auto":
        return auto_path(device, 1, 1, "auto", memory)[0]
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {backend_names()}, got {backend!r}")
    return backend


def get_backend(
    backend: str | Backend, x: torch.Tensor | None = None, name: str = "input", memory: str = "matrix"
) -> Backend:
    """The backend object of a name or instance, resolved for ``x``'s device (CPU when None).

    Raises:
        ValueError: unknown name, or (with ``x``) a backend that cannot run on ``x``'s device or dtype.
    """
    device = torch.device("cpu") if x is None else x.device
    impl = backend if not isinstance(backend, str) else _BACKENDS[resolve_backend(backend, device, memory)]
    if x is not None and not impl.available(device):
        raise ValueError(
            f"backend={impl.name!r} cannot run on {device}: it needs {impl.requirement}; or use backend='torch'"
        )
    if x is not None and x.dtype not in impl.dtypes:
        raise ValueError(
            f"{name} is {x.dtype}, which backend={impl.name!r} does not take ({', '.join(map(str, impl.dtypes))}): "
            "convert it with .float() or use backend='torch' (which also takes float64)"
        )
    return impl


def _positives(
    shape: tuple[int, int], device: torch.device, query_labels: object, ref_labels: object, self_index: object,
    block_size: object, sources: tuple[str, str],
) -> Positives:  # fmt: skip
    """Check the labels, ``self_index`` and ``block_size`` for Q queries against N references (``shape``);
    ``sources`` names where Q and N come from, for the messages. Raises ValueError when no query has a positive."""
    q, n = shape
    query_labels = checks.check_labels(query_labels, q, name="query_labels", against=sources[0]).to(device)
    ref_labels = checks.check_labels(ref_labels, n, name="ref_labels", against=sources[1]).to(device)
    self_index = checks.check_self_index(self_index, q, n)
    checks.check_optional_positive_int(block_size, "block_size", "query rows")
    self_index = torch.full((q,), -1, dtype=torch.long, device=device) if self_index is None else self_index.to(device)
    columns, counts = positive_layout(query_labels, ref_labels, self_index)
    checks.check_has_positive(counts, query_labels, ref_labels, self_index)
    return Positives(columns, counts, self_index)


def rsk_loss_from_similarity(
    sim: torch.Tensor,
    query_labels: torch.Tensor,
    ref_labels: torch.Tensor,
    params: RSkParams,
    *,
    self_index: torch.Tensor | None = None,
    backend: str | Backend = "auto",
    block_size: int | None = None,
) -> torch.Tensor:
    """RS@k loss of queries (rows of ``sim``) against a reference set (columns).

    Args:
        sim: (Q, N) similarities, float16/bfloat16/float32/float64 (half inputs are computed in float32,
            float64 in float64; the Triton backend takes no float64), with |s| / tau_rank below a quarter of
            the compute dtype's maximum (``checks.check_similarity``).
            Differentiable. Any active ``torch.autocast`` is turned off inside (see :func:`no_autocast`).
        query_labels: (Q,) integer labels of the queries. ref_labels: (N,) integer labels of the references.
        params: the hyper-parameters (:class:`RSkParams`).
        self_index: (Q,) integer column of query q in the reference set, or -1 when absent; None = all -1.
            The self column is never a positive; it is left out of the ranking unless ``params.include_query``.
        backend: a registered name (see :func:`backend_names`; "auto": the fastest measured backend for the
            device, :mod:`recallk.kernels.dispatch`) or a :class:`Backend` object.
        block_size: query rows per block of the torch backend (None: automatic; ignored by Triton).

    Returns:
        Scalar loss tensor: mean over queries with at least one positive of 1 - mean_k R^k(q); float32
        (float64 for float64 input on the torch backend).

    Raises:
        ValueError: NaN/Inf in ``sim``, wrong shapes or dtypes, an unknown or unavailable backend, a bad
            ``block_size``, or no query with a positive.
    """
    sim = checks.check_similarity(sim, scale=1.0 / params.tau_rank)
    impl = get_backend(backend, sim, "sim")
    positives = _positives(sim.shape, sim.device, query_labels, ref_labels, self_index, block_size,
                           ("sim", "sim (columns)"))  # fmt: skip
    with no_autocast(sim.device):
        return impl.from_similarity(sim, positives, params, block_size)


def rsk_loss_from_embeddings(
    query_emb: torch.Tensor,
    ref_emb: torch.Tensor,
    query_labels: torch.Tensor,
    ref_labels: torch.Tensor,
    params: RSkParams,
    *,
    self_index: torch.Tensor | None = None,
    backend: str | Backend = "auto",
    block_size: int | None = None,
) -> torch.Tensor:
    """RS@k loss of ``query_emb @ ref_emb^T`` without storing that (Q, N) matrix or its gradient.

    The torch backend computes the similarity rows of one block of queries at a time; the Triton backends
    recompute similarity tiles inside their kernels (``"triton"``: exact float32 ``tl.dot``; ``"triton_fused"``:
    three-pass TF32 on tensor cores, float32-level accuracy). Use it when the batch similarity
    does not fit (B = 65,536 is 16 GiB in float32); below that, :func:`rsk_loss_from_similarity` on
    ``query_emb @ ref_emb^T`` gives the same loss.

    Args:
        query_emb: (Q, d) query embeddings; ref_emb: (N, d) reference embeddings, floating, one dtype and device.
            Pass the same tensor twice for a batch against itself (with ``self_index = arange(B)``).
        query_labels, ref_labels, params, self_index, backend, block_size: as in
            :func:`rsk_loss_from_similarity`.

    Returns:
        Scalar loss tensor (float32, float64 for float64 input on the torch backend), differentiable w.r.t. both
        embedding tensors.

    Raises:
        ValueError: NaN/Inf, wrong shapes or dtypes, different widths, dtypes or devices, an unknown or
            unavailable backend, a bad ``block_size``, or no query with a positive.
    """
    query_emb, ref_emb = checks.check_embedding_pair(query_emb, ref_emb)
    impl = get_backend(backend, query_emb, "query_emb", memory="recompute")
    positives = _positives((query_emb.shape[0], ref_emb.shape[0]), query_emb.device, query_labels, ref_labels,
                           self_index, block_size, ("query_emb", "ref_emb"))  # fmt: skip
    with no_autocast(query_emb.device):
        return impl.from_embeddings(query_emb, ref_emb, positives, params, block_size)

