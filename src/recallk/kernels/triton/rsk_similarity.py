"""Triton kernels for RS@k from a similarity matrix: ranks in a fused forward/backward pair (maths:
:mod:`recallk.kernels.rsk`; the R^k epilogue and the backend object: :mod:`recallk.kernels.triton`).

Layout of the work. The host lists each query's positive columns in a padded (Q, Pmax) table. The forward
kernel runs one program per (query, block of positives): it streams the query's similarity row in tiles once and
accumulates, for all its positives at the same time, ``rank(q, p)`` and ``dsum(q, p) = sum_z sig'(u_qpz)``. A
small torch epilogue turns ranks into R^k and the loss, so autograd gives ``g = dL/drank`` (Q, Pmax). The
backward kernel runs one program per (query, column tile), recomputes the sigmoids and writes

    dL/ds_qz = (sum_p g_qp sig'(u_qpz) [z in D(q), z != p]  -  sum_p [z == p] g_qp dsum(q, p)) / tau_rank

in one pass: every element of the gradient is written exactly once, nothing is accumulated into it. The
(Q, |P|, N) tensor is never formed; extra memory is the (Q, N) gradient plus O(Q * Pmax).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from recallk.kernels.rsk import CLAMP

__all__ = ["rank_from_similarity", "similarity_rank_backward", "similarity_rank_forward"]

_CLAMP = tl.constexpr(CLAMP)


@triton.jit
def _rank_fwd_kernel(
    sim_ptr, stride_sq, stride_sn, pos_ptr, self_ptr, rank_ptr, dsum_ptr,
    N, P, inv_tau,
    INCLUDE_QUERY: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    q = tl.program_id(0).to(tl.int64)
    p_offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_in = p_offs < P
    cols_p = tl.load(pos_ptr + q * P + p_offs, mask=p_in, other=-1)
    p_valid = cols_p >= 0
    row = sim_ptr + q * stride_sq
    s_p = tl.load(row + cols_p.to(tl.int64) * stride_sn, mask=p_valid, other=0.0).to(tl.float32)
    self_col = tl.load(self_ptr + q)
    acc_rank = tl.zeros((BLOCK_P,), dtype=tl.float32)
    acc_dsum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        z = n0 + tl.arange(0, BLOCK_N)
        z_in = z < N
        s_z = tl.load(row + z.to(tl.int64) * stride_sn, mask=z_in, other=0.0).to(tl.float32)
        keep = z_in
        if not INCLUDE_QUERY:
            keep = keep & (z != self_col)
        m = keep[None, :] & (z[None, :] != cols_p[:, None]) & p_valid[:, None]
        u = (s_z[None, :] - s_p[:, None]) * inv_tau
        sg = 1.0 / (1.0 + tl.exp(-tl.minimum(tl.maximum(u, -_CLAMP), _CLAMP)))
        acc_rank += tl.sum(tl.where(m, sg, 0.0), axis=1)
        acc_dsum += tl.sum(tl.where(m & (tl.abs(u) <= _CLAMP), sg * (1.0 - sg), 0.0), axis=1)
    tl.store(rank_ptr + q * P + p_offs, tl.where(p_valid, 1.0 + acc_rank, 0.0), mask=p_in)
    tl.store(dsum_ptr + q * P + p_offs, tl.where(p_valid, acc_dsum, 0.0), mask=p_in)


@triton.jit
def _rank_bwd_kernel(
    sim_ptr, stride_sq, stride_sn, pos_ptr, self_ptr, grank_ptr, dsum_ptr, out_ptr, stride_oq, stride_on,
    N, P, inv_tau,
    INCLUDE_QUERY: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    q = tl.program_id(0).to(tl.int64)
    z = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    z_in = z < N
    row = sim_ptr + q * stride_sq
    s_z = tl.load(row + z.to(tl.int64) * stride_sn, mask=z_in, other=0.0).to(tl.float32)
    keep = z_in
    if not INCLUDE_QUERY:
        keep = keep & (z != tl.load(self_ptr + q))
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p_offs = p0 + tl.arange(0, BLOCK_P)
        p_in = p_offs < P
        cols_p = tl.load(pos_ptr + q * P + p_offs, mask=p_in, other=-1)
        p_valid = cols_p >= 0
        s_p = tl.load(row + cols_p.to(tl.int64) * stride_sn, mask=p_valid, other=0.0).to(tl.float32)
        g = tl.load(grank_ptr + q * P + p_offs, mask=p_valid, other=0.0)
        dsum = tl.load(dsum_ptr + q * P + p_offs, mask=p_valid, other=0.0)
        m = keep[None, :] & (z[None, :] != cols_p[:, None]) & p_valid[:, None]
        u = (s_z[None, :] - s_p[:, None]) * inv_tau
        sg = 1.0 / (1.0 + tl.exp(-tl.minimum(tl.maximum(u, -_CLAMP), _CLAMP)))
        dsg = tl.where(m & (tl.abs(u) <= _CLAMP), sg * (1.0 - sg), 0.0)
        acc += tl.sum(g[:, None] * dsg, axis=0)
        hit = (z[None, :] == cols_p[:, None]) & p_valid[:, None]
        acc -= tl.sum(tl.where(hit, (g * dsum)[:, None], 0.0), axis=0)
    out = (acc * inv_tau).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + q * stride_oq + z.to(tl.int64) * stride_on, out, mask=z_in)


def _blocks(pmax: int, n: int, block_p: int | None, block_n: int | None) -> tuple[int, int]:
    """Default tile sizes: all positives of a query in one program (up to 64), ~4096-element sigmoid tiles."""
    bp = block_p or max(2, triton.next_power_of_2(min(pmax, 64)))
    bn = block_n or max(16, min(1024, 4096 // bp, triton.next_power_of_2(n)))
    return bp, bn


def similarity_rank_forward(
    sim: torch.Tensor,
    pos: torch.Tensor,
    self_index: torch.Tensor,
    tau_rank: float,
    include_query: bool,
    *,
    out_rank: torch.Tensor | None = None,
    out_dsum: torch.Tensor | None = None,
    block_p: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward kernel: ``rank(q, p)`` and ``dsum(q, p) = sum_z sig'(u_qpz)`` for every padded positive slot.

    Args:
        sim: (Q, N) float16/bfloat16/float32, any strides. pos: (Q, Pmax) int32 contiguous, -1 = padding.
        self_index: (Q,) int64 (-1 = none). out_rank / out_dsum: optional (Q, Pmax) float32 contiguous buffers,
        every element of which is overwritten (padding slots get 0). block_p / block_n: tile sizes (powers of 2).

    Returns ``(rank, dsum)``, both (Q, Pmax) float32.
    """
    q, n = sim.shape
    pmax = pos.shape[1]
    rank = torch.empty(q, pmax, dtype=torch.float32, device=sim.device) if out_rank is None else out_rank
    dsum = torch.empty_like(rank) if out_dsum is None else out_dsum
    bp, bn = _blocks(pmax, n, block_p, block_n)
    grid = (q, triton.cdiv(pmax, bp))
    _rank_fwd_kernel[grid](
        sim, sim.stride(0), sim.stride(1), pos, self_index, rank, dsum, n, pmax, 1.0 / tau_rank,
        INCLUDE_QUERY=include_query, BLOCK_P=bp, BLOCK_N=bn,
    )  # fmt: skip
    return rank, dsum


def similarity_rank_backward(
    sim: torch.Tensor,
    pos: torch.Tensor,
    self_index: torch.Tensor,
    grad_rank: torch.Tensor,
    dsum: torch.Tensor,
    tau_rank: float,
    include_query: bool,
    *,
    out: torch.Tensor | None = None,
    block_p: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Backward kernel: ``dL/dsim`` (Q, N) in ``sim``'s dtype from ``grad_rank = dL/drank`` (Q, Pmax) float32.

    ``out`` (optional, (Q, N), ``sim``'s dtype, any strides) has every element overwritten.
    """
    q, n = sim.shape
    pmax = pos.shape[1]
    grad = torch.empty(q, n, dtype=sim.dtype, device=sim.device) if out is None else out
    bp, bn = _blocks(pmax, n, block_p, block_n)
    grid = (q, triton.cdiv(n, bn))
    _rank_bwd_kernel[grid](
        sim, sim.stride(0), sim.stride(1), pos, self_index, grad_rank.float().contiguous(), dsum,
        grad, grad.stride(0), grad.stride(1), n, pmax, 1.0 / tau_rank,
        INCLUDE_QUERY=include_query, BLOCK_P=bp, BLOCK_N=bn,
    )  # fmt: skip
    return grad


class _RankFromSimilarity(torch.autograd.Function):
    """sim (Q, N) -> rank (Q, Pmax) float32; both directions are Triton kernels, sigmoids recomputed."""

    @staticmethod
    def forward(ctx, sim, pos, self_index, tau_rank, include_query):  # type: ignore[override]
        rank, dsum = similarity_rank_forward(sim, pos, self_index, tau_rank, include_query)
        ctx.save_for_backward(sim, pos, self_index, dsum)
        ctx.tau_rank, ctx.include_query = tau_rank, include_query
        return rank

    @staticmethod
    def backward(ctx, grad_rank):  # type: ignore[override]
        sim, pos, self_index, dsum = ctx.saved_tensors
        grad = similarity_rank_backward(sim, pos, self_index, grad_rank, dsum, ctx.tau_rank, ctx.include_query)
        return grad, None, None, None, None


def rank_from_similarity(
    sim: torch.Tensor, pos: torch.Tensor, self_index: torch.Tensor, tau_rank: float, include_query: bool
) -> torch.Tensor:
    """rank (Q, Pmax) float32 of ``sim`` (Q, N) fp16/bf16/fp32 for the positives ``pos`` (Q, Pmax) int32 (-1 pads),
    differentiable w.r.t. ``sim``; ``self_index`` (Q,) int64 contiguous."""
    return _RankFromSimilarity.apply(sim, pos, self_index, tau_rank, include_query)
