"""RS@k loss by blocks of query rows in plain torch (CPU and GPU): from a similarity matrix, or from embeddings
without ever storing the similarity matrix.

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

From embeddings (:func:`rsk_loss_torch_from_embeddings`) the same block loop computes each block's similarity
rows by a matmul and sends its finished gradient rows straight into the embedding gradients, so neither the
``(Q, N)`` similarity nor its gradient is ever stored: the batch size is limited by time, not memory.

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
    "rsk_loss_torch_from_embeddings",
]

#: Elements of the (rows, Pmax, N) block buffer when ``block_size`` is None, on CPU (8 MiB in float32: large
#: enough to amortise the per-block Python overhead, small enough to stay in the 32 MiB L3; on a 2-core EPYC,
#: loss alone, |P| = 3: B = 2000 11.3 ms with 4 MiB blocks, 10.1-10.9 ms with 8 MiB; B = 4000 63.6 -> 56.3 ms)
#: and on GPUs (128 MiB: enough work per kernel launch).
DEFAULT_BLOCK_ELEMENTS = 1 << 21
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
    source: _RowSource,
    n_db: int,
    pos_idx: torch.Tensor,
    counts: torch.Tensor,
    self_index: torch.Tensor,
    ks: torch.Tensor,
    tau_rank: float,
    tau_k: torch.Tensor,
    include_query: bool,
    block_size: int | None,
    cd: torch.dtype,
    want_grad: bool,
) -> torch.Tensor:
    """The loss over every query, block of rows by block of rows; with ``want_grad`` each block's dL/ds rows go to
    ``source``. Returns the scalar loss in ``cd`` (see the module docstring for the maths)."""
    dev = pos_idx.device
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
    exclude_self = (not include_query) and bool((self_index >= 0).any())
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
        b = min(n_valid - start, block_size or max(source.min_rows, block_elements // (pmax * n_db)))
        stop = start + b
        # A run of consecutive rows (the usual case: equal class sizes) is sliced, not gathered.
        r0 = int(order[start]) if bool((steps[start : stop - 1] == 1).all()) else -1
        rows = (r0, b, order_dev[start:stop])
        start = stop

        if rows_buf.numel() < b * n_db:
            rows_buf = torch.empty(b * n_db, dtype=cd, device=dev)
        x = rows_buf[: b * n_db].view(b, n_db)
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

        need = b * pmax * n_db
        if terms_buf.numel() < need:
            terms_buf = torch.empty(need, dtype=cd, device=dev)
        terms = terms_buf[:need].view(b, pmax, n_db)
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
        if grad_buf.numel() < b * n_db:
            grad_buf = torch.empty(b * n_db, dtype=cd, device=dev)
        grow = source.grad_out(rows, grad_buf[: b * n_db].view(b, n_db))
        torch.bmm(g[:, None, :], terms, out=grow.view(b, 1, n_db))  # sum_p g_p sig'_pz
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
    """Rows ``q_emb[rows] @ db_emb^T`` computed per block; their gradient is pushed straight into dL/dq_emb and
    dL/ddb_emb (two matmuls), so no (Q, N) tensor exists. Blocks are larger than on a stored matrix (8M elements,
    at least 128 rows): the three matmuls per block need tall operands to run at full speed (measured on the 2-core
    CPU at B = 8192: 42 rows 2.35 s, 256 rows 1.47 s, the matrix path 1.42 s)."""

    block_elements = (1 << 23, DEFAULT_BLOCK_ELEMENTS_GPU)
    min_rows = 128

    def __init__(self, q_emb: torch.Tensor, db_emb: torch.Tensor, want_grad: bool) -> None:
        self.q, self.db = q_emb, db_emb
        self.dq = torch.zeros_like(q_emb) if want_grad else None
        self.ddb = torch.zeros_like(db_emb) if want_grad else None

    def load(self, rows: tuple[int, int, torch.Tensor], scale: float, out: torch.Tensor) -> None:
        torch.mm(_take(self.q, rows), self.db.T, out=out)
        out.mul_(scale)

    def commit(self, rows: tuple[int, int, torch.Tensor], grow: torch.Tensor) -> None:
        r0, b, idx = rows
        q_rows = _take(self.q, rows)
        if r0 >= 0:
            torch.mm(grow, self.db, out=self.dq[r0 : r0 + b])
        else:
            self.dq.index_copy_(0, idx, grow @ self.db)
        self.ddb.addmm_(grow.T, q_rows)


class _RSkFromSimilarity(torch.autograd.Function):
    """Blocked RS@k over rows of ``sim``; the gradient is assembled block by block during forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, sim, pos_idx, counts, self_index, ks, tau_rank, tau_k, include_query, block_size,
    ) -> torch.Tensor:  # fmt: skip
        cd = compute_dtype(sim.dtype)
        want_grad = bool(ctx.needs_input_grad[0])
        grad = None
        if want_grad:
            grad = torch.empty(sim.shape, dtype=cd, device=sim.device)
            grad.index_fill_(0, torch.nonzero(counts == 0).flatten(), 0.0)  # other rows: written per block
        loss = _blocked_rsk(
            _SimilarityRows(sim, grad), sim.shape[1], pos_idx, counts, self_index, ks, tau_rank, tau_k,
            include_query, block_size, cd, want_grad,
        )  # fmt: skip
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
        return _scaled(grad, grad_out, ctx.dtypes[0]), None, None, None, None, None, None, None, None


class _RSkFromEmbeddings(torch.autograd.Function):
    """Blocked RS@k of ``q_emb @ db_emb^T`` without storing it; dL/dq_emb and dL/ddb_emb built during forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, q_emb, db_emb, pos_idx, counts, self_index, ks, tau_rank, tau_k, include_query, block_size,
    ) -> torch.Tensor:  # fmt: skip
        cd = compute_dtype(q_emb.dtype)
        want_grad = bool(ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        ctx.same = q_emb is db_emb  # a batch against itself: one gradient, summed in the compute dtype
        q_cd = q_emb.to(cd)
        source = _EmbeddingRows(q_cd, q_cd if ctx.same else db_emb.to(cd), want_grad)
        loss = _blocked_rsk(
            source, db_emb.shape[0], pos_idx, counts, self_index, ks, tau_rank, tau_k, include_query, block_size,
            cd, want_grad,
        )  # fmt: skip
        if want_grad:
            if ctx.same:
                ctx.save_for_backward(source.dq.add_(source.ddb))
            else:
                ctx.save_for_backward(source.dq, source.ddb)
        ctx.dtypes = (q_emb.dtype, db_emb.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        rest = (None,) * 8
        if ctx.same:  # the tensor was passed twice: its whole gradient goes to the first, None to the second
            (d_emb,) = ctx.saved_tensors
            return _scaled(d_emb, grad_out, ctx.dtypes[0]), None, *rest
        dq, ddb = ctx.saved_tensors
        return _scaled(dq, grad_out, ctx.dtypes[0]), _scaled(ddb, grad_out, ctx.dtypes[1]), *rest


def _scaled(grad: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad * grad_out`` in ``dtype``; the usual ``loss.backward()`` (grad_out = 1) returns ``grad`` itself
    (autograd clones it if it must)."""
    if grad.dtype == dtype and bool(grad_out == 1):
        return grad
    return (grad * grad_out.to(grad.dtype)).to(dtype)


def _prepare(
    q_labels: torch.Tensor,
    db_labels: torch.Tensor,
    self_index: torch.Tensor | None,
    ks: Sequence[int],
    tau_k: Sequence[float] | torch.Tensor,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pos_idx, counts, self_index, ks, tau_k)`` for the Functions; raises when no query has a positive."""
    from recallk.losses.validation import check_has_positive  # lazy: recallk.losses imports this package

    if self_index is None:
        self_index = torch.full((q_labels.numel(),), -1, dtype=torch.long, device=device)
    q_labels = q_labels.to(device=device, dtype=torch.long)
    db_labels = db_labels.to(device=device, dtype=torch.long)
    self_index = self_index.to(device=device, dtype=torch.long)
    pos_idx, counts = positive_layout(q_labels, db_labels, self_index)
    check_has_positive(counts)
    ks_t = torch.tensor([float(k) for k in ks], dtype=torch.float64)
    tau_k_t = torch.as_tensor(tau_k, dtype=torch.float64).reshape(-1)
    if tau_k_t.numel() == 1:
        tau_k_t = tau_k_t.expand(ks_t.numel())
    return pos_idx, counts, self_index, ks_t, tau_k_t


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
    pos_idx, counts, self_index, ks_t, tau_k_t = _prepare(q_labels, db_labels, self_index, ks, tau_k, sim.device)
    return _RSkFromSimilarity.apply(
        sim, pos_idx, counts, self_index, ks_t, float(tau_rank), tau_k_t, bool(include_query), block_size
    )


def rsk_loss_torch_from_embeddings(
    q_emb: torch.Tensor,
    db_emb: torch.Tensor,
    q_labels: torch.Tensor,
    db_labels: torch.Tensor,
    self_index: torch.Tensor | None,
    ks: Sequence[int],
    tau_rank: float,
    tau_k: Sequence[float] | torch.Tensor,
    include_query: bool,
    block_size: int | None = None,
) -> torch.Tensor:
    """RS@k loss of ``s = q_emb @ db_emb^T`` without storing it (no input checks; see
    :func:`recallk.kernels.rsk_loss_from_embeddings`).

    Each block of query rows computes its similarity rows by a matmul, then its loss and its dL/ds rows, which
    are pushed into the embedding gradients at once (``dq[rows] = G db_emb``, ``ddb += G^T q_emb[rows]``). Peak
    extra memory: the two (rows, d) gradients plus one block (about ``(Pmax + 2) * block rows * N`` elements),
    never the (Q, N) matrix. Time: one matmul more than forming ``s`` and back-propagating through it (``G E`` and
    ``G^T E`` are separate products when G is never stored; docs/benchmarks.md: +37% at B = 2000 on the CPU,
    +4% at B = 16,384).

    Args:
        q_emb: (Q, d) and db_emb: (N, d) floating embeddings (may be the same tensor: a batch against itself).
        The rest: as :func:`rsk_loss_torch`.

    Returns:
        Scalar tensor in the compute dtype; gradients reach both embedding tensors (summed when they are one).
    """
    pos_idx, counts, self_index, ks_t, tau_k_t = _prepare(q_labels, db_labels, self_index, ks, tau_k, q_emb.device)
    return _RSkFromEmbeddings.apply(
        q_emb, db_emb, pos_idx, counts, self_index, ks_t, float(tau_rank), tau_k_t, bool(include_query), block_size
    )
