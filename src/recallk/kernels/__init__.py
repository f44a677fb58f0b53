"""RS@k loss kernels: the blocked torch path (CPU and GPU) and, when installed, the fused Triton kernels.

``rsk_loss_from_similarity`` is the checked entry point; ``backend`` picks the implementation:

- ``"torch"``: :func:`recallk.kernels.torch_rsk.rsk_loss_torch` (any device);
- ``"triton"``: ``recallk.kernels.triton.rsk_loss_triton`` (same signature), imported lazily;
- ``"auto"``: Triton for CUDA tensors when it imports, torch otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from recallk.kernels.torch_rsk import positive_layout, rsk_loss_torch

__all__ = ["BACKENDS", "positive_layout", "resolve_backend", "rsk_loss_from_similarity", "rsk_loss_torch"]

BACKENDS = ("auto", "torch", "triton")


def _load_triton() -> Callable[..., torch.Tensor]:
    try:
        from recallk.kernels.triton import rsk_loss_triton
    except ImportError as err:
        raise ValueError(
            f"backend='triton' needs the Triton RS@k kernel, which could not be imported ({err}): install "
            "triton (pip install 'recallk[triton]') or use backend='torch'"
        ) from err
    return rsk_loss_triton


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
    q, n = sim.shape
    q_labels = v.check_labels(q_labels, q, name="q_labels", against="sim")
    db_labels = v.check_labels(db_labels, n, name="db_labels", against="sim (columns)")
    checked_self = v.check_self_index(self_index, q, n)
    ks_t, tau_rank_f, tau_k_t = v.check_ks_and_taus(ks, tau_rank, tau_k)
    if block_size is not None and (int(block_size) != block_size or block_size < 1):
        raise ValueError(f"block_size must be a positive integer number of query rows or None, got {block_size!r}")
    chosen = resolve_backend(backend, sim.device)
    if checked_self is None:
        checked_self = torch.full((q,), -1, dtype=torch.long, device=sim.device)
    if chosen == "triton":
        # block_size belongs to the torch path; the Triton kernels choose their own tiles.
        return _load_triton()(sim, q_labels, db_labels, checked_self, ks_t, tau_rank_f, tau_k_t, include_query)
    return rsk_loss_torch(
        sim, q_labels, db_labels, checked_self, ks_t, tau_rank_f, tau_k_t, include_query, block_size
    )
