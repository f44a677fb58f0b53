"""The torch backend of RS@k (CPU and GPU): blocks of query rows, from a similarity matrix or from embeddings
without ever storing the similarity matrix. The maths: :mod:`recallk.kernels.rsk`.

How it is computed. Queries are sorted by their number of positives and cut into blocks of rows. For a block,
each query's positive similarities are gathered into a padded ``(rows, Pmax)`` tensor and the
``(rows, Pmax, N)`` sigmoid terms are formed in one reusable buffer sized to stay in cache. The same buffer then
gives the gradient: with ``sig' = sig (1 - sig)``,

    dL/ds_qz = sum_p g_qp sig'_pz / tau_rank         (z in D(q), z != p)
    dL/ds_qp = -g_qp sum_{z in D(q), z != p} sig'_pz / tau_rank,    g_qp = dL/d rank(q, p),

so the gradient of each block is finished while its sigmoids are still in cache, instead of being recomputed in
``backward``. Extra memory: the ``(Q, N)`` gradient (in the compute dtype) plus one block buffer; never the
``(Q, |P|, N)`` tensor. ``backward`` only scales the stored gradient by the incoming scalar. Terms ``z = p``
(sig(0) = 1/2) and the excluded self column are included in the dense block computation and removed by exact
corrections afterwards (in the gradient the ``z = p`` term cancels exactly).

From embeddings the same block loop computes each block's similarity rows by a matmul and sends its finished
gradient rows straight into the embedding gradients: neither the ``(Q, N)`` similarity nor its gradient is stored.

The clamp to [-CLAMP, CLAMP] is skipped on the dense block, where it cannot change a result: ``sig(50)`` rounds
to 1 in float32 and float64, and below -50 the clamped and unclamped terms (and their derivatives) differ by less
than 2e-22 (/ tau), which moves a rank (>= 1) by less than ``N * 2e-22``, below float64 resolution for any N
under 500,000. ``torch.sigmoid`` itself is stable for any finite input.
"""

from __future__ import annotations

import torch

from recallk.kernels.rsk import CLAMP, Positives, RSkParams, register_backend

__all__ = ["DEFAULT_BLOCK_ELEMENTS", "DEFAULT_BLOCK_ELEMENTS_GPU", "TorchBackend"]

#: Elements of the (rows, Pmax, N) block buffer when ``block_size`` is None, on CPU (8 MiB in float32: large
#: enough to amortise the per-block Python overhead, small enough to stay in a 32 MiB L3) and on GPUs (128 MiB:
#: enough work per kernel launch).
DEFAULT_BLOCK_ELEMENTS = 1 << 21
DEFAULT_BLOCK_ELEMENTS_GPU = 1 << 25


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the loss is computed in: float64 for float64 input, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sig(u: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(u.clamp(-CLAMP, CLAMP))


class _RowSource:
    """Where the similarity rows of a block come from and where their gradient goes.

    Subclasses fill ``load`` (write ``scale * s[rows]`` into a (b, N) buffer), ``grad_out`` (the (b, N) tensor the
    gradient rows are written into) and ``commit`` (called once the gradient rows are final).
    ``rows`` is ``(r0, b, idx)``: ``r0 >= 0`` means the consecutive rows ``r0 .. r0 + b - 1``; else ``idx`` lists them.
    ``block_elements`` (CPU, other devices) size the (rows, Pmax, N) block buffer; ``min_rows`` bounds its rows.
    """

    block_elements = (DEFAULT_BLOCK_ELEMENTS, DEFAULT_BLOCK_ELEMENTS_GPU)
    min_rows = 1

    def load(self, rows: tuple[int, int, torch.Tensor], scale: float, out: torch.Tensor) -> None:
        raise NotImplementedError

    def grad_out(self, rows: tuple[int, int, torch.Tensor], scratch: torch.Tensor) -> torch.Tensor:
        return scratch

    def commit(self, rows: tuple[int, int, torch.Tensor], grow: torch.Tensor) -> None:
        raise NotImplementedError


def _take(t: torch.Tensor, rows: tuple[int, int, torch.Tensor]) -> torch.Tensor:
    r0, b, idx = rows
    return t[r0 : r0 + b] if r0 >= 0 else t.index_select(0, idx)


def _blocked_rsk(
    source: _RowSource, n_ref: int, positives: Positives, params: RSkParams, block_size: int | None,
    cd: torch.dtype, want_grad: bool,
) -> torch.Tensor:  # fmt: skip
    """The loss over every query, block of rows by block of rows; with ``want_grad`` each block's dL/ds rows go to
    ``source``. Returns the scalar loss in ``cd`` (see the module docstring for the maths)."""
    pos_idx, counts, self_index = positives
    dev = pos_idx.device
    ks = torch.tensor([float(k) for k in params.ks], dtype=cd, device=dev)
    tau_k = torch.tensor(params.tau_k, dtype=cd, device=dev)
    inv_tau = 1.0 / params.tau_rank

    counts_cpu = counts.cpu()
    order = torch.argsort(counts_cpu, descending=True, stable=True)
    n_valid = int((counts_cpu > 0).sum())
    order = order[:n_valid]
    order_counts = counts_cpu[order].tolist()
    order_dev = order.to(dev)
    steps = order[1:] - order[:-1]  # 1 inside runs of consecutive rows, which need no gather/scatter
    # 1 / (number of queries * number of ks): the scale of each R^k in the loss, folded into g.
    scale = 1.0 / (n_valid * ks.numel())
    exclude_self = (not params.include_query) and bool((self_index >= 0).any())
    every_row_has_self = exclude_self and bool((self_index >= 0).all())
    slot = torch.arange(pos_idx.shape[1], device=dev)

    total = torch.zeros((), dtype=cd, device=dev)
    # Buffers reused by every block: a fresh large tensor per block costs page faults on the CPU (glibc returns
    # freed large blocks to the OS), which cost as much as the arithmetic here.
    terms_buf = torch.empty(0, dtype=cd, device=dev)
    rows_buf = torch.empty(0, dtype=cd, device=dev)
    grad_buf = torch.empty(0, dtype=cd, device=dev)
    block_elements = source.block_elements[0 if dev.type == "cpu" else 1]

    start = 0
    while start < n_valid:
        pmax = order_counts[start]  # queries are sorted by count, so the first is the widest
        b = min(n_valid - start, block_size or max(source.min_rows, block_elements // (pmax * n_ref)))
        stop = start + b
        # A run of consecutive rows (the usual case: equal class sizes) is sliced, not gathered.
        r0 = int(order[start]) if bool((steps[start : stop - 1] == 1).all()) else -1
        rows = (r0, b, order_dev[start:stop])
        start = stop

        if rows_buf.numel() < b * n_ref:
            rows_buf = torch.empty(b * n_ref, dtype=cd, device=dev)
        x = rows_buf[: b * n_ref].view(b, n_ref)
        source.load(rows, inv_tau, x)  # (b, N) similarities / tau_rank
        cols = _take(pos_idx, rows)[:, :pmax]
        n_pos = _take(counts, rows)
        y = x.gather(1, cols)  # (b, P) positive similarities / tau_rank, the very values of x
        pmask = (slot[:pmax] < n_pos[:, None]).to(cd)
        denom = torch.minimum(ks, n_pos[:, None].to(cd))  # (b, K): min(k, |P|)
        # rank = 1 + (sum over every column) - sig(0) [z = p] - sig(u_self) [the excluded self column]
        if exclude_self:
            selfc = _take(self_index, rows)[:, None]
            has_self = (selfc >= 0).to(cd)
            s_self = _sig(x.gather(1, selfc.clamp(min=0)) - y).mul_(has_self)  # (b, P)
            rank_offset = 0.5 - s_self
        else:
            rank_offset = 0.5

        need = b * pmax * n_ref
        if terms_buf.numel() < need:
            terms_buf = torch.empty(need, dtype=cd, device=dev)
        terms = terms_buf[:need].view(b, pmax, n_ref)
        torch.sub(x[:, None, :], y[:, :, None], out=terms)
        terms.sigmoid_()  # no clamp needed here: see the module docstring
        rank = terms.sum(-1).add_(rank_offset)  # (b, P)

        # R^k and the loss of each query in the block.
        a = _sig((ks - rank[..., None]) / tau_k).mul_(pmask[..., None])  # (b, P, K)
        soft_count = a.sum(1)  # (b, K)
        total += (torch.minimum(soft_count, ks) / denom).sum()
        if not want_grad:
            continue

        # g = dL/d rank / tau_rank (every d rank / d s carries 1 / tau_rank)
        active = (soft_count < ks).to(cd).div_(denom)  # d min(count, k) / d count, over min(k, |P|)
        g = torch.einsum("bpk,bpk,k,bk->bp", a, 1.0 - a, 1.0 / tau_k, active).mul_(scale * inv_tau)
        terms.addcmul_(terms, terms, value=-1.0)  # sig -> sig'
        if grad_buf.numel() < b * n_ref:
            grad_buf = torch.empty(b * n_ref, dtype=cd, device=dev)
        grow = source.grad_out(rows, grad_buf[: b * n_ref].view(b, n_ref))
        torch.bmm(g[:, None, :], terms, out=grow.view(b, 1, n_ref))  # sum_p g_p sig'_pz
        diag = terms.sum(-1)  # (b, P): sum over every column of sig'_pz
        if exclude_self:
            diag -= s_self * (1.0 - s_self)  # the self column's sig'
        # d/ds_qp: the z = p terms of grow (g_p / 4) and diag (1 / 4) cancel in grow_p - g_p * diag_p.
        grow.scatter_add_(1, cols, diag.mul_(g).neg_())
        if exclude_self:  # the excluded self column gets no gradient
            if every_row_has_self:
                grow.scatter_(1, selfc, 0.0)
            else:
                keep = (selfc < 0).to(cd)
                selfc = selfc.clamp(min=0)
                grow.scatter_(1, selfc, grow.gather(1, selfc) * keep)
        source.commit(rows, grow)
    return 1.0 - total * scale


class _SimilarityRows(_RowSource):
    """Rows of a stored (Q, N) similarity; the gradient is a (Q, N) tensor written row block by row block."""

    def __init__(self, sim: torch.Tensor, grad: torch.Tensor | None) -> None:
        self.sim, self.grad = sim, grad

    def load(self, rows: tuple[int, int, torch.Tensor], scale: float, out: torch.Tensor) -> None:
        part = _take(self.sim, rows)
        if part.dtype == out.dtype:
            torch.mul(part, scale, out=out)
        else:  # half input: widen first, then scale in the compute dtype
            out.copy_(part).mul_(scale)

    def grad_out(self, rows: tuple[int, int, torch.Tensor], scratch: torch.Tensor) -> torch.Tensor:
        r0, b, _ = rows
        return self.grad[r0 : r0 + b] if r0 >= 0 else scratch  # written in place when the rows are consecutive

    def commit(self, rows: tuple[int, int, torch.Tensor], grow: torch.Tensor) -> None:
        if rows[0] < 0:
            self.grad.index_copy_(0, rows[2], grow)


class _EmbeddingRows(_RowSource):
    """Rows ``query_emb[rows] @ ref_emb^T`` computed per block; their gradient is pushed straight into the two
    embedding gradients (two matmuls), so no (Q, N) tensor exists. Blocks are larger than on a stored matrix (8M
    elements, at least 128 rows): the three matmuls per block need tall operands to run at full speed."""

    block_elements = (1 << 23, DEFAULT_BLOCK_ELEMENTS_GPU)
    min_rows = 128

    def __init__(self, query_emb: torch.Tensor, ref_emb: torch.Tensor, want_grad: bool) -> None:
        self.query, self.ref = query_emb, ref_emb
        self.d_query = torch.zeros_like(query_emb) if want_grad else None
        self.d_ref = torch.zeros_like(ref_emb) if want_grad else None

    def load(self, rows: tuple[int, int, torch.Tensor], scale: float, out: torch.Tensor) -> None:
        torch.mm(_take(self.query, rows), self.ref.T, out=out)
        out.mul_(scale)

    def commit(self, rows: tuple[int, int, torch.Tensor], grow: torch.Tensor) -> None:
        r0, b, idx = rows
        query_rows = _take(self.query, rows)
        if r0 >= 0:
            torch.mm(grow, self.ref, out=self.d_query[r0 : r0 + b])
        else:
            self.d_query.index_copy_(0, idx, grow @ self.ref)
        self.d_ref.addmm_(grow.T, query_rows)


class _RSkFromSimilarity(torch.autograd.Function):
    """Blocked RS@k over rows of ``sim``; the gradient is assembled block by block during forward."""

    @staticmethod
    def forward(ctx, sim, positives, params, block_size) -> torch.Tensor:  # type: ignore[override]
        cd = _compute_dtype(sim.dtype)
        want_grad = bool(ctx.needs_input_grad[0])
        grad = None
        if want_grad:
            grad = torch.empty(sim.shape, dtype=cd, device=sim.device)
            grad.index_fill_(0, torch.nonzero(positives.counts == 0).flatten(), 0.0)  # other rows: per block
        loss = _blocked_rsk(_SimilarityRows(sim, grad), sim.shape[1], positives, params, block_size, cd, want_grad)
        # Saved (not a plain ctx attribute) so that autograd drops its reference right after backward when the
        # graph is not retained: the gradient then reaches a leaf's .grad without a (Q, N) copy.
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.dtypes = (sim.dtype,)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return _scaled(grad, grad_out, ctx.dtypes[0]), None, None, None


class _RSkFromEmbeddings(torch.autograd.Function):
    """Blocked RS@k of ``query_emb @ ref_emb^T`` without storing it; both embedding gradients built in forward.

    Each block of query rows computes its similarity rows by a matmul, then its loss and its dL/ds rows, which
    are pushed into the embedding gradients at once (``dq[rows] = G ref_emb``, ``dref += G^T query_emb[rows]``).
    Peak extra memory: the two (rows, d) gradients plus one block (about ``(Pmax + 2) * block rows * N``
    elements), never the (Q, N) matrix. Time: one matmul more than forming ``s`` and back-propagating through it
    (``G E`` and ``G^T E`` are separate products when G is never stored).
    """

    @staticmethod
    def forward(ctx, query_emb, ref_emb, positives, params, block_size) -> torch.Tensor:  # type: ignore[override]
        cd = _compute_dtype(query_emb.dtype)
        want_grad = bool(ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        ctx.same = query_emb is ref_emb  # a batch against itself: one gradient, summed in the compute dtype
        query_cd = query_emb.to(cd)
        source = _EmbeddingRows(query_cd, query_cd if ctx.same else ref_emb.to(cd), want_grad)
        loss = _blocked_rsk(source, ref_emb.shape[0], positives, params, block_size, cd, want_grad)
        if want_grad:
            if ctx.same:
                ctx.save_for_backward(source.d_query.add_(source.d_ref))
            else:
                ctx.save_for_backward(source.d_query, source.d_ref)
        ctx.dtypes = (query_emb.dtype, ref_emb.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        if ctx.same:  # the tensor was passed twice: its whole gradient goes to the first, None to the second
            (d_emb,) = ctx.saved_tensors
            return _scaled(d_emb, grad_out, ctx.dtypes[0]), None, None, None, None
        d_query, d_ref = ctx.saved_tensors
        return _scaled(d_query, grad_out, ctx.dtypes[0]), _scaled(d_ref, grad_out, ctx.dtypes[1]), None, None, None


def _scaled(grad: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad * grad_out`` in ``dtype``; the usual ``loss.backward()`` (grad_out = 1) returns ``grad`` itself
    (autograd clones it if it must)."""
    if grad.dtype == dtype and bool(grad_out == 1):
        return grad
    return (grad * grad_out.to(grad.dtype)).to(dtype)


class TorchBackend:
    """The blocked torch Functions: any device, any floating dtype (fp16/bf16 computed in fp32, fp64 in fp64)."""

    name, requirement = "torch", "nothing"
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    def available(self, device: torch.device, auto: bool = False) -> bool:
        return True

    def from_similarity(self, sim, positives, params, block_size):  # type: ignore[no-untyped-def]
        return _RSkFromSimilarity.apply(sim, positives, params, block_size)

    def from_embeddings(self, query_emb, ref_emb, positives, params, block_size):  # type: ignore[no-untyped-def]
        return _RSkFromEmbeddings.apply(query_emb, ref_emb, positives, params, block_size)


register_backend(TorchBackend())
