"""Slow, obviously-correct float64 references of RS@k and SiMix, for the tests and benchmarks.

Every formula of method.md is followed literally with plain Python loops over queries q, positives p and
reference items z, on scalar tensors so that autograd gives the exact gradient. Use sizes of a few dozen items.
``naive_rsk_loss`` is the same loss vectorised over the full (B, |P|, B) tensor, for batches of thousands.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["naive_rsk_loss", "rsk_loss_reference", "simix_embeddings_reference"]


def _sig(u: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-torch.clamp(u, -50.0, 50.0)))


def rsk_loss_reference(
    sim: torch.Tensor,
    query_labels: Sequence[int] | torch.Tensor,
    ref_labels: Sequence[int] | torch.Tensor,
    self_index: Sequence[int] | torch.Tensor | None = None,
    ks: Sequence[int] = (1, 2, 4, 8, 16),
    tau_rank: float = 0.01,
    tau_k: float | Sequence[float] = 1.0,
    include_query: bool = False,
) -> torch.Tensor:
    """RS@k loss of the (Q, N) similarity ``sim`` by explicit loops (computed in float64).

    ``self_index[q]`` is the column of query q in the reference set or -1 (None: all -1). Returns a float64 scalar,
    differentiable w.r.t. ``sim``; raises ValueError when no query has a positive.
    """
    s = sim.to(torch.float64)
    q_lab = [int(x) for x in query_labels]
    ref_lab = [int(x) for x in ref_labels]
    n_q, n_ref = len(q_lab), len(ref_lab)
    selfs = [-1] * n_q if self_index is None else [int(x) for x in self_index]
    taus = [float(tau_k)] * len(ks) if isinstance(tau_k, (int, float)) else [float(t) for t in tau_k]

    per_query = []
    for q in range(n_q):
        ranked = [z for z in range(n_ref) if z != selfs[q] or include_query]
        positives = [j for j in range(n_ref) if j != selfs[q] and ref_lab[j] == q_lab[q]]
        if not positives:
            continue
        ranks = {}
        for p in positives:
            rank = torch.ones((), dtype=torch.float64)
            for z in ranked:
                if z != p:
                    rank = rank + _sig((s[q, z] - s[q, p]) / tau_rank)
            ranks[p] = rank
        recalls = []
        for k, tau in zip(ks, taus):
            soft_count = torch.zeros((), dtype=torch.float64)
            for p in positives:
                soft_count = soft_count + _sig((k - ranks[p]) / tau)
            clipped = torch.minimum(soft_count, torch.tensor(float(k), dtype=torch.float64))
            recalls.append(clipped / min(k, len(positives)))
        per_query.append(1.0 - sum(recalls) / len(recalls))
    if not per_query:
        raise ValueError("no query has a positive")
    return sum(per_query) / len(per_query)


def simix_embeddings_reference(
    embeddings: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    alphas: Sequence[float] | torch.Tensor,
    pairs: Sequence[tuple[int, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SiMix by mixing embeddings explicitly: v = alpha f_a + (1 - alpha) f_b.

    ``pairs`` defaults to every same-class pair (a, b), a < b, in lexicographic order, found by a double loop.
    Returns ``(embeddings_aug, labels_aug)``: the B real rows followed by one virtual row per pair.
    """
    lab = [int(x) for x in labels]
    if pairs is None:
        pairs = [(a, b) for a in range(len(lab)) for b in range(a + 1, len(lab)) if lab[a] == lab[b]]
    rows = [embeddings[i] for i in range(len(lab))]
    new_labels = list(lab)
    for (a, b), alpha in zip(pairs, alphas, strict=True):
        alpha = float(alpha)
        rows.append(alpha * embeddings[a] + (1.0 - alpha) * embeddings[b])
        new_labels.append(lab[a])
    return torch.stack(rows), torch.tensor(new_labels, dtype=torch.long)


def naive_rsk_loss(
    sim: torch.Tensor,
    labels: torch.Tensor,
    ks: Sequence[int] = (1, 2, 4, 8, 16),
    tau_rank: float = 0.01,
    tau_k: float = 1.0,
    include_query: bool = False,
) -> torch.Tensor:
    """RS@k of a (B, B) batch similarity (the batch against itself) by plain autograd on the full (B, |P|, B)
    tensor: vectorised, so usable at a few thousand items, and written independently of ``recallk.kernels`` (the
    naive baseline of ``benchmarks/bench.py loss``). Computed in ``sim``'s dtype; returns a scalar."""
    b = sim.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=sim.device)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    counts = pos.sum(1)
    pmax = int(counts.max())
    pos_idx = torch.topk(pos.to(torch.int8), pmax, dim=1).indices  # (B, P): the positives first
    pmask = torch.arange(pmax, device=sim.device) < counts[:, None]
    s_pos = sim.gather(1, pos_idx)
    terms = torch.sigmoid(((sim[:, None, :] - s_pos[:, :, None]) / tau_rank).clamp(-50, 50))  # (B, P, B)
    cols = torch.arange(b, device=sim.device)
    keep = cols[None, None, :] != pos_idx[:, :, None]
    if not include_query:
        keep = keep & ~eye[:, None, :]
    rank = 1.0 + (terms * keep).sum(-1)
    kk = torch.tensor([float(k) for k in ks], dtype=sim.dtype, device=sim.device)
    a = torch.sigmoid(((kk - rank[..., None]) / tau_k).clamp(-50, 50)) * pmask[..., None]
    recall = torch.minimum(a.sum(1), kk) / torch.minimum(kk, counts[:, None].to(sim.dtype))
    valid = counts > 0
    return (1.0 - recall.mean(1))[valid].mean()
