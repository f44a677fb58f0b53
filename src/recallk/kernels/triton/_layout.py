"""Host-side pieces shared by both Triton paths: input checks, the padded positive layout, the R^k epilogue.

Everything here is O(Q * Pmax) or O(N log N); nothing builds a (Q, N) tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["CLAMP", "check_common", "loss_from_rank", "positive_columns"]

#: Arguments of every sigmoid are clamped to [-CLAMP, CLAMP] (method.md section 1).
CLAMP = 50.0

_NO_POSITIVE = (
    "no query has a positive (another database item with its label, itself excluded): each class needs at least "
    "2 items in the batch: use recallk.data.ClassBalancedBatchSampler"
)


def check_common(
    q: int,
    n: int,
    device: torch.device,
    q_labels: object,
    db_labels: object,
    self_index: object,
    ks: Sequence[int],
    tau_rank: float,
    tau_k: float | Sequence[float] | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...], float, torch.Tensor]:
    """Validate labels, self index and hyper-parameters for Q queries against N database items.

    The checks are those of :mod:`recallk.losses.validation` (shared with the torch path), except that
    ``self_index`` is required here. Returns ``(q_labels, db_labels, self_index, ks, tau_rank, tau_k)`` with the
    tensors int64 on ``device`` and ``tau_k`` a (len(ks),) float32 tensor on ``device``. Raises ``ValueError`` on
    any inconsistency.
    """
    from recallk.losses import validation as v  # lazy: recallk.losses imports recallk.kernels

    if q == 0 or n == 0:
        raise ValueError(f"empty input: {q} queries against {n} database items; pass at least 2 items of a class")
    ql = v.check_labels(q_labels, q, name="q_labels", against="the queries").to(device)
    dl = v.check_labels(db_labels, n, name="db_labels", against="the database").to(device)
    if self_index is None:
        raise ValueError("self_index must be a (Q,) integer tensor, -1 where the query is not in the database")
    si = v.check_self_index(self_index, q, n).to(device)
    ks_t, tau_rank, taus = v.check_ks_and_taus(ks, tau_rank, tau_k)
    return ql, dl, si, ks_t, tau_rank, torch.tensor(taus, dtype=torch.float32, device=device)


def positive_columns(
    q_labels: torch.Tensor, db_labels: torch.Tensor, self_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of each query's positives P(q), ascending, padded with -1.

    Args:
        q_labels: (Q,) int64; db_labels: (N,) int64; self_index: (Q,) int64, -1 when the query is not a column.

    Returns:
        ``(pos, counts)``: ``pos`` (Q, Pmax) int32 contiguous, ``pos[q, :counts[q]]`` = P(q), -1 after;
        ``counts`` (Q,) int64 = |P(q)|. Raises ``ValueError`` when no query has a positive.
    """
    n = db_labels.numel()
    sorted_labels, order = torch.sort(db_labels, stable=True)
    lo = torch.searchsorted(sorted_labels, q_labels, side="left")
    hi = torch.searchsorted(sorted_labels, q_labels, side="right")
    width = int((hi - lo).max())
    if width == 0:
        raise ValueError(_NO_POSITIVE)
    slot = torch.arange(width, device=q_labels.device)
    cols = order[(lo[:, None] + slot).clamp_(max=n - 1)]
    valid = (slot < (hi - lo)[:, None]) & (cols != self_index[:, None])
    # Stable sort on "invalid" moves the valid slots to the front, keeping their ascending order.
    perm = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    cols, valid = cols.gather(1, perm), valid.gather(1, perm)
    counts = valid.sum(1)
    pmax = int(counts.max())
    if pmax == 0:
        raise ValueError(_NO_POSITIVE)
    pos = torch.where(valid[:, :pmax], cols[:, :pmax], -1)
    return pos.to(torch.int32).contiguous(), counts


def loss_from_rank(
    rank: torch.Tensor, pos: torch.Tensor, counts: torch.Tensor, ks: tuple[int, ...], tau_k: torch.Tensor
) -> torch.Tensor:
    """The R^k epilogue: loss = mean over queries with a positive of (1 - mean_k R^k(q)).

    Args:
        rank: (Q, Pmax) float32 rank(q, p) in the layout of ``pos`` (padding entries are ignored).
        pos: (Q, Pmax) int32 positive columns, -1 for padding; counts: (Q,) int64 |P(q)|.
        ks: the k values; tau_k: (len(ks),) float32 temperatures, one per k.

    Returns a float32 scalar, differentiable w.r.t. ``rank`` (padding gets a zero gradient).
    """
    valid = pos >= 0
    n_pos = counts.to(rank.dtype)
    recall = torch.zeros(rank.shape[0], dtype=rank.dtype, device=rank.device)
    for i, k in enumerate(ks):
        u = ((k - rank) / tau_k[i]).clamp(-CLAMP, CLAMP)
        soft_hits = torch.where(valid, torch.sigmoid(u), 0.0).sum(1)
        recall = recall + soft_hits.clamp(max=float(k)) / n_pos.clamp(max=float(k)).clamp(min=1.0)
    has_pos = counts > 0
    return (1.0 - recall[has_pos] / len(ks)).mean()
