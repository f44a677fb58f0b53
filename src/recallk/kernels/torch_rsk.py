"""RS@k loss from a similarity matrix: a blocked torch autograd Function (CPU and GPU).

The loss of method.md section 1, for queries ``q`` (rows of ``sim``) against a database (columns):

    D(q)      = every column except ``self_index[q]`` (kept when ``include_query``; never a positive)
    P(q)      = {j != self_index[q] : db_labels[j] == q_labels[q]}
    rank(q,p) = 1 + sum_{z in D(q), z != p} sig((s_qz - s_qp) / tau_rank)
    R^k(q)    = min(sum_{p in P(q)} sig((k - rank(q,p)) / tau_k), k) / min(k, |P(q)|)
    loss      = mean over queries with |P(q)| > 0 of (1 - mean_k R^k(q))

with ``sig(u) = 1 / (1 + exp(-u))`` and ``u`` clamped to [-50, 50].

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

The clamp of ``u`` to [-50, 50] is applied to every small sigmoid but skipped on the dense block, where it
cannot change a result: ``sig(50)`` already rounds to 1 in float32 and float64, and below -50 the clamped and
unclamped terms differ by less than 2e-22, which moves a rank (>= 1) by less than ``N * 2e-22``, below float64
resolution for any N under 500,000. ``torch.sigmoid`` itself is stable for any finite input. Likewise the
derivatives use ``sig (1 - sig)`` everywhere, where the clamped formula has 0 outside [-50, 50]: a difference
below 2e-22 / tau per term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "DEFAULT_BLOCK_ELEMENTS",
    "DEFAULT_BLOCK_ELEMENTS_GPU",
    "compute_dtype",
    "positive_layout",
    "rsk_loss_torch",
    "rsk_loss_torch_from_layout",
]

#: Elements of the (rows, Pmax, N) block buffer when ``block_size`` is None, on CPU (4 MiB in float32: large
#: enough to amortise the per-block Python overhead, small enough to stay in cache; tuned on a 2-core EPYC)
#: and on GPUs (128 MiB: enough work per kernel launch).
DEFAULT_BLOCK_ELEMENTS = 1 << 20
DEFAULT_BLOCK_ELEMENTS_GPU = 1 << 25

_CLAMP = 50.0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the loss is computed in: float64 for float64 input, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def positive_layout(
    q_labels: torch.Tensor, db_labels: torch.Tensor, self_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of each query's positives, padded to a rectangle.

    Args:
        q_labels: (Q,) int64 labels of the queries.
        db_labels: (N,) int64 labels of the database columns.
        self_index: (Q,) int64 column of each query in the database, or -1.

    Returns:
        ``(pos_idx, counts)``: ``pos_idx`` (Q, Pmax) int64 with the positive columns of query q, ascending, in
        ``pos_idx[q, :counts[q]]`` and 0 in the padding; ``counts`` (Q,) int64 = |P(q)|. ``Pmax = max(counts)``
        (possibly 0). Cost O(N log N + Q * max class size); no (Q, N) tensor is built.
    """
    device = q_labels.device
    n = db_labels.numel()
    q = q_labels.numel()
    if n == 0 or q == 0:
        zeros = torch.zeros(q, dtype=torch.long, device=device)
        return torch.zeros(q, 0, dtype=torch.long, device=device), zeros
    sorted_labels, order = torch.sort(db_labels, stable=True)
    lo = torch.searchsorted(sorted_labels, q_labels, side="left")
    hi = torch.searchsorted(sorted_labels, q_labels, side="right")
    width = int((hi - lo).max().item())
    if width == 0:
        zeros = torch.zeros(q, dtype=torch.long, device=device)
        return torch.zeros(q, 0, dtype=torch.long, device=device), zeros
    slots = lo[:, None] + torch.arange(width, device=device)
    valid = slots < hi[:, None]
    cols = order[slots.clamp_(max=n - 1)]
    valid &= cols != self_index[:, None]
    counts = valid.sum(1)
    # Move the valid slots to the front of each row (at most one hole per row: the query itself).
    key = torch.where(valid, torch.arange(width, device=device), width)
    perm = torch.sort(key, dim=1, stable=True).indices
    cols = cols.gather(1, perm)
    pmax = int(counts.max().item())
    cols = cols[:, :pmax]
    padding = torch.arange(pmax, device=device) >= counts[:, None]
    return cols.masked_fill_(padding, 0).contiguous(), counts


def _sig(u: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(u.clamp(-_CLAMP, _CLAMP))


class _RSkFromSimilarity(torch.autograd.Function):
    """Blocked RS@k over rows of ``sim``; the gradient is assembled block by block during forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        sim: torch.Tensor,
        pos_idx: torch.Tensor,
        counts: torch.Tensor,
        self_index: torch.Tensor,
        ks: torch.Tensor,
        tau_rank: float,
        tau_k: torch.Tensor,
        include_query: bool,
        block_size: int | None,
    ) -> torch.Tensor:
        cd = compute_dtype(sim.dtype)
        dev = sim.device
        n_db = sim.shape[1]
        want_grad = bool(ctx.needs_input_grad[0])
        ks = ks.to(device=dev, dtype=cd)
        tau_k = tau_k.to(device=dev, dtype=cd)
        inv_tau = 1.0 / tau_rank

        counts_cpu = counts.cpu()
        order = torch.argsort(counts_cpu, descending=True, stable=True)
        n_valid = int((counts_cpu > 0).sum())
        order = order[:n_valid]
        order_counts = counts_cpu[order].tolist()
        order_dev = order.to(dev)
        steps = order[1:] - order[:-1]  # 1 inside runs of consecutive rows, which need no gather/scatter
        # 1 / (number of queries * number of ks): the scale of each R^k in the loss, folded into g.
        scale = 1.0 / (n_valid * ks.numel())

        # Per-(query, positive) quantities, computed once for all queries (small: (Q, Pmax) and (Q, K)).
        pmax_all = pos_idx.shape[1]
        y_all = sim.gather(1, pos_idx).to(cd) * inv_tau  # positive similarities / tau_rank
        pmask_all = (torch.arange(pmax_all, device=dev) < counts[:, None]).to(cd)
        denom_all = torch.minimum(ks, counts[:, None].to(cd))  # min(k, |P|)
        # rank = 1 + (sum over every column) - sig(0) [z = p] - sig(u_self) [the excluded self column]
        rank_offset = torch.full_like(y_all, 0.5)
        exclude_self = (not include_query) and bool((self_index >= 0).any())
        if exclude_self:
            has_self = self_index >= 0
            x_self = sim.gather(1, self_index.clamp(min=0)[:, None]).to(cd) * inv_tau
            s_self = _sig(x_self - y_all) * has_self[:, None]
            rank_offset -= s_self
            ds_self = s_self * (1.0 - s_self)  # its sig', removed from the column sums of sig'
            every_row_has_self = bool(has_self.all())

        grad = None
        if want_grad:
            grad = torch.empty(sim.shape, dtype=cd, device=dev)
            grad.index_fill_(0, torch.nonzero(counts == 0).flatten(), 0.0)  # other rows: written per block
        total = torch.zeros((), dtype=cd, device=dev)
        buffer = torch.empty(0, dtype=cd, device=dev)
        # One buffer for the scaled rows of every block: a fresh (rows, N) tensor per block costs page faults on
        # the CPU (glibc returns freed large blocks to the OS), which cost as much as the arithmetic here.
        row_buffer = torch.empty(0, dtype=cd, device=dev)
        block_elements = DEFAULT_BLOCK_ELEMENTS if dev.type == "cpu" else DEFAULT_BLOCK_ELEMENTS_GPU

        start = 0
        while start < n_valid:
            pmax = order_counts[start]  # queries are sorted by count, so the first is the widest
            rows = block_size or max(1, block_elements // (pmax * n_db))
            stop = min(n_valid, start + rows)
            b = stop - start
            # A run of consecutive rows (the usual case: equal class sizes) is sliced, not gathered.
            r0 = int(order[start]) if bool((steps[start : stop - 1] == 1).all()) else -1
            blk = order_dev[start:stop]
            start = stop

            def rows_of(t: torch.Tensor, r0: int = r0, b: int = b, blk: torch.Tensor = blk) -> torch.Tensor:
                return t[r0 : r0 + b] if r0 >= 0 else t.index_select(0, blk)

            if row_buffer.numel() < b * n_db:
                row_buffer = torch.empty(b * n_db, dtype=cd, device=dev)
            x = row_buffer[: b * n_db].view(b, n_db)  # (b, N) scaled rows
            if sim.dtype == cd:
                torch.mul(rows_of(sim), inv_tau, out=x)
            else:  # half input: widen first, then scale in the compute dtype
                x.copy_(rows_of(sim)).mul_(inv_tau)
            y = rows_of(y_all)[:, :pmax]  # (b, P)
            pmask = rows_of(pmask_all)[:, :pmax]
            denom = rows_of(denom_all)  # (b, K)

            need = b * pmax * n_db
            if buffer.numel() < need:
                buffer = torch.empty(need, dtype=cd, device=dev)
            terms = buffer[:need].view(b, pmax, n_db)
            torch.sub(x[:, None, :], y[:, :, None], out=terms)
            terms.sigmoid_()  # no clamp needed here: see the module docstring
            rank = terms.sum(-1).add_(rows_of(rank_offset)[:, :pmax])  # (b, P)

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
            if r0 >= 0:  # written straight into the gradient rows
                grow = grad[r0 : r0 + b]
                torch.bmm(g[:, None, :], terms, out=grow.view(b, 1, n_db))  # sum_p g_p sig'_pz
            else:
                grow = torch.bmm(g[:, None, :], terms).squeeze(1)
            diag = terms.sum(-1)  # (b, P): sum over every column of sig'_pz
            if exclude_self:
                diag -= rows_of(ds_self)[:, :pmax]
            # d/ds_qp: the z = p terms of grow (g_p / 4) and diag (1 / 4) cancel in grow_p - g_p * diag_p.
            grow.scatter_add_(1, rows_of(pos_idx)[:, :pmax], diag.mul_(g).neg_())
            if exclude_self:  # the excluded self column gets no gradient
                selfc = rows_of(self_index)[:, None]
                if every_row_has_self:
                    grow.scatter_(1, selfc, 0.0)
                else:
                    keep = (selfc < 0).to(cd)
                    selfc = selfc.clamp(min=0)
                    grow.scatter_(1, selfc, grow.gather(1, selfc) * keep)
            if r0 < 0:
                grad.index_copy_(0, blk, grow)

        # Saved (not a plain ctx attribute) so that autograd drops its reference right after backward when the
        # graph is not retained: the gradient then reaches a leaf's .grad without a (Q, N) copy.
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.sim_dtype = sim.dtype
        return 1.0 - total * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        if grad.dtype == ctx.sim_dtype and bool(grad_out == 1):
            out = grad  # the usual loss.backward(): no copy (autograd clones it if it must)
        else:
            out = (grad * grad_out.to(grad.dtype)).to(ctx.sim_dtype)
        return out, None, None, None, None, None, None, None, None


def rsk_loss_torch(
    sim: torch.Tensor,
    q_labels: torch.Tensor,
    db_labels: torch.Tensor,
    self_index: torch.Tensor | None,
    ks: Sequence[int],
    tau_rank: float,
    tau_k: Sequence[float] | torch.Tensor,
    include_query: bool,
    block_size: int | None = None,
) -> torch.Tensor:
    """RS@k loss from a similarity matrix with the blocked torch Function (no input checks; see
    :func:`recallk.kernels.rsk_loss_from_similarity` for the checked entry point).

    Args:
        sim: (Q, N) floating similarities (fp16/bf16 computed in fp32, fp64 in fp64).
        q_labels: (Q,) int64. db_labels: (N,) int64.
        self_index: (Q,) int64 column of each query in the database or -1; None means all -1.
        ks: the k values. tau_rank: rank temperature. tau_k: (len(ks),) temperatures of the k sigmoids.
        include_query: keep the query's own column in its ranking database (authors' behaviour).
        block_size: query rows per block; None picks rows so a block holds about ``DEFAULT_BLOCK_ELEMENTS``
            (``DEFAULT_BLOCK_ELEMENTS_GPU`` off the CPU).

    Returns:
        Scalar tensor in the compute dtype (float32, or float64 for float64 input).
    """
    q = sim.shape[0]
    if self_index is None:
        self_index = torch.full((q,), -1, dtype=torch.long, device=sim.device)
    q_labels = q_labels.to(device=sim.device, dtype=torch.long)
    db_labels = db_labels.to(device=sim.device, dtype=torch.long)
    self_index = self_index.to(device=sim.device, dtype=torch.long)
    from recallk.losses.validation import check_has_positive  # lazy: recallk.losses imports this package

    pos_idx, counts = positive_layout(q_labels, db_labels, self_index)
    check_has_positive(counts)
    return rsk_loss_torch_from_layout(
        sim, pos_idx, counts, self_index, ks, tau_rank, tau_k, include_query, block_size
    )


def rsk_loss_torch_from_layout(
    sim: torch.Tensor,
    pos_idx: torch.Tensor,
    counts: torch.Tensor,
    self_index: torch.Tensor,
    ks: Sequence[int],
    tau_rank: float,
    tau_k: Sequence[float] | torch.Tensor,
    include_query: bool,
    block_size: int | None = None,
) -> torch.Tensor:
    """:func:`rsk_loss_torch` with the output of :func:`positive_layout` already computed (at least one
    query must have a positive; ``self_index`` is a (Q,) int64 tensor, -1 where absent)."""
    ks_t = torch.tensor([float(k) for k in ks], dtype=torch.float64)
    tau_k_t = torch.as_tensor(tau_k, dtype=torch.float64).reshape(-1)
    if tau_k_t.numel() == 1:
        tau_k_t = tau_k_t.expand(ks_t.numel())
    return _RSkFromSimilarity.apply(
        sim, pos_idx, counts, self_index, ks_t, float(tau_rank), tau_k_t, bool(include_query), block_size
    )
