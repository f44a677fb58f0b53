"""SiMix: similarity mixup (method.md section 2), computed from the (B, B) similarity matrix alone.

For a same-class pair (a, b) the virtual item is v = alpha f_a + (1 - alpha) f_b (not renormalised). Because
similarity is bilinear, with the (V, B) mixing matrix M (row v: alpha at a, 1 - alpha at b)

    sim_aug = [[S, S M^T], [M S, M S M^T]].

M is never built: each product is two row (or column) gathers and a linear interpolation, so the cost is that of
writing the (B + V)^2 output.
"""

from __future__ import annotations

import torch

from recallk import checks

__all__ = ["simix", "simix_embeddings", "simix_pairs"]


def simix_pairs(
    labels: torch.Tensor,
    max_pairs_per_class: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same-class pairs SiMix mixes, in lexicographic order of (a, b).

    Args:
        labels: (B,) integer labels, any order, any class sizes.
        max_pairs_per_class: keep at most this many pairs per class. The kept pairs of a class with more pairs
            are a uniformly random subset drawn with ``generator`` (the global torch RNG when None); the result
            is still in lexicographic order. None keeps every pair.
        generator: random source for the subset.

    Returns:
        ``(a, b)``: two (V,) int64 tensors on ``labels``' device with ``a < b`` and ``labels[a] == labels[b]``.

    Raises:
        ValueError: labels not a 1-D integer tensor, or ``max_pairs_per_class`` not a positive integer.
    """
    labels = checks.check_labels(labels, labels.numel() if isinstance(labels, torch.Tensor) else -1)
    checks.check_optional_positive_int(max_pairs_per_class, "max_pairs_per_class", "pairs per class")
    device = labels.device
    b_size = labels.numel()
    # Sort by (label, index): each class is a run of ascending indices.
    sorted_labels, order = torch.sort(labels, stable=True)
    _, run_sizes = torch.unique_consecutive(sorted_labels, return_counts=True)
    run_end = torch.cumsum(run_sizes, 0).repeat_interleave(run_sizes)  # exclusive end of each item's run
    pos = torch.arange(b_size, device=device)
    partners = run_end - pos - 1  # later items of the same class
    first = torch.repeat_interleave(pos, partners)
    offset_start = torch.cumsum(partners, 0) - partners
    second = first + 1 + torch.arange(first.numel(), device=device) - offset_start.repeat_interleave(partners)
    a, b = order[first], order[second]

    if max_pairs_per_class is not None and a.numel():
        cls = sorted_labels[first]
        gen_device = generator.device if generator is not None else "cpu"
        keys = torch.rand(a.numel(), generator=generator, device=gen_device)
        keys = keys.to(device)
        # Rank of each pair inside its class by its random key; keep the first max_pairs_per_class.
        by_key = torch.argsort(keys)
        by_class = by_key[torch.argsort(cls[by_key], stable=True)]
        cls_sorted = cls[by_class]
        _, cls_counts = torch.unique_consecutive(cls_sorted, return_counts=True)
        class_start = (torch.cumsum(cls_counts, 0) - cls_counts).repeat_interleave(cls_counts)
        within = torch.arange(a.numel(), device=device) - class_start
        keep = torch.zeros(a.numel(), dtype=torch.bool, device=device)
        keep[by_class[within < max_pairs_per_class]] = True
        a, b = a[keep], b[keep]

    lex = torch.argsort(a * b_size + b)
    return a[lex], b[lex]


def _alphas(n_pairs: int, alphas: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """The (V,) mixing weights: ``alphas`` checked, or alpha ~ U(0, 1) in float64 drawn from ``generator``."""
    if alphas is None:
        gen_device = generator.device if generator is not None else "cpu"
        return torch.rand(n_pairs, generator=generator, device=gen_device, dtype=torch.float64)
    if not isinstance(alphas, torch.Tensor) or alphas.dim() != 1 or alphas.numel() != n_pairs:
        shape = tuple(alphas.shape) if isinstance(alphas, torch.Tensor) else type(alphas).__name__
        raise ValueError(
            f"alphas must be a 1-D tensor with one weight per same-class pair ({n_pairs} here, in lexicographic "
            f"order of (a, b)), got {shape}: use recallk.losses.simix_pairs(labels) to list the pairs"
        )
    return alphas


def simix(
    sim: torch.Tensor,
    labels: torch.Tensor,
    alphas: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    max_pairs_per_class: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch similarity matrix with one virtual item per same-class pair.

    Args:
        sim: (B, B) floating similarity of the batch with itself, differentiable.
        labels: (B,) integer labels.
        alphas: (V,) mixing weights, one per pair of :func:`simix_pairs` (lexicographic order of (a, b), after
            the ``max_pairs_per_class`` cap); None draws alpha ~ U(0, 1) from ``generator`` (after the cap's
            subset is drawn).
        generator: random source for the pair subset and the alphas (global torch RNG when None).
        max_pairs_per_class: cap on pairs per class (see :func:`simix_pairs`).

    Returns:
        ``(sim_aug, labels_aug)``: (B + V, B + V) similarity in ``sim``'s dtype, real items first then virtual
        items in pair order; (B + V,) int64 labels (a virtual item has its pair's class).

    Raises:
        ValueError: NaN/Inf or non-square ``sim``, labels of the wrong length or dtype, alphas of the wrong
            shape.
    """
    sim = checks.check_similarity(sim, square=True)
    labels = checks.check_labels(labels, sim.shape[0], against="sim").to(sim.device)
    a, b = simix_pairs(labels, max_pairs_per_class, generator)
    alphas = _alphas(a.numel(), alphas, generator)
    w = alphas.to(device=sim.device, dtype=sim.dtype)

    # M S: row v = alpha S[a] + (1 - alpha) S[b]   (lerp(x, y, w) = x + w (y - x))
    mixed_rows = torch.lerp(sim.index_select(0, b), sim.index_select(0, a), w[:, None])  # (V, B)
    # S M^T: column v = alpha S[:, a] + (1 - alpha) S[:, b]
    mixed_cols = torch.lerp(sim.index_select(1, b), sim.index_select(1, a), w[None, :])  # (B, V)
    # M S M^T from M S by the same column mix.
    mixed_both = torch.lerp(mixed_rows.index_select(1, b), mixed_rows.index_select(1, a), w[None, :])  # (V, V)
    top = torch.cat([sim, mixed_cols], dim=1)
    bottom = torch.cat([mixed_rows, mixed_both], dim=1)
    return torch.cat([top, bottom], dim=0), torch.cat([labels, labels[a]])


def simix_embeddings(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    alphas: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    max_pairs_per_class: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SiMix on the embeddings themselves: the virtual items ``alpha f_a + (1 - alpha) f_b`` are formed.

    The same pairs and, for the same ``generator`` state, the same alphas as :func:`simix`, so the similarity of
    the result equals ``simix(embeddings @ embeddings.T, ...)`` up to rounding. Costs (V, d) instead of
    (B + V)^2: the form to use when the augmented similarity is never stored (RecallAtKSurrogate with
    ``memory="recompute"``).

    Args:
        embeddings: (B, d) floating, differentiable. labels: (B,) integer labels.
        alphas, generator, max_pairs_per_class: as in :func:`simix`.

    Returns:
        ``(emb_aug, labels_aug)``: (B + V, d) in ``embeddings``' dtype, real items first then virtual items in
        pair order; (B + V,) int64 labels.
    """
    emb = checks.check_embeddings(embeddings)
    labels = checks.check_labels(labels, emb.shape[0]).to(emb.device)
    a, b = simix_pairs(labels, max_pairs_per_class, generator)
    w = _alphas(a.numel(), alphas, generator).to(device=emb.device, dtype=emb.dtype)
    virtual = torch.lerp(emb.index_select(0, b), emb.index_select(0, a), w[:, None])
    return torch.cat([emb, virtual]), torch.cat([labels, labels[a]])
