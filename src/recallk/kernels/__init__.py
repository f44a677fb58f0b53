"""RS@k loss kernels: the blocked torch path (CPU and GPU) and, when installed, the fused Triton kernels.

``rsk_loss_from_similarity`` (from a (Q, N) similarity matrix) and ``rsk_loss_from_embeddings`` (from the
embeddings, never storing that matrix) are the checked entry points; ``backend`` picks the implementation:

- ``"torch"``: :mod:`recallk.kernels.torch_rsk` (any device);
- ``"triton"``: :mod:`recallk.kernels.triton` (CUDA), imported lazily;
- ``"auto"``: Triton for CUDA tensors when it imports, torch otherwise.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import torch

from recallk.kernels.torch_rsk import positive_layout, rsk_loss_torch, rsk_loss_torch_from_embeddings

__all__ = [
    "BACKENDS",
    "positive_layout",
    "resolve_backend",
    "rsk_loss_from_embeddings",
    "rsk_loss_from_similarity",
    "rsk_loss_torch",
    "rsk_loss_torch_from_embeddings",
]

BACKENDS = ("auto", "torch", "triton")


def _load_triton(name: str = "rsk_loss_triton") -> Callable[..., torch.Tensor]:
    try:
        module = importlib.import_module("recallk.kernels.triton")
        return getattr(module, name)
    except ImportError as err:
        raise ValueError(
            f"backend='triton' needs the Triton RS@k kernel, which could not be imported ({err}): install "
            "triton (pip install 'recallk[triton]') or use backend='torch'"
        ) from err


def _triton_importable() -> bool:
    try:
        _load_triton()
    except ValueError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to ``"triton"`` (CUDA tensor and Triton importable) or ``"torch"``; check the name."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_importable() else "torch"
    return backend


def _check_arguments(
    shape: tuple[int, int],
    device: torch.device,
    q_labels: object,
    db_labels: object,
    self_index: object,
    ks: Sequence[int],
    tau_rank: float,
    tau_k: float | Sequence[float] | torch.Tensor,
    block_size: int | None,
    sources: tuple[str, str],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...], float, tuple[float, ...]]:
    """Checks shared by both entry points for Q queries against N items (``shape`` = (Q, N)); ``sources`` names
    where Q and N come from, for the messages. Returns labels, self index (-1 filled), ks and temperatures."""
    from recallk.losses import validation as v  # lazy: recallk.losses imports this package

    q, n = shape
    q_labels = v.check_labels(q_labels, q, name="q_labels", against=sources[0])
    db_labels = v.check_labels(db_labels, n, name="db_labels", against=sources[1])
    checked_self = v.check_self_index(self_index, q, n)
    ks_t, tau_rank_f, tau_k_t = v.check_ks_and_taus(ks, tau_rank, tau_k)
    if block_size is not None and (int(block_size) != block_size or block_size < 1):
        raise ValueError(f"block_size must be a positive integer number of query rows or None, got {block_size!r}")
    if checked_self is None:
        checked_self = torch.full((q,), -1, dtype=torch.long, device=device)
    return q_labels, db_labels, checked_self, ks_t, tau_rank_f, tau_k_t


def rsk_loss_from_similarity(
    sim: torch.Tensor,
    q_labels: torch.Tensor,
    db_labels: torch.Tensor,
    self_index: torch.Tensor | None,
    ks: Sequence[int],
    tau_rank: float,
    tau_k: float | Sequence[float] | torch.Tensor,
    include_query: bool,
    backend: str = "torch",
    block_size: int | None = None,
) -> torch.Tensor:
    """RS@k loss (method.md section 1) of queries (rows of ``sim``) against a database (columns).

    Args:
        sim: (Q, N) similarities, float16/bfloat16/float32/float64 (half inputs are computed in float32,
            float64 in float64). Differentiable.
        q_labels: (Q,) integer labels of the queries. db_labels: (N,) integer labels of the database.
        self_index: (Q,) integer column of query q in the database, or -1 when absent; None = all -1.
            The self column is never a positive; it is left out of the ranking unless ``include_query``.
        ks: the k values, e.g. (1, 2, 4, 8, 16).
        tau_rank: temperature of the rank sigmoids (0.01 in the paper).
        tau_k: temperature of the k sigmoids: one number or one per k (1.0 in the paper).
        include_query: count the query's own column when ranking its positives (the authors' code).
        backend: "torch", "triton" or "auto" (Triton for CUDA tensors when importable).
        block_size: query rows per block of the torch path (None: automatic; ignored by Triton).

    Returns:
        Scalar loss tensor: mean over queries with at least one positive of 1 - mean_k R^k(q); float32
        (float64 for float64 input).

    Raises:
        ValueError: NaN/Inf in ``sim``, wrong shapes or dtypes, bad ks/temperatures, an unknown or unavailable
            backend, or no query with a positive.
    """
    from recallk.losses import validation as v  # lazy: recallk.losses imports this package

    sim = v.check_similarity(sim)
    q_labels, db_labels, checked_self, ks_t, tau_rank_f, tau_k_t = _check_arguments(
        sim.shape, sim.device, q_labels, db_labels, self_index, ks, tau_rank, tau_k, block_size,
        ("sim", "sim (columns)"),
    )
    if resolve_backend(backend, sim.device) == "triton":
        # block_size belongs to the torch path; the Triton kernels choose their own tiles.
        return _load_triton()(sim, q_labels, db_labels, checked_self, ks_t, tau_rank_f, tau_k_t, include_query)
    return rsk_loss_torch(
        sim, q_labels, db_labels, checked_self, ks_t, tau_rank_f, tau_k_t, include_query, block_size
    )


def rsk_loss_from_embeddings(
    q_emb: torch.Tensor,
    db_emb: torch.Tensor,
    q_labels: torch.Tensor,
    db_labels: torch.Tensor,
    self_index: torch.Tensor | None,
    ks: Sequence[int],
    tau_rank: float,
    tau_k: float | Sequence[float] | torch.Tensor,
    include_query: bool,
    backend: str = "torch",
    block_size: int | None = None,
) -> torch.Tensor:
    """RS@k loss of ``q_emb @ db_emb^T`` without storing that (Q, N) matrix or its gradient.

    The torch path computes the similarity rows of one block of queries at a time; the Triton path recomputes
    similarity tiles inside its kernels (exact float32 ``tl.dot``). Use it when the batch similarity does not fit
    (B = 65,536 is 16 GiB in float32); below that, :func:`rsk_loss_from_similarity` on ``q_emb @ db_emb^T`` gives
    the same loss.

    Args:
        q_emb: (Q, d) query embeddings; db_emb: (N, d) database embeddings, floating, on one device. Pass the
            same tensor twice for a batch against itself (with ``self_index = arange(B)``).
        q_labels, db_labels, self_index, ks, tau_rank, tau_k, include_query, backend, block_size: as in
            :func:`rsk_loss_from_similarity` (the Triton kernels take float16/bfloat16/float32 only).

    Returns:
        Scalar loss tensor (float32, float64 for float64 input on the torch path), differentiable w.r.t. both
        embedding tensors.

    Raises:
        ValueError: NaN/Inf, wrong shapes or dtypes, different widths or devices, bad ks/temperatures, an
            unknown or unavailable backend, or no query with a positive.
    """
    from recallk.losses import validation as v  # lazy: recallk.losses imports this package

    q_emb = v.check_embeddings(q_emb, name="q_emb")
    db_emb = q_emb if db_emb is q_emb else v.check_embeddings(db_emb, name="db_emb")
    if q_emb.shape[1] != db_emb.shape[1]:
        raise ValueError(
            f"q_emb has {q_emb.shape[1]} dimensions but db_emb has {db_emb.shape[1]}: embed both with one model"
        )
    if q_emb.device != db_emb.device or q_emb.dtype != db_emb.dtype:
        raise ValueError(
            f"q_emb ({q_emb.dtype}, {q_emb.device}) and db_emb ({db_emb.dtype}, {db_emb.device}) must share dtype "
            "and device: convert one with .to(other)"
        )
    q_labels, db_labels, checked_self, ks_t, tau_rank_f, tau_k_t = _check_arguments(
        (q_emb.shape[0], db_emb.shape[0]), q_emb.device, q_labels, db_labels, self_index, ks, tau_rank, tau_k,
        block_size, ("q_emb", "db_emb"),
    )
    if resolve_backend(backend, q_emb.device) == "triton":
        return _load_triton("rsk_loss_triton_from_embeddings")(
            q_emb, db_emb, q_labels, db_labels, checked_self, ks_t, tau_rank_f, tau_k_t, include_query
        )
    return rsk_loss_torch_from_embeddings(
        q_emb, db_emb, q_labels, db_labels, checked_self, ks_t, tau_rank_f, tau_k_t, include_query, block_size
    )
