"""Triton kernels for RS@k from embeddings, each similarity tile computed once per pass on tensor cores.

For a batch whose (Q, N) similarity does not fit, every kernel recomputes the (BLOCK_Q, BLOCK_N) tile
``s = query_emb[rows] @ ref_emb[cols]^T`` with ``tl.dot`` (d in BLOCK_K steps) and reuses it for every positive
slot of those queries: the positive slots are a loop over a tile held in registers, never a grid axis (except
above :data:`MAX_BLOCK_P` positives per query, see below). With ``u_qpz = (s_qz - s_qp) / tau_rank`` and the
counted columns ``C(q, p) = D(q) \\ {p}`` (``recallk.kernels.rsk``):

* forward, grid (query blocks,): one pass over the column tiles accumulates, in registers, for every positive
  slot p of the block's queries ``rank(q, p) = 1 + sum_{z in C(q,p)} sig(u_qpz)`` and (when a gradient is
  wanted) ``dsum(q, p) = sum_{z in C(q,p)} sig'(u_qpz)``;
* backward, two kernels without atomics, each recomputing the tile once and forming the dense part of dL/ds,
  ``H[q, z] = sum_p g_qp sig'(u_qpz) [z in C(q, p)]`` (g = dL/d rank), for all positives of the tile:
  ``dq = H @ ref_emb / tau_rank`` (grid over query blocks, dq in registers) and
  ``dref = H^T @ query_emb / tau_rank`` (grid over column blocks, dref in registers).

Two backward kernels, not one with atomics (FlashAttention-2's choice for dQ): at d = 512 an atomic
accumulation of one gradient adds ``(number of query blocks) * N * d`` float32 atomic adds (3.4e10 at
B = 65,536 with 64-row blocks: 137 GB of read-modify-write traffic in L2), and it makes the gradient's summation
order, hence its last bits, differ from run to run; two kernels cost one more tile product and one more
formation of H per backward, and are deterministic. Neither is measured (no GPU was lent; see
docs/benchmarks.md).

The sparse part of dL/ds, ``dL/ds_qp = -g_qp dsum(q, p) / tau_rank`` on the positive pairs, and the positive
similarities ``s_qp`` are O(Q * Pmax * d) host work (elementwise, so never TF32 whatever torch's matmul
flags say). The loss epilogue (R^k, the mean) stays on the host: ``recallk.kernels.triton.loss_from_rank``.

Tile products: ``precision`` "tf32x3" (three TF32 tensor-core products: float32-level accuracy, the default of
this kernel set), "ieee" (exact float32 FMA, slow on tensor-core GPUs; the interpreter tests use it) or "tf32"
(one pass, about 1e-3 relative error in s). float16/bfloat16 embeddings take one TF32 pass whatever the
precision: their significands fit TF32's, so the products are exact (float32 accumulation). (A native bf16
``tl.dot`` would run at twice the TF32 rate; Triton's interpreter computes it wrongly, so it could not be tested
here.) Sigmoids in float32 as ``1 / (1 + exp2(-u log2 e))``, the exponent clamped above at 50 log2 e (the
reference's clamp of u at -50: no overflow); at the other end ``exp2`` underflows to 0 and the sigmoid is 1
exactly, as the clamped reference's is in float32. The derivative is taken as ``sig (1 - sig)`` everywhere, where
the clamped reference's is 0 beyond the clamp: a difference below 2e-22 (``recallk.kernels.torch_rsk``).

Above :data:`MAX_BLOCK_P` positives per query the forward's register accumulators would not fit: the forward
then takes a second grid axis over blocks of MAX_BLOCK_P positive slots (recomputing the tile per block); the
backward kernels hold no per-positive state and cover any count. Embeddings wider than
``FusedConfig.max_block_d`` (256 by default) take a grid axis over d chunks in the backward kernels (each chunk
forms H again). So these kernels cover every case the older ``rsk_embeddings`` kernels cover.

Small batches give few programs (B = 4,000: 32 forward programs of 128 queries on a 132-multiprocessor GPU):
each kernel then splits its inner loop over a third grid axis (``FusedConfig.programs``), part i taking the
tiles i, i + splits, ...; every part writes its own partial sums, which the host adds (no atomics).
Extra memory: O(splits * (Q + N) * d + Q * Pmax), the outputs each written once (splits = 1 for large batches).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from recallk.kernels.rsk import CLAMP

__all__ = [
    "MAX_BLOCK_D",
    "MAX_BLOCK_P",
    "PRECISIONS",
    "FusedConfig",
    "fused_rank_backward",
    "fused_rank_forward",
    "rank_from_embeddings_fused",
]

#: ``tl.dot`` input precisions of the float32 tile products
PRECISIONS = ("tf32x3", "ieee", "tf32")
#: Most positive slots one forward program keeps in registers (two (BLOCK_Q, MAX_BLOCK_P) accumulators).
MAX_BLOCK_P = 32
#: Widest d chunk the backward kernels accumulate in registers (wider embeddings: a grid axis over chunks).
MAX_BLOCK_D = 512
_LOG2E = 1.4426950408889634
_CLAMP2 = tl.constexpr(CLAMP * _LOG2E)  # the sigmoid clamp in base-2 units


@triton.jit
def _tile(
    qe_ptr, re_ptr, qi, q_in, z, z_in, D, stride_qe, stride_re,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    HALF: tl.constexpr,
):  # fmt: skip
    """s[i, j] = <query_emb[qi[i]], ref_emb[z[j]]>, (BLOCK_Q, BLOCK_N) float32, 0 outside the masks; qi, z int64."""
    s = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_in = kk < D
        a = tl.load(qe_ptr + qi[:, None] * stride_qe + kk[None, :], mask=q_in[:, None] & k_in[None, :], other=0.0)
        b = tl.load(re_ptr + z[None, :] * stride_re + kk[:, None], mask=z_in[None, :] & k_in[:, None], other=0.0)
        if HALF:  # fp16 / bf16 significands (11 / 8 bits) fit TF32's: one TF32 pass multiplies them exactly
            s = tl.dot(a.to(tl.float32), b.to(tl.float32), s, input_precision="tf32")
        else:
            s = tl.dot(a, b, s, input_precision=PRECISION)
    return s


@triton.jit
def _counted(qi, q_in, z, z_in, self_ptr, INCLUDE_QUERY: tl.constexpr):
    """(BQ, BN) mask of the columns in D(q): inside the matrix, and not q's own column unless INCLUDE_QUERY."""
    keep = q_in[:, None] & z_in[None, :]
    if not INCLUDE_QUERY:
        self_col = tl.load(self_ptr + qi, mask=q_in, other=-1)
        keep = keep & (z[None, :] != self_col[:, None])
    return keep


@triton.jit
def _fwd_kernel(
    qe_ptr, re_ptr, sp_ptr, pos_ptr, self_ptr, rank_ptr, dsum_ptr,
    Q, N, D, P, stride_qe, stride_re, scale, SPLITS,
    INCLUDE_QUERY: tl.constexpr, WANT_DSUM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    """Partial sums of rank - 1 and dsum over the column tiles pid2, pid2 + SPLITS, ..., for the positive slots
    [pid1 * BLOCK_P, +BLOCK_P) of BLOCK_Q queries, into plane pid2 of the (splits, Q, P) outputs (0 in the
    padding); ``scale`` is log2(e) / tau_rank, so ``x = s * scale`` is the sigmoid argument in base 2."""
    qi = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_in = qi < Q
    qi = qi.to(tl.int64)
    p_lo = tl.program_id(1) * BLOCK_P
    n_p = tl.minimum(BLOCK_P, P - p_lo)
    slots = tl.arange(0, BLOCK_P)
    acc_rank = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
    acc_dsum = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
    for n0 in range(tl.program_id(2) * BLOCK_N, N, SPLITS * BLOCK_N):
        z = n0 + tl.arange(0, BLOCK_N)
        z_in = z < N
        z64 = z.to(tl.int64)
        x = _tile(qe_ptr, re_ptr, qi, q_in, z64, z_in, D, stride_qe, stride_re,
                  BLOCK_Q, BLOCK_N, BLOCK_K, PRECISION, HALF) * scale  # fmt: skip
        keep = _counted(qi, q_in, z, z_in, self_ptr, INCLUDE_QUERY)
        for j in range(0, n_p):  # every positive slot of these queries, on the one tile
            slot = qi * P + p_lo + j
            col = tl.load(pos_ptr + slot, mask=q_in, other=-1)
            x_p = tl.load(sp_ptr + slot, mask=q_in, other=0.0) * scale
            sg = 1.0 / (1.0 + tl.exp2(tl.minimum(x_p[:, None] - x, _CLAMP2)))  # sig(u_qpz)
            m = keep & (z[None, :] != col[:, None])
            here = slots[None, :] == j
            acc_rank = tl.where(here, acc_rank + tl.sum(tl.where(m, sg, 0.0), axis=1)[:, None], acc_rank)
            if WANT_DSUM:
                d = tl.sum(tl.where(m, sg - sg * sg, 0.0), axis=1)
                acc_dsum = tl.where(here, acc_dsum + d[:, None], acc_dsum)
    p_offs = p_lo + slots
    qp = q_in[:, None] & (p_offs < P)[None, :]
    out = qi[:, None] * P + p_offs[None, :]
    valid = tl.load(pos_ptr + out, mask=qp, other=-1) >= 0
    plane = tl.program_id(2).to(tl.int64) * Q * P
    tl.store(rank_ptr + plane + out, tl.where(valid, acc_rank, 0.0), mask=qp)
    if WANT_DSUM:
        tl.store(dsum_ptr + plane + out, tl.where(valid, acc_dsum, 0.0), mask=qp)


@triton.jit
def _dense_h(x, z, keep, qi, q_in, P, pos_ptr, sp_ptr, g_ptr, scale):
    """H[i, j] = sum_p g[i, p] sig'(u_ipj) over the counted columns, (BQ, BN) float32, every positive slot on the
    one tile ``x`` (= s * scale)."""
    h = tl.zeros(x.shape, dtype=tl.float32)
    for p in range(0, P):
        slot = qi * P + p
        col = tl.load(pos_ptr + slot, mask=q_in, other=-1)
        valid = q_in & (col >= 0)
        x_p = tl.load(sp_ptr + slot, mask=valid, other=0.0) * scale
        g = tl.load(g_ptr + slot, mask=valid, other=0.0)
        sg = 1.0 / (1.0 + tl.exp2(tl.minimum(x_p[:, None] - x, _CLAMP2)))
        m = keep & (z[None, :] != col[:, None])
        h += tl.where(m, g[:, None] * (sg - sg * sg), 0.0)
    return h


@triton.jit
def _dq_kernel(
    qe_ptr, re_ptr, sp_ptr, pos_ptr, self_ptr, g_ptr, out_ptr,
    Q, N, D, P, stride_qe, stride_re, stride_out, scale, inv_tau, SPLITS,
    INCLUDE_QUERY: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    """dq[rows, d chunk pid1] = H[rows, cols] @ ref_emb[cols, chunk] / tau_rank over the column tiles pid2,
    pid2 + SPLITS, ..., accumulated, into plane pid2 of the (SPLITS, Q, d) output."""
    qi = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_in = qi < Q
    qi = qi.to(tl.int64)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = dd < D
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    self_col = tl.load(self_ptr + qi, mask=q_in, other=-1).to(tl.int32)
    for n0 in range(tl.program_id(2) * BLOCK_N, N, SPLITS * BLOCK_N):
        z = n0 + tl.arange(0, BLOCK_N)
        z_in = z < N
        z64 = z.to(tl.int64)
        x = _tile(qe_ptr, re_ptr, qi, q_in, z64, z_in, D, stride_qe, stride_re,
                  BLOCK_Q, BLOCK_N, BLOCK_K, PRECISION, HALF) * scale  # fmt: skip
        keep = q_in[:, None] & z_in[None, :]
        if not INCLUDE_QUERY:
            keep = keep & (z[None, :] != self_col[:, None])
        h = _dense_h(x, z, keep, qi, q_in, P, pos_ptr, sp_ptr, g_ptr, scale)
        v = tl.load(re_ptr + z64[:, None] * stride_re + dd[None, :], mask=z_in[:, None] & d_in[None, :], other=0.0)
        acc = tl.dot(h, v.to(tl.float32), acc, input_precision=PRECISION)
    out_ptr += tl.program_id(2).to(tl.int64) * Q * stride_out
    tl.store(out_ptr + qi[:, None] * stride_out + dd[None, :], acc * inv_tau, mask=q_in[:, None] & d_in[None, :])


@triton.jit
def _dref_kernel(
    qe_ptr, re_ptr, sp_ptr, pos_ptr, self_ptr, g_ptr, out_ptr,
    Q, N, D, P, stride_qe, stride_re, stride_out, scale, inv_tau, SPLITS,
    INCLUDE_QUERY: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    """dref[cols, d chunk pid1] = H[rows, cols]^T @ query_emb[rows, chunk] / tau_rank over the query-row tiles
    pid2, pid2 + SPLITS, ..., accumulated, into plane pid2 of the (SPLITS, N, d) output."""
    z = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    z_in = z < N
    z64 = z.to(tl.int64)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = dd < D
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for q0 in range(tl.program_id(2) * BLOCK_Q, Q, SPLITS * BLOCK_Q):
        qi = q0 + tl.arange(0, BLOCK_Q)
        q_in = qi < Q
        qi = qi.to(tl.int64)
        x = _tile(qe_ptr, re_ptr, qi, q_in, z64, z_in, D, stride_qe, stride_re,
                  BLOCK_Q, BLOCK_N, BLOCK_K, PRECISION, HALF) * scale  # fmt: skip
        keep = _counted(qi, q_in, z, z_in, self_ptr, INCLUDE_QUERY)
        h = _dense_h(x, z, keep, qi, q_in, P, pos_ptr, sp_ptr, g_ptr, scale)
        v = tl.load(qe_ptr + qi[:, None] * stride_qe + dd[None, :], mask=q_in[:, None] & d_in[None, :], other=0.0)
        acc = tl.dot(tl.trans(h), v.to(tl.float32), acc, input_precision=PRECISION)
    out_ptr += tl.program_id(2).to(tl.int64) * N * stride_out
    tl.store(out_ptr + z64[:, None] * stride_out + dd[None, :], acc * inv_tau, mask=z_in[:, None] & d_in[None, :])


class FusedConfig:
    """Tile sizes, warps and pipeline stages of the three kernels.

    The defaults are the largest tiles that compile for sm_90 without register spills at d = 512 (float32 input,
    tf32x3; ``benchmarks/compile_check.py``); none is timed (no GPU was lent). At d = 512 the backward kernels then
    take two d chunks of 256, forming H twice each; a whole-width chunk (``max_block_d=512``) spills.

    Args:
        fwd, dq, dref: (BLOCK_Q, BLOCK_N, BLOCK_K, num_warps, num_stages) of the forward, dq and dref kernels;
            the blocks powers of two >= 16.
        max_block_p: most positive slots per forward program (a power of two, capped at :data:`MAX_BLOCK_P`).
        max_block_d: widest d chunk per backward program (a power of two, capped at :data:`MAX_BLOCK_D`).
        programs: the fewest programs a launch should have (None: twice the GPU's multiprocessor count on CUDA,
            1 elsewhere). A launch with fewer (small batches: B = 4,000 gives 32 forward programs of 128 queries)
            splits its inner loop (columns for the forward and dq, query rows for dref) over a third grid axis;
            each split writes its own partial sums, added on the host (no atomics, same result every run).

    Raises:
        ValueError: a block or bound that is no power of two, a tuple of the wrong length.
    """

    def __init__(
        self,
        fwd: tuple[int, int, int, int, int] = (128, 64, 32, 8, 2),
        dq: tuple[int, int, int, int, int] = (64, 32, 16, 8, 1),
        dref: tuple[int, int, int, int, int] = (32, 64, 16, 8, 1),
        max_block_p: int = MAX_BLOCK_P,
        max_block_d: int = 256,
        programs: int | None = None,
    ) -> None:
        for name, value in (("max_block_p", max_block_p), ("max_block_d", max_block_d)):
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a positive power of two, got {value}")
        for name, tiles in (("fwd", fwd), ("dq", dq), ("dref", dref)):
            if len(tiles) != 5 or any(t < 1 for t in tiles) or any(t < 16 or t & (t - 1) for t in tiles[:3]):
                raise ValueError(f"{name} must be (BLOCK_Q, BLOCK_N, BLOCK_K, num_warps, num_stages) with powers of "
                                 f"two >= 16 for the blocks, got {tiles}")  # fmt: skip
        self.fwd, self.dq, self.dref = tuple(fwd), tuple(dq), tuple(dref)
        if programs is not None and (not isinstance(programs, int) or programs < 1):
            raise ValueError(f"programs must be a positive integer or None, got {programs!r}")
        self.max_block_p, self.max_block_d = min(max_block_p, MAX_BLOCK_P), min(max_block_d, MAX_BLOCK_D)
        self.programs = programs

    def block_p(self, pmax: int) -> int:
        """Positive slots per forward program for queries with up to ``pmax`` positives."""
        return max(2, min(triton.next_power_of_2(max(pmax, 1)), self.max_block_p))

    def block_d(self, d: int) -> int:
        """Width of one d chunk of the backward kernels for embeddings of width ``d``."""
        return max(16, min(triton.next_power_of_2(d), self.max_block_d))

    def splits(self, device: torch.device, programs: int, length: int, block: int) -> int:
        """Into how many parts a launch of ``programs`` programs, each looping over ``length`` rows or columns in
        tiles of ``block``, splits that loop (part i takes tiles i, i + splits, ...) so that the launch has at
        least :attr:`programs` programs where there are tiles enough; no part is empty."""
        target = self.programs
        if target is None:
            target = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        tiles = max(1, triton.cdiv(length, block))
        return min(tiles, max(1, triton.cdiv(target, max(programs, 1))))

    def __repr__(self) -> str:
        return (f"FusedConfig(fwd={self.fwd}, dq={self.dq}, dref={self.dref}, max_block_p={self.max_block_p}, "
                f"max_block_d={self.max_block_d}, programs={self.programs})")  # fmt: skip


DEFAULT_CONFIG = FusedConfig()


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def positive_similarities(query_emb: torch.Tensor, ref_emb: torch.Tensor, pos: torch.Tensor,
                          chunk_elements: int = 1 << 24) -> torch.Tensor:  # fmt: skip
    """s_qp = <query_emb[q], ref_emb[pos[q, p]]>, (Q, Pmax) float32, 0 in the padding (pos -1); elementwise
    products summed in float32, in chunks of query rows (never TF32, whatever torch's matmul flags)."""
    q, d = query_emb.shape
    out = torch.empty(q, pos.shape[1], dtype=torch.float32, device=query_emb.device)
    rows = max(1, chunk_elements // max(1, pos.shape[1] * d))
    for r0 in range(0, q, rows):
        cols = pos[r0 : r0 + rows].long()
        gathered = ref_emb[cols.clamp(min=0)].float()  # (rows, Pmax, d)
        s = (gathered * query_emb[r0 : r0 + rows].float()[:, None, :]).sum(-1)
        out[r0 : r0 + rows] = torch.where(cols >= 0, s, 0.0)
    return out


def fused_rank_forward(
    query_emb: torch.Tensor, ref_emb: torch.Tensor, pos: torch.Tensor, self_index: torch.Tensor,
    s_pos: torch.Tensor, tau_rank: float, include_query: bool, *, precision: str = "tf32x3",
    want_dsum: bool = True, config: FusedConfig = DEFAULT_CONFIG,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Forward kernel: ``(rank, dsum)``, (Q, Pmax) float32 each (0 in the padding; dsum None without
    ``want_dsum``).

    Args:
        query_emb: (Q, d), ref_emb: (N, d), float16/bfloat16/float32, one dtype, rows contiguous (stride(1) == 1).
        pos: (Q, Pmax) int32 positive columns, -1 in the padding (``Positives.padded``). self_index: (Q,) int64.
        s_pos: (Q, Pmax) float32 from :func:`positive_similarities`. tau_rank: the rank temperature (> 0).
        precision: tile products of float32 input, one of :data:`PRECISIONS`.

    Raises:
        ValueError: an unknown precision.
    """
    _check_precision(precision)
    q, d = query_emb.shape
    n, pmax = ref_emb.shape[0], pos.shape[1]
    bq, bn, bk, warps, stages = config.fwd
    bp = config.block_p(pmax)
    grid = (triton.cdiv(q, bq), triton.cdiv(pmax, bp))
    splits = config.splits(query_emb.device, grid[0] * grid[1], n, bn)
    parts = torch.empty(splits, q, pmax, dtype=torch.float32, device=query_emb.device)
    dparts = torch.empty_like(parts) if want_dsum else parts  # a placeholder pointer when not wanted
    _fwd_kernel[(*grid, splits)](
        query_emb, ref_emb, s_pos, pos, self_index, parts, dparts, q, n, d, pmax, query_emb.stride(0),
        ref_emb.stride(0), _LOG2E / tau_rank, splits, INCLUDE_QUERY=include_query, WANT_DSUM=want_dsum, BLOCK_Q=bq,
        BLOCK_N=bn, BLOCK_K=bk, BLOCK_P=bp, PRECISION=precision, HALF=query_emb.dtype != torch.float32,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    rank = (parts[0] if splits == 1 else parts.sum(0)).add_(pos >= 0)  # rank = 1 + the sum, 0 in the padding
    dsum = (dparts[0] if splits == 1 else dparts.sum(0)) if want_dsum else None
    return rank, dsum


def fused_rank_backward(
    query_emb: torch.Tensor, ref_emb: torch.Tensor, pos: torch.Tensor, self_index: torch.Tensor,
    s_pos: torch.Tensor, grad_rank: torch.Tensor, tau_rank: float, include_query: bool, *,
    precision: str = "tf32x3", config: FusedConfig = DEFAULT_CONFIG,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Dense part of the backward: ``(H @ ref_emb, H^T @ query_emb) / tau_rank``, (Q, d) and (N, d) float32,
    with ``H[q, z] = sum_p grad_rank[q, p] sig'(u_qpz)`` over the counted columns (never stored).

    ``grad_rank`` (Q, Pmax) float32, 0 in the padding; other arguments as in :func:`fused_rank_forward`. The sparse
    positive-pair term is the caller's (see the module docstring).
    """
    _check_precision(precision)
    q, d = query_emb.shape
    n, pmax = ref_emb.shape[0], pos.shape[1]
    bd = config.block_d(d)
    g = grad_rank.float().contiguous()
    common = (q, n, d, pmax, query_emb.stride(0), ref_emb.stride(0))
    scale, inv_tau = _LOG2E / tau_rank, 1.0 / tau_rank
    chunks = triton.cdiv(d, bd)
    grads = []
    for kernel, tiles, is_dq in ((_dq_kernel, config.dq, True), (_dref_kernel, config.dref, False)):
        bq, bn, bk, warps, stages = tiles
        # dq: programs over query rows, loop over columns; dref: programs over columns, loop over query rows
        outer, length, block = (triton.cdiv(q, bq), n, bn) if is_dq else (triton.cdiv(n, bn), q, bq)
        splits = config.splits(query_emb.device, outer * chunks, length, block)
        parts = torch.empty(splits, q if is_dq else n, d, dtype=torch.float32, device=query_emb.device)
        kernel[(outer, chunks, splits)](
            query_emb, ref_emb, s_pos, pos, self_index, g, parts, *common, parts.stride(1), scale, inv_tau, splits,
            INCLUDE_QUERY=include_query, BLOCK_Q=bq, BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd, PRECISION=precision,
            HALF=query_emb.dtype != torch.float32, num_warps=warps, num_stages=stages,
        )  # fmt: skip
        grads.append(parts[0] if splits == 1 else parts.sum(0))
    return grads[0], grads[1]


def _add_positive_pair_terms(dq: torch.Tensor, dref: torch.Tensor, query_emb: torch.Tensor, ref_emb: torch.Tensor,
                             pos: torch.Tensor, coef: torch.Tensor, chunk_elements: int = 1 << 24) -> None:  # fmt: skip
    """In place: ``dq[q] += sum_p coef[q, p] ref_emb[pos[q, p]]``, ``dref[pos[q, p]] += coef[q, p] query_emb[q]``
    (coef 0 in the padding); elementwise float32 products, in chunks of query rows."""
    q, d = query_emb.shape
    rows = max(1, chunk_elements // max(1, pos.shape[1] * d))
    for r0 in range(0, q, rows):
        cols = pos[r0 : r0 + rows].long().clamp(min=0)
        c = coef[r0 : r0 + rows, :, None]
        dq[r0 : r0 + rows] += (c * ref_emb[cols].float()).sum(1)
        dref.index_add_(0, cols.reshape(-1), (c * query_emb[r0 : r0 + rows].float()[:, None, :]).reshape(-1, d))


class _RankFused(torch.autograd.Function):
    """(query_emb, ref_emb) -> rank (Q, Pmax) float32: one forward kernel, two backward kernels."""

    @staticmethod
    def forward(ctx, query_emb, ref_emb, pos, self_index, tau_rank, include_query, precision, config):  # type: ignore[override]
        want_grad = bool(ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        s_pos = positive_similarities(query_emb, ref_emb, pos)
        rank, dsum = fused_rank_forward(query_emb, ref_emb, pos, self_index, s_pos, tau_rank, include_query,
                                        precision=precision, want_dsum=want_grad, config=config)  # fmt: skip
        if want_grad:
            ctx.save_for_backward(query_emb, ref_emb, pos, self_index, s_pos, dsum)
        ctx.args = (tau_rank, include_query, precision, config)
        return rank

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rank):  # type: ignore[override]
        query_emb, ref_emb, pos, self_index, s_pos, dsum = ctx.saved_tensors
        tau_rank, include_query, precision, config = ctx.args
        g = torch.where(pos >= 0, grad_rank.float(), 0.0).contiguous()
        dq, dref = fused_rank_backward(query_emb, ref_emb, pos, self_index, s_pos, g, tau_rank, include_query,
                                       precision=precision, config=config)  # fmt: skip
        _add_positive_pair_terms(dq, dref, query_emb, ref_emb, pos, -g * dsum / tau_rank)
        return dq.to(query_emb.dtype), dref.to(ref_emb.dtype), None, None, None, None, None, None


def rank_from_embeddings_fused(
    query_emb: torch.Tensor, ref_emb: torch.Tensor, pos: torch.Tensor, self_index: torch.Tensor, tau_rank: float,
    include_query: bool, precision: str = "tf32x3", config: FusedConfig = DEFAULT_CONFIG,
) -> torch.Tensor:  # fmt: skip
    """rank (Q, Pmax) float32 of ``query_emb @ ref_emb^T`` for the positives ``pos``, differentiable w.r.t. both
    embeddings (the same tensor may be passed twice: autograd sums its two gradients).

    Args:
        query_emb: (Q, d), ref_emb: (N, d): float16/bfloat16/float32, one dtype, rows contiguous, on the kernels'
            device (CUDA, or CPU under TRITON_INTERPRET=1).
        pos: (Q, Pmax) int32 positive columns, -1 padding; self_index: (Q,) int64, -1 where the query is no column.
        tau_rank: rank temperature; include_query: count the query's own column (``RSkParams.include_query``).
        precision: tile products of float32 input (:data:`PRECISIONS`); config: tiles (:class:`FusedConfig`).

    Returns:
        (Q, Pmax) float32 ranks, 0 in the padding. Source of the formulas: method.md section 1.

    Raises:
        ValueError: an unknown precision.
    """
    _check_precision(precision)
    if not math.isfinite(tau_rank) or tau_rank <= 0:
        raise ValueError(f"tau_rank must be positive and finite, got {tau_rank}")
    return _RankFused.apply(query_emb, ref_emb, pos, self_index, tau_rank, include_query, precision, config)
