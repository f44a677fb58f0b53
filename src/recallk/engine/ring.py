"""Ring mode of the sharded RS@k loss (issue 26): no process ever holds all B embeddings of the global batch.

Each rank owns the rows of its slice of the global batch (rank 0's first) and, with SiMix, the virtual items
whose first item ``a`` it owns. The augmented set is ordered as one process orders it (real items, then
virtual items in pair order), so ``self_index`` is each item's own global position. For a query ``q`` of this
rank (notation of :mod:`recallk.kernels.rsk`, ``u = (s_qz - s_qp) / tau_rank`` clamped to [-CLAMP, CLAMP])

    rank(q, p) = 1 + sum_{z in D(q), z != p} sig(u_qpz)

is a sum over reference columns, so it is accumulated block by block while the blocks of the other ranks
(their rows, (n_s, d)) travel around the ring ``rank -> rank + 1``:

- round 0 (SiMix only): the real blocks pass once; each rank copies the partners ``b`` of its virtual items;
- round 1: each own query's positive similarities ``s_qp`` are taken when a positive's block passes;
- round 2: ``rank(q, p)`` and ``sum_z sig'(u_qpz)`` (``sig' = sig (1 - sig)``) are accumulated;
- then R^k and the loss of the own queries are local (:func:`_recall_sum`), the global mean needs one
  all-reduce of a scalar, and ``G = dL/d rank`` is local;
- round 3 (the backward ring): each block travels with its gradient accumulator (n_s, d); the visited rank
  recomputes the block's sigmoids and adds ``dL/ds_qz = sum_p G_qp sig'(u_qpz) / tau_rank`` (z != p, z in D(q))
  and ``dL/ds_qp = -G_qp sum_z sig'(u_qpz) / tau_rank`` to its own queries' gradient and to the block's
  accumulator (``dq += dL/ds e_z``, ``de_z += dL/ds q``); after N transfers every block is home, complete;
- round 4 (SiMix only): ``v = alpha a + (1 - alpha) b`` sends ``alpha dv`` to ``a`` (own) and ``(1 - alpha) dv``
  to ``b`` through one more ring of per-rank accumulators.

The dense sigmoids of a block skip the clamp, as the torch backend's do (:mod:`recallk.kernels.torch_rsk`): it
cannot change a result (``sig(50)`` rounds to 1 in float32 and float64; below -50 the clamped and unclamped terms
differ by less than 2e-22); the few terms removed again (z = p, the query's own column) are clamped.

Memory per rank: its own rows (n_r + V_r, d) and their gradient; in rounds 0-2 the visiting block and the
next one arriving (the transfer overlaps the work); in rounds 3-4 one block and its (n_s, d) accumulator, moved
in place piece by piece (``RING_PIECE_ELEMENTS``); six (Q_r, Pmax) statistics and one chunk of query rows
against the block (sigmoids, similarities, gradient rows: ``block_elements`` elements). That is
O((B / N) d + Q_r Pmax), never an (n_r, B) matrix. Time: each rank computes the sigmoids of its own queries
against every column twice (round 2 and round 3, as Inf-CL recomputes in its backward pass, since a row's
gradient needs its rank over every column), so 2/N of one process's sigmoid terms, plus N - 1 to 3N transfers
of a block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from recallk import checks
from recallk.kernels.rsk import CLAMP, RSkParams, no_autocast, positive_layout
from recallk.losses.base import unit_rows
from recallk.losses.rsk import RecallAtKSurrogate
from recallk.losses.simix import _alphas, simix_pairs

__all__ = [
    "DEFAULT_RING_BLOCK_ELEMENTS",
    "DEFAULT_RING_BLOCK_ELEMENTS_GPU",
    "RING_PIECE_ELEMENTS",
    "ring_loss_and_grad",
]

#: Elements of one chunk of query rows against one visiting block: its (rows, Pmax, n_block) sigmoids and its
#: (rows, n_block) similarities and gradient rows together, unless ``block_elements`` says otherwise: on the CPU
#: 8 MiB in float32 (the torch backend's CPU block, sized for the cache), on GPUs 128 MiB (enough work per kernel
#: launch, as the torch backend's GPU block).
DEFAULT_RING_BLOCK_ELEMENTS = 1 << 21
DEFAULT_RING_BLOCK_ELEMENTS_GPU = 1 << 25

#: Elements of one piece of a block that moves in place (round 3 and 4: :meth:`_Ring.shift`), 1 MiB in float32.
RING_PIECE_ELEMENTS = 1 << 18

_HALF = (torch.float16, torch.bfloat16)
_Rows = Callable[[int], int]  # rows of block s
_Visit = Callable[[int, torch.Tensor], None]  # what a rank does with block s when it passes
_Carry = Callable[[int, "torch.Tensor | None", torch.Tensor], None]  # the same, with the block's accumulator


def _sig(u: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(u.clamp(-CLAMP, CLAMP))


def _recall_sum(rank: torch.Tensor, counts: torch.Tensor, params: RSkParams) -> torch.Tensor:
    """``sum_q sum_k min(sum_{p in P(q)} sig((k - rank(q,p)) / tau_k), k) / min(k, |P(q)|)`` over queries with a
    positive: ``rank`` (Q, Pmax) (padding beyond ``counts[q]`` ignored), ``counts`` (Q,) >= 1. The one place
    ring mode writes R^k; the loss is ``1 - this / (queries with a positive * len(ks))`` (kernels/rsk.py)."""
    ks = torch.tensor([float(k) for k in params.ks], dtype=rank.dtype, device=rank.device)
    tau_k = torch.tensor(params.tau_k, dtype=rank.dtype, device=rank.device)
    pmask = torch.arange(rank.shape[1], device=rank.device) < counts[:, None]
    a = _sig((ks - rank[..., None]) / tau_k) * pmask[..., None].to(rank.dtype)  # (Q, P, K)
    denom = torch.minimum(ks, counts[:, None].to(rank.dtype))
    return (torch.minimum(a.sum(1), ks) / denom).sum()


class _Layout:
    """The augmented global batch as every rank knows it (labels and SiMix pairs are cheap; rows are not).

    Global augmented index: real item ``i`` -> ``i``; virtual item ``j`` (pair order) -> ``B + j``. Block ``s`` is
    rank s's real rows then its virtual items (those whose ``a`` it owns: a contiguous range of pairs, since the
    pairs are in lexicographic order of (a, b)).
    """

    def __init__(self, sizes: list[int], labels: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor] | None,
                 alphas: torch.Tensor | None) -> None:  # fmt: skip
        self.sizes = sizes
        self.starts = [sum(sizes[:s]) for s in range(len(sizes))]
        self.n_real = sum(sizes)
        device = labels.device
        if pairs is None:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            pairs, alphas = (empty, empty), torch.zeros(0, dtype=torch.float64, device=device)
        self.a, self.b = pairs
        self.alphas = alphas
        bounds = torch.tensor([*self.starts, self.n_real], dtype=torch.long, device=device)
        vbounds = torch.searchsorted(self.a, bounds).tolist()  # pairs of rank s: vbounds[s] .. vbounds[s + 1]
        self.vstarts = vbounds[:-1]
        self.vsizes = [vbounds[s + 1] - vbounds[s] for s in range(len(sizes))]
        self.labels = torch.cat([labels, labels[self.a]])  # (B + V,) augmented labels

    def block_size(self, s: int) -> int:
        return self.sizes[s] + self.vsizes[s]

    def global_index(self, s: int) -> torch.Tensor:
        """(n_s + V_s,) global augmented indices of block ``s``'s rows, in block order."""
        device = self.labels.device
        real = torch.arange(self.starts[s], self.starts[s] + self.sizes[s], device=device)
        virtual = torch.arange(self.vstarts[s], self.vstarts[s] + self.vsizes[s], device=device) + self.n_real
        return torch.cat([real, virtual])

    def local(self, s: int, index: torch.Tensor) -> torch.Tensor:
        """Row of each global augmented ``index`` inside block ``s``, -1 where it is in another block."""
        start, n = self.starts[s], self.sizes[s]
        vstart, nv = self.n_real + self.vstarts[s], self.vsizes[s]
        real = (index >= start) & (index < start + n)
        virtual = (index >= vstart) & (index < vstart + nv)
        out = torch.full_like(index, -1)
        out = torch.where(real, index - start, out)
        return torch.where(virtual, index - vstart + n, out)


class _Ring:
    """Point-to-point transfers to ``rank + 1`` and from ``rank - 1`` of the default process group."""

    def __init__(self) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.next, self.prev = (self.rank + 1) % self.world, (self.rank - 1) % self.world

    def start(self, send: torch.Tensor, recv: torch.Tensor, tag: int = 0) -> list:
        ops = [dist.P2POp(dist.isend, send, self.next, tag=tag), dist.P2POp(dist.irecv, recv, self.prev, tag=tag)]
        return dist.batch_isend_irecv(ops)

    def visit(self, own: torch.Tensor, rows_of: _Rows, visit: _Visit) -> None:
        """Pass ``own`` (this rank's block) around the ring; ``visit(s, block)`` sees every block once, while the
        transfer of that block to the next rank is under way. ``rows_of(s)``: rows of block ``s``."""
        block = own
        for t in range(self.world):
            s = (self.rank - t) % self.world
            pending = []
            if t < self.world - 1:
                incoming = block.new_empty((rows_of((s - 1) % self.world), *block.shape[1:]))
                pending = self.start(block, incoming, tag=1)
            visit(s, block)
            for request in pending:
                request.wait()
            if pending:
                block = incoming

    def shift(self, buffer: torch.Tensor, n_send: int, n_recv: int, piece: torch.Tensor) -> None:
        """Send ``buffer[:n_send]`` to the next rank and receive the previous rank's ``n_recv`` rows into
        ``buffer[:n_recv]``, in place: piece by piece through ``piece`` (rows of a piece, ...), so that the block
        that leaves and the block that arrives never both exist in full."""
        step = piece.shape[0]
        for lo in range(0, max(n_send, n_recv), step):
            up_send, up_recv = min(n_send, lo + step), min(n_recv, lo + step)
            ops = []
            if up_send > lo:
                ops.append(dist.P2POp(dist.isend, buffer[lo:up_send], self.next, tag=2))
            if up_recv > lo:
                ops.append(dist.P2POp(dist.irecv, piece[: up_recv - lo], self.prev, tag=2))
            for request in dist.batch_isend_irecv(ops):
                request.wait()
            if up_recv > lo:
                buffer[lo:up_recv] = piece[: up_recv - lo]

    def carry(self, own: torch.Tensor | None, like: torch.Tensor, rows_of: _Rows, visit: _Carry) -> torch.Tensor:
        """Pass this rank's block ``own`` (read only; None: no block) with its accumulator (zeros at first, rows
        of ``like``'s width, dtype and device; changed in place by ``visit(s, block, acc)`` on each rank) around
        the ring, and the accumulator on back home. Both travel in place (:meth:`shift`) in buffers of the
        largest block's rows. Returns the accumulator of this rank's block, with every rank's contribution."""
        most = max(rows_of(s) for s in range(self.world))
        width = like.shape[1:]
        piece = like.new_empty((max(1, RING_PIECE_ELEMENTS // max(1, width.numel())), *width))
        acc_buffer = like.new_zeros((most, *width))
        block_buffer = None
        if own is not None:
            block_buffer = own.new_empty((most, *own.shape[1:]))
            block_buffer[: own.shape[0]] = own
        for t in range(self.world):
            s, previous = (self.rank - t) % self.world, (self.rank - t - 1) % self.world
            n = rows_of(s)
            visit(s, None if block_buffer is None else block_buffer[:n], acc_buffer[:n])
            if self.world > 1:
                self.shift(acc_buffer, n, rows_of(previous), piece)
                if block_buffer is not None and t < self.world - 1:  # the block itself need not come home
                    self.shift(block_buffer, n, rows_of(previous), piece)
        return acc_buffer[: rows_of(self.rank)]


def _gather_labels(labels: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's (n_s,) labels, concatenated in rank order."""
    padded = labels.new_zeros(max(sizes))
    padded[: labels.numel()] = labels
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def _checked_input(criterion: object, embeddings: object, labels: object) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(criterion, RecallAtKSurrogate):
        raise ValueError(f"ring mode computes RS@k only (a RecallAtKSurrogate), got {type(criterion).__name__}: "
                         "use train.loss_sharding=rows (or replicate) for other losses")
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or not embeddings.is_floating_point():
        raise ValueError("embeddings must be a floating (n_r, d) tensor: this rank's rows of the global batch")
    emb = embeddings if embeddings.shape[0] == 0 else checks.check_embeddings(embeddings)
    return emb, checks.check_labels(labels, emb.shape[0]).to(emb.device)


def ring_loss_and_grad(
    criterion: RecallAtKSurrogate, embeddings: torch.Tensor, labels: torch.Tensor, scale: float = 1.0,
    block_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """RS@k of the global batch and this rank's rows of its gradient, the rows of other ranks passed around a
    ring (Inf-CL style, see the module docstring) so that no rank holds the whole batch.

    Collective over the default ``torch.distributed`` process group: every rank calls it, with its own rows in
    rank order (rank 0's rows are the first of the global batch). With SiMix every rank's ``criterion.generator``
    must hold the same state (the engine broadcasts rank 0's); it advances as in one process.

    Args:
        criterion: the RS@k loss (its ks, temperatures, include_query, simix, max_pairs_per_class,
            normalize_embeddings; its backend and memory settings do not apply here).
        embeddings: (n_r, d) this rank's pass-1 rows, float16/bfloat16/float32/float64 (half computed in
            float32), not yet normalised: the loss's ``normalize_embeddings`` rule (``losses.base.unit_rows``) is
            applied row by row here. n_r may differ between ranks (0 allowed).
        labels: (n_r,) integer labels of those rows.
        scale: multiplies the returned gradient (a GradScaler's scale, or dL_total/dL).
        block_elements: elements of one chunk of query rows against a block: (rows, Pmax + 2, n_block), at least
            one row (default ``DEFAULT_RING_BLOCK_ELEMENTS`` on the CPU, ``DEFAULT_RING_BLOCK_ELEMENTS_GPU``
            elsewhere); fewer means less memory and more Python overhead.

    Returns:
        ``(loss, grad)``: the global-batch loss, a detached scalar identical on every rank (float64 for float64
        input, float32 otherwise), equal to ``criterion(all_rows, all_labels)`` of one process; and
        ``dL/d embeddings * scale``, (n_r, d) in ``embeddings``' dtype.

    Raises:
        ValueError (on every rank, so that none waits for the others): a criterion other than RS@k, NaN/Inf or
        overflowing embeddings, wrong shapes or dtypes on any rank, widths that differ between ranks, or no query
        of the global batch with a positive. RuntimeError when no process group is initialised.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring_loss_and_grad is collective: call torch.distributed.init_process_group first "
                           "(recallk.engine.init_distributed under torchrun)")
    error: ValueError | None = None
    try:
        emb, labels = _checked_input(criterion, embeddings, labels)
        n_rows, width = emb.shape
    except ValueError as err:
        error, n_rows, width = err, 0, -1
    device = embeddings.device if isinstance(embeddings, torch.Tensor) else torch.device("cpu")
    header = torch.tensor([n_rows, width, int(error is not None)], dtype=torch.long, device=device)
    headers = [torch.empty_like(header) for _ in range(dist.get_world_size())]
    dist.all_gather(headers, header)
    failed = [s for s, h in enumerate(headers) if int(h[2])]
    if failed:
        raise error or ValueError(f"ring_loss_and_grad: rank(s) {failed} rejected their input (see their error)")
    widths = {int(h[1]) for h in headers if int(h[0]) > 0}
    if len(widths) > 1:
        raise ValueError(f"the ranks' embeddings have different widths {sorted(widths)}: every rank must run one "
                         "model")
    sizes = [int(h[0]) for h in headers]
    if sum(sizes) == 0:
        raise ValueError("the global batch is empty (every rank has 0 rows)")
    with no_autocast(device):
        default = DEFAULT_RING_BLOCK_ELEMENTS if device.type == "cpu" else DEFAULT_RING_BLOCK_ELEMENTS_GPU
        return _ring(criterion, emb, labels, sizes, float(scale), block_elements or default)


def _ring(criterion: RecallAtKSurrogate, embeddings: torch.Tensor, labels: torch.Tensor, sizes: list[int],
          scale: float, block_elements: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    ring = _Ring()
    rank, device, params = ring.rank, embeddings.device, criterion.params
    cd = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    inv_tau = 1.0 / params.tau_rank

    leaf = embeddings.detach().requires_grad_(True)
    with torch.enable_grad():
        unit = leaf.float() if leaf.dtype in _HALF else leaf
        unit = unit_rows(unit) if criterion.normalize_embeddings and unit.shape[0] else unit
    real = unit.detach().to(cd)

    global_labels = _gather_labels(labels, sizes)
    pairs = alphas = None
    if criterion.simix:  # the draws of simix_embeddings / simix, from the (shared) generator state
        pairs = simix_pairs(global_labels, criterion.max_pairs_per_class, criterion.generator)
        alphas = _alphas(pairs[0].numel(), None, criterion.generator)
    layout = _Layout(sizes, global_labels, pairs, alphas)
    _, inverse, class_sizes = torch.unique(layout.labels, return_inverse=True, return_counts=True)
    n_valid = int((class_sizes[inverse] >= 2).sum())
    if n_valid == 0:
        raise ValueError(checks.NO_POSITIVE_MESSAGE)
    total_scale = 1.0 / (n_valid * len(params.ks))

    # This rank's augmented rows: real rows, then its virtual items (round 0 fetches the partners b).
    start, n_own, vstart, n_virtual = layout.starts[rank], sizes[rank], layout.vstarts[rank], layout.vsizes[rank]
    own_a = layout.a[vstart : vstart + n_virtual] - start
    own_b = layout.b[vstart : vstart + n_virtual]
    weights = layout.alphas[vstart : vstart + n_virtual].to(device=device, dtype=cd)
    if criterion.simix:
        partners = real.new_zeros((n_virtual, real.shape[1]))

        def fetch(s: int, block: torch.Tensor) -> None:
            here = (own_b >= layout.starts[s]) & (own_b < layout.starts[s] + sizes[s])
            partners[here] = block[own_b[here] - layout.starts[s]]

        ring.visit(real, lambda s: sizes[s], fetch)
        own_rows = torch.cat([real, torch.lerp(partners, real[own_a], weights[:, None])])
    else:
        own_rows = real
    own_index = layout.global_index(rank)
    own_labels = layout.labels[own_index]
    columns, counts = positive_layout(own_labels, layout.labels, own_index)  # (Q, Pmax) global columns
    pmax_all = columns.shape[1]
    slot = torch.arange(pmax_all, device=device)

    # Chunks of own query rows with a positive, widest first, sized for each block's width.
    order = torch.argsort(counts, descending=True, stable=True)
    order = order[: int((counts > 0).sum())]
    order_counts = counts[order].tolist()

    def chunks(n_block: int) -> list[tuple[torch.Tensor, int]]:
        """Own query rows in chunks whose (rows, Pmax, n_block) sigmoids and (rows, n_block) similarity and
        gradient rows hold ``block_elements`` elements together (at least one row)."""
        out, i = [], 0
        while i < len(order_counts) and n_block:
            pmax = order_counts[i]
            rows = max(1, block_elements // ((pmax + 2) * n_block))
            out.append((order[i : i + rows], pmax))
            i += rows
        return out

    def scaled_similarity(rows: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        return torch.mm(own_rows.index_select(0, rows), block.T).mul_(inv_tau)  # (c, n_block): s / tau_rank

    # Round 1: y = s_qp / tau_rank, one inner product per positive when its block passes (Q_r Pmax d in all, not
    # a matmul per block; the terms of round 2 and 3 that are no part of the rank are removed with the values
    # those rounds compute, so y need not equal their matmul's values bit for bit).
    y = real.new_zeros((own_rows.shape[0], pmax_all))

    def positive_similarities(s: int, block: torch.Tensor) -> None:
        for rows, pmax in chunks(own_rows.shape[1]):  # (rows, Pmax, d) gathered rows at most per chunk
            local = layout.local(s, columns[rows, :pmax])
            query, slot_of = torch.nonzero((local >= 0) & (slot[:pmax] < counts[rows, None]), as_tuple=True)
            if query.numel():
                products = own_rows[rows[query]].mul_(block[local[query, slot_of]]).sum(1)
                y[rows[query], slot_of] = products.mul_(inv_tau)

    rows_of = layout.block_size
    ring.visit(own_rows, rows_of, positive_similarities)

    def excluded(s: int, rows: torch.Tensor, pmax: int, x: torch.Tensor, yc: torch.Tensor) -> list:
        """The dense terms that are no part of rank(q, p): z = p, and the query's own column unless
        include_query. Returns (column (c, P or 1), mask, sigmoid) per kind, for the block's local columns."""
        out = []
        local = layout.local(s, columns[rows, :pmax])
        mask = (local >= 0) & (slot[:pmax] < counts[rows, None])
        col = local.clamp(min=0)
        out.append((col, mask, _sig(x.gather(1, col) - yc)))
        if not params.include_query:
            local = layout.local(s, own_index[rows])[:, None]
            col = local.clamp(min=0)
            out.append((col, (local >= 0).expand_as(yc), _sig(x.gather(1, col) - yc)))
        return out

    buffer = [real.new_empty(0)]  # one sigmoid buffer for every chunk: fresh large tensors cost page faults

    def dense_terms(x: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        """sig(u) for every column of the block: (c, P, n_block), in the shared buffer (no clamp: see the module
        docstring)."""
        shape = (x.shape[0], yc.shape[1], x.shape[1])
        need = shape[0] * shape[1] * shape[2]
        if buffer[0].numel() < need:
            buffer[0] = x.new_empty(need)
        terms = buffer[0][:need].view(shape)
        torch.sub(x[:, None, :], yc[:, :, None], out=terms)
        return terms.sigmoid_()

    # Round 2: rank(q, p) - 1 and sum_z sig'(u_qpz), column block by column block.
    rank_sum = torch.zeros_like(y)
    slope_sum = torch.zeros_like(y)

    def accumulate(s: int, block: torch.Tensor) -> None:
        for rows, pmax in chunks(block.shape[0]):
            x = scaled_similarity(rows, block)
            yc = y[rows, :pmax]
            terms = dense_terms(x, yc)
            r = terms.sum(-1)
            slope = terms.addcmul_(terms, terms, value=-1.0).sum(-1)  # sig' = sig - sig^2
            for _, mask, t in excluded(s, rows, pmax, x, yc):
                r -= t * mask
                slope -= t * (1.0 - t) * mask
            rank_sum[rows, :pmax] += r
            slope_sum[rows, :pmax] += slope

    ring.visit(own_rows, rows_of, accumulate)

    # R^k and G = dL/d rank, local; the loss's global sum: one all-reduce.
    valid = order
    with torch.enable_grad():
        rank_valid = (1.0 + rank_sum[valid]).requires_grad_(True)
        own_total = _recall_sum(rank_valid, counts[valid], params)
        (g_valid,) = torch.autograd.grad(own_total, rank_valid)
    total = own_total.detach().clone()
    dist.all_reduce(total)
    loss = 1.0 - total * total_scale
    g = torch.zeros_like(y)
    g[valid] = g_valid.mul_(-total_scale * inv_tau)  # dL/d rank / tau_rank (every d rank / d s has 1/tau)

    # Round 3: each block travels with its gradient accumulator and comes home complete.
    d_own = torch.zeros_like(own_rows)

    def backward(s: int, block: torch.Tensor, acc: torch.Tensor) -> None:
        for rows, pmax in chunks(block.shape[0]):
            x = scaled_similarity(rows, block)
            yc, gc = y[rows, :pmax], g[rows, :pmax]
            terms = dense_terms(x, yc)
            slope = terms.addcmul_(terms, terms, value=-1.0)
            grow = torch.bmm(gc[:, None, :], slope).squeeze(1)  # (c, n_block): sum_p g_qp sig'(u_qpz)
            kinds = excluded(s, rows, pmax, x, yc)
            col, mask, t = kinds[0]  # z = p: remove its term, add dL/ds_qp
            grow.scatter_add_(1, col, torch.where(mask, -gc * (t * (1.0 - t) + slope_sum[rows, :pmax]), 0.0))
            if len(kinds) > 1:  # the query's own column is no part of D(q): no gradient
                col, mask, _ = kinds[1]
                grow.scatter_(1, col[:, :1], torch.where(mask[:, :1], 0.0, grow.gather(1, col[:, :1])))
            d_own.index_add_(0, rows, grow @ block)
            acc.addmm_(grow.T, own_rows.index_select(0, rows))

    d_own += ring.carry(own_rows, own_rows, rows_of, backward)

    # Round 4 (SiMix): v = b + alpha (a - b) gives alpha dv to a (own) and (1 - alpha) dv to b (any rank).
    d_real = d_own[:n_own]
    if criterion.simix:
        d_virtual = d_own[n_own:]
        d_real.index_add_(0, own_a, d_virtual * weights[:, None])
        to_b = d_virtual * (1.0 - weights)[:, None]

        def deliver(s: int, _: None, acc: torch.Tensor) -> None:
            here = (own_b >= layout.starts[s]) & (own_b < layout.starts[s] + sizes[s])
            acc.index_add_(0, own_b[here] - layout.starts[s], to_b[here])

        d_real += ring.carry(None, d_real, lambda s: sizes[s], deliver)

    grad = d_real.to(unit.dtype) if unit is leaf else torch.autograd.grad(unit, leaf, d_real.to(unit.dtype))[0]
    if scale != 1.0:
        grad = grad * scale
    return loss.detach(), grad.to(embeddings.dtype)
