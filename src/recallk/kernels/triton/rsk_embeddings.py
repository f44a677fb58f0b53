"""Triton kernels for RS@k straight from embeddings: similarity tiles are recomputed inside them, never stored.

For batches whose (Q, N) similarity matrix does not fit (B = 65,536 is 16 GiB in float32), the kernels take
``query_emb`` (Q, d) and ``ref_emb`` (N, d) and form each (BLOCK_Q, BLOCK_N) tile ``s = query_emb[rows] @
ref_emb[cols]^T`` on the fly with ``tl.dot`` (as FlashAttention does for attention scores).

Three kernels, each recomputing the tile and its sigmoids:

* forward, grid (query blocks, positive blocks): ``rank(q, p)`` and ``dsum(q, p) = sum_z sig'(u_qpz)``;
* dq, grid (query blocks,): ``dq = H @ ref_emb`` accumulated over column tiles;
* dref, grid (column blocks,): ``dref = H^T @ query_emb`` accumulated over query tiles;

where ``H[q, z] = sum_p g_qp sig'(u_qpz) [z in D(q), z != p] / tau_rank`` is the dense part of dL/ds. Every
kernel works on 2-D (BLOCK_Q, BLOCK_N) tiles and loops over the positive slots, one at a time. The
sparse part, ``dL/ds_qp = -g_qp dsum(q, p) / tau_rank`` on the (q, p) positive pairs, is applied on the host in
O(Q * Pmax * d). The positive similarities ``s_qp`` (Q, Pmax) are computed on the host in chunks.
Extra memory: O((Q + N) * d + Q * Pmax); the kernels' outputs are fresh buffers written exactly once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from recallk.kernels.rsk import CLAMP
from recallk.kernels.triton.rsk_fused import _add_positive_pair_terms, positive_similarities

# The host-side helpers (positive similarities, positive-pair gradient terms) are shared with ``rsk_fused``:
# elementwise float32 products, so that torch's TF32 matmul flags cannot round them.

__all__ = ["PRECISIONS", "embedding_rank_backward", "embedding_rank_forward", "rank_from_embeddings"]

#: ``tl.dot`` input precisions of the similarity tiles: "ieee" (exact float32), "tf32x3", "tf32"
PRECISIONS = ("ieee", "tf32", "tf32x3")
_CLAMP = tl.constexpr(CLAMP)


@triton.jit
def _sim_tile(
    qe_ptr, re_ptr, qi, q_in, z, z_in, D, stride_qe, stride_re,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """s[i, j] = <query_emb[qi[i]], ref_emb[z[j]]> in float32, (BLOCK_Q, BLOCK_N); zero outside the masks."""
    s = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_in = kk < D
        a = tl.load(qe_ptr + qi[:, None] * stride_qe + kk[None, :], mask=q_in[:, None] & k_in[None, :], other=0.0)
        b = tl.load(re_ptr + z[None, :] * stride_re + kk[:, None], mask=z_in[None, :] & k_in[:, None], other=0.0)
        s = tl.dot(a.to(tl.float32), b.to(tl.float32), s, input_precision=PRECISION)
    return s


@triton.jit
def _positive_terms(
    s, z, keep, qi, q_in, p, P, pos_ptr, sp_ptr, inv_tau,
):  # fmt: skip
    """For positive slot ``p`` of each query row: ``(m, sg, u, valid)`` over the (BQ, BN) tile, where ``m`` marks
    the counted columns (kept, not the positive itself), ``sg = sig(u)``, ``u = (s - s_p) / tau_rank``."""
    col = tl.load(pos_ptr + qi * P + p, mask=q_in, other=-1)  # (BQ,)
    valid = col >= 0
    s_p = tl.load(sp_ptr + qi * P + p, mask=valid, other=0.0)
    m = keep & (z[None, :] != col[:, None]) & valid[:, None]
    u = (s - s_p[:, None]) * inv_tau
    sg = 1.0 / (1.0 + tl.exp(-tl.minimum(tl.maximum(u, -_CLAMP), _CLAMP)))
    return m, sg, u, valid


@triton.jit
def _dense_weight(
    s, z, keep, qi, q_in, P, pos_ptr, sp_ptr, grank_ptr, inv_tau,
):  # fmt: skip
    """H[i, j] = sum_p g[i, p] sig'(u_ipj) over kept columns j != p, (BQ, BN); one positive at a time."""
    h = tl.zeros(s.shape, dtype=tl.float32)
    for p in range(0, P):
        m, sg, u, valid = _positive_terms(s, z, keep, qi, q_in, p, P, pos_ptr, sp_ptr, inv_tau)
        g = tl.load(grank_ptr + qi * P + p, mask=valid, other=0.0)
        h += tl.where(m & (tl.abs(u) <= _CLAMP), g[:, None] * (sg * (1.0 - sg)), 0.0)
    return h


@triton.jit
def _emb_fwd_kernel(
    qe_ptr, re_ptr, sp_ptr, pos_ptr, self_ptr, rank_ptr, dsum_ptr,
    Q, N, D, P, stride_qe, stride_re, inv_tau,
    INCLUDE_QUERY: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    qi = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_in = qi < Q
    qi = qi.to(tl.int64)
    p_lo = tl.program_id(1) * BLOCK_P
    p_hi = tl.minimum(p_lo + BLOCK_P, P)
    p_offs = p_lo + tl.arange(0, BLOCK_P)
    self_col = tl.load(self_ptr + qi, mask=q_in, other=-1)
    acc_rank = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
    acc_dsum = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        z = n0 + tl.arange(0, BLOCK_N)
        z_in = z < N
        s = _sim_tile(qe_ptr, re_ptr, qi, q_in, z.to(tl.int64), z_in, D, stride_qe, stride_re,
                      BLOCK_Q, BLOCK_N, BLOCK_K, PRECISION)  # fmt: skip
        keep = q_in[:, None] & z_in[None, :]
        if not INCLUDE_QUERY:
            keep = keep & (z[None, :] != self_col[:, None])
        # One positive at a time on the 2-D tile: a (BQ, BP, BN) tile needed every register and spilled.
        for p in range(p_lo, p_hi):
            m, sg, u, _ = _positive_terms(s, z, keep, qi, q_in, p, P, pos_ptr, sp_ptr, inv_tau)
            r = tl.sum(tl.where(m, sg, 0.0), axis=1)
            d = tl.sum(tl.where(m & (tl.abs(u) <= _CLAMP), sg * (1.0 - sg), 0.0), axis=1)
            here = p_offs[None, :] == p
            acc_rank = tl.where(here, acc_rank + r[:, None], acc_rank)
            acc_dsum = tl.where(here, acc_dsum + d[:, None], acc_dsum)
    qp = q_in[:, None] & (p_offs < P)[None, :]
    slot = qi[:, None] * P + p_offs[None, :]
    p_valid = tl.load(pos_ptr + slot, mask=qp, other=-1) >= 0
    tl.store(rank_ptr + slot, tl.where(p_valid, 1.0 + acc_rank, 0.0), mask=qp)
    tl.store(dsum_ptr + slot, tl.where(p_valid, acc_dsum, 0.0), mask=qp)


@triton.jit
def _emb_dq_kernel(
    qe_ptr, re_ptr, sp_ptr, pos_ptr, self_ptr, grank_ptr, out_ptr,
    Q, N, D, P, stride_qe, stride_re, stride_out, inv_tau,
    INCLUDE_QUERY: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    qi = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_in = qi < Q
    qi = qi.to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    d_in = dd < D
    self_col = tl.load(self_ptr + qi, mask=q_in, other=-1)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        z = n0 + tl.arange(0, BLOCK_N)
        z_in = z < N
        z64 = z.to(tl.int64)
        s = _sim_tile(qe_ptr, re_ptr, qi, q_in, z64, z_in, D, stride_qe, stride_re,
                      BLOCK_Q, BLOCK_N, BLOCK_K, PRECISION)  # fmt: skip
        keep = q_in[:, None] & z_in[None, :]
        if not INCLUDE_QUERY:
            keep = keep & (z[None, :] != self_col[:, None])
        h = _dense_weight(s, z, keep, qi, q_in, P, pos_ptr, sp_ptr, grank_ptr, inv_tau)
        v = tl.load(re_ptr + z64[:, None] * stride_re + dd[None, :], mask=z_in[:, None] & d_in[None, :], other=0.0)
        acc = tl.dot(h * inv_tau, v.to(tl.float32), acc, input_precision=PRECISION)
    tl.store(out_ptr + qi[:, None] * stride_out + dd[None, :], acc, mask=q_in[:, None] & d_in[None, :])


@triton.jit
def _emb_dref_kernel(
    qe_ptr, re_ptr, sp_ptr, pos_ptr, self_ptr, grank_ptr, out_ptr,
    Q, N, D, P, stride_qe, stride_re, stride_out, inv_tau,
    INCLUDE_QUERY: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    z = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    z_in = z < N
    z64 = z.to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    d_in = dd < D
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        qi = q0 + tl.arange(0, BLOCK_Q)
        q_in = qi < Q
        qi = qi.to(tl.int64)
        s = _sim_tile(qe_ptr, re_ptr, qi, q_in, z64, z_in, D, stride_qe, stride_re,
                      BLOCK_Q, BLOCK_N, BLOCK_K, PRECISION)  # fmt: skip
        keep = q_in[:, None] & z_in[None, :]
        if not INCLUDE_QUERY:
            self_col = tl.load(self_ptr + qi, mask=q_in, other=-1)
            keep = keep & (z[None, :] != self_col[:, None])
        h = _dense_weight(s, z, keep, qi, q_in, P, pos_ptr, sp_ptr, grank_ptr, inv_tau)
        v = tl.load(qe_ptr + qi[:, None] * stride_qe + dd[None, :], mask=q_in[:, None] & d_in[None, :], other=0.0)
        acc = tl.dot(tl.trans(h * inv_tau), v.to(tl.float32), acc, input_precision=PRECISION)
    tl.store(out_ptr + z64[:, None] * stride_out + dd[None, :], acc, mask=z_in[:, None] & d_in[None, :])


# Default tiles, chosen from the register and spill counts ptxas reports for sm_90 (benchmarks/compile_check.py):
# no spills at d = 512 with these; larger backward tiles or 3 pipeline stages spilled.
_FORWARD_TILES = (32, 64)
_BACKWARD_TILES = (16, 32)
_BLOCK_K = 16
_NUM_STAGES = 1


def _blocks(pmax: int, block_q: int | None, block_n: int | None, block_p: int | None) -> tuple[int, int, int]:
    """Forward tiles ``(BLOCK_Q, BLOCK_N, BLOCK_P)``; BLOCK_P positive slots per program: all of a query's
    positives up to 64, so the similarity tile is not recomputed per block of positives."""
    bp = block_p or max(2, triton.next_power_of_2(min(pmax, 64)))
    return block_q or _FORWARD_TILES[0], block_n or _FORWARD_TILES[1], bp


def embedding_rank_forward(
    query_emb: torch.Tensor,
    ref_emb: torch.Tensor,
    pos: torch.Tensor,
    self_index: torch.Tensor,
    s_pos: torch.Tensor,
    tau_rank: float,
    include_query: bool,
    *,
    precision: str = "ieee",
    out_rank: torch.Tensor | None = None,
    out_dsum: torch.Tensor | None = None,
    block_q: int | None = None,
    block_n: int | None = None,
    block_p: int | None = None,
    block_k: int = _BLOCK_K,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward kernel from embeddings: ``(rank, dsum)``, both (Q, Pmax) float32 (padding slots 0).

    Args:
        query_emb: (Q, d), ref_emb: (N, d), contiguous rows, float16/bfloat16/float32. pos: (Q, Pmax) int32, -1 pads.
        self_index: (Q,) int64. s_pos: (Q, Pmax) float32 from ``positive_similarities``.
        precision: ``tl.dot`` input precision for the tiles ("ieee", "tf32" or "tf32x3").
        out_rank / out_dsum: optional (Q, Pmax) float32 contiguous buffers, fully overwritten.
    """
    q, d = query_emb.shape
    n = ref_emb.shape[0]
    pmax = pos.shape[1]
    rank = torch.empty(q, pmax, dtype=torch.float32, device=query_emb.device) if out_rank is None else out_rank
    dsum = torch.empty_like(rank) if out_dsum is None else out_dsum
    bq, bn, bp = _blocks(pmax, block_q, block_n, block_p)
    grid = (triton.cdiv(q, bq), triton.cdiv(pmax, bp))
    _emb_fwd_kernel[grid](
        query_emb, ref_emb, s_pos, pos, self_index, rank, dsum, q, n, d, pmax, query_emb.stride(0), ref_emb.stride(0),
        1.0 / tau_rank, INCLUDE_QUERY=include_query, BLOCK_Q=bq, BLOCK_P=bp, BLOCK_N=bn, BLOCK_K=block_k,
        PRECISION=precision, num_warps=4, num_stages=_NUM_STAGES,
    )  # fmt: skip
    return rank, dsum


def embedding_rank_backward(
    query_emb: torch.Tensor,
    ref_emb: torch.Tensor,
    pos: torch.Tensor,
    self_index: torch.Tensor,
    s_pos: torch.Tensor,
    grad_rank: torch.Tensor,
    tau_rank: float,
    include_query: bool,
    *,
    precision: str = "ieee",
    out_query: torch.Tensor | None = None,
    out_ref: torch.Tensor | None = None,
    block_q: int | None = None,
    block_n: int | None = None,
    block_k: int = _BLOCK_K,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense part of the backward: ``(H @ ref_emb, H^T @ query_emb)``, (Q, d) and (N, d) float32, H never stored.

    ``out_query`` / ``out_ref``: optional float32 contiguous buffers of those shapes, every element overwritten.
    The sparse positive-pair term is added by the caller (see the module docstring). These kernels loop over
    every positive (no ``block_p``).
    """
    q, d = query_emb.shape
    n = ref_emb.shape[0]
    pmax = pos.shape[1]
    dq = torch.empty(q, d, dtype=torch.float32, device=query_emb.device) if out_query is None else out_query
    dref = torch.empty(n, d, dtype=torch.float32, device=query_emb.device) if out_ref is None else out_ref
    bq, bn = block_q or _BACKWARD_TILES[0], block_n or _BACKWARD_TILES[1]
    bd = max(16, triton.next_power_of_2(d))
    g = grad_rank.float().contiguous()
    common = (q, n, d, pmax, query_emb.stride(0), ref_emb.stride(0))
    # The (tile, d) accumulator and value tile live in registers: more warps for wide embeddings.
    meta = dict(INCLUDE_QUERY=include_query, BLOCK_Q=bq, BLOCK_N=bn, BLOCK_K=block_k, BLOCK_D=bd,
                PRECISION=precision, num_warps=8 if bd >= 256 else 4, num_stages=_NUM_STAGES)  # fmt: skip
    _emb_dq_kernel[(triton.cdiv(q, bq),)](
        query_emb, ref_emb, s_pos, pos, self_index, g, dq, *common, dq.stride(0), 1.0 / tau_rank, **meta
    )
    _emb_dref_kernel[(triton.cdiv(n, bn),)](
        query_emb, ref_emb, s_pos, pos, self_index, g, dref, *common, dref.stride(0), 1.0 / tau_rank, **meta
    )
    return dq, dref


class _RankFromEmbeddings(torch.autograd.Function):
    """(query_emb, ref_emb) -> rank (Q, Pmax) float32; similarity tiles recomputed in every kernel."""

    @staticmethod
    def forward(ctx, query_emb, ref_emb, pos, self_index, tau_rank, include_query, precision):  # type: ignore[override]
        s_pos = positive_similarities(query_emb, ref_emb, pos)
        rank, dsum = embedding_rank_forward(
            query_emb, ref_emb, pos, self_index, s_pos, tau_rank, include_query, precision=precision
        )
        ctx.save_for_backward(query_emb, ref_emb, pos, self_index, s_pos, dsum)
        ctx.tau_rank, ctx.include_query, ctx.precision = tau_rank, include_query, precision
        return rank

    @staticmethod
    def backward(ctx, grad_rank):  # type: ignore[override]
        query_emb, ref_emb, pos, self_index, s_pos, dsum = ctx.saved_tensors
        g = grad_rank.float().contiguous()
        dq, dref = embedding_rank_backward(
            query_emb, ref_emb, pos, self_index, s_pos, g, ctx.tau_rank, ctx.include_query, precision=ctx.precision
        )
        coef = torch.where(pos >= 0, -g * dsum / ctx.tau_rank, 0.0)
        _add_positive_pair_terms(dq, dref, query_emb, ref_emb, pos, coef)
        return dq.to(query_emb.dtype), dref.to(ref_emb.dtype), None, None, None, None, None


def rank_from_embeddings(
    query_emb: torch.Tensor, ref_emb: torch.Tensor, pos: torch.Tensor, self_index: torch.Tensor, tau_rank: float,
    include_query: bool, precision: str = "ieee",
) -> torch.Tensor:  # fmt: skip
    """rank (Q, Pmax) float32 of ``query_emb @ ref_emb^T`` (fp16/bf16/fp32, rows contiguous) for the positives
    ``pos`` (Q, Pmax) int32 (-1 pads), differentiable w.r.t. both embeddings; ``self_index`` (Q,) int64."""
    return _RankFromEmbeddings.apply(query_emb, ref_emb, pos, self_index, tau_rank, include_query, precision)
