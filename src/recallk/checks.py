"""Named input checks shared by every layer (layer 0: imports only torch). Each raises ``ValueError`` saying what
is wrong and how to fix it, and returns the checked value."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "NO_POSITIVE_MESSAGE",
    "check_embedding_pair",
    "check_embeddings",
    "check_has_positive",
    "check_ks_and_taus",
    "check_labels",
    "check_norm",
    "check_optional_positive_int",
    "check_self_index",
    "check_similarity",
    "max_similarity",
    "no_reference_positive_message",
    "overflow_message",
]

NO_POSITIVE_MESSAGE = (
    "no query in the batch has a positive (another reference item with its label, itself excluded): each class "
    "needs at least 2 items in the batch: use recallk.data.ClassBalancedBatchSampler with per_class >= 2 "
    "(train.per_class in a config; the paper uses 4)"
)


def _require_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}: convert it with torch.as_tensor")
    return x


#: Largest |similarity| accepted, as a fraction of the largest finite value of the dtype the loss and the
#: metrics compute in (float32 for half and float32 input, float64 for float64): 2^-40 leaves room for RS@k's
#: 1 / tau_rank scaling (tau_rank >= 1e-11) and its differences of similarities. In float32 that is |s| <= 3.1e26,
#: i.e. embedding norms up to 1.76e13 (a model's L2-normalised output has norm 1).
OVERFLOW_HEADROOM = 2.0**-40


def max_similarity(dtype: torch.dtype) -> float:
    """The largest |similarity| (inner product) accepted for inputs of ``dtype`` (see ``OVERFLOW_HEADROOM``)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.finfo(compute).max * OVERFLOW_HEADROOM


def overflow_message(name: str, max_norm: float, dtype: torch.dtype) -> str:
    """The one message for embeddings whose inner products would overflow (loss, kernels and metrics)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return (
        f"{name} has a row of norm {max_norm:.3g}: its inner products (up to {max_norm * max_norm:.3g}) overflow "
        f"{str(compute).replace('torch.', '')} arithmetic (norms must stay below {max_similarity(dtype) ** 0.5:.3g}). "
        "L2-normalise the embeddings (torch.nn.functional.normalize(x, dim=1)) or check the model for exploding "
        "activations (lower the learning rate, clip gradients)"
    )


def check_norm(max_norm: float, name: str, dtype: torch.dtype) -> None:
    """Raise ValueError (:func:`overflow_message`) when ``max_norm ** 2`` exceeds :func:`max_similarity`."""
    if not max_norm <= max_similarity(dtype) ** 0.5:
        raise ValueError(overflow_message(name, max_norm, dtype))


def _max_abs(x: torch.Tensor, name: str) -> float:
    """max |x| in one pass (NaN propagates); raises the NaN/Inf error when x holds one."""
    lo, hi = torch.aminmax(x.detach())
    m = max(-float(lo), float(hi))
    if m == m and m != float("inf"):
        return m
    bad = int((~torch.isfinite(x)).sum())
    raise ValueError(
        f"{name} contains {bad} NaN or Inf value(s): check the model output for overflow (lower the learning "
        "rate, disable fp16, or clip gradients) before computing the loss"
    )


def _check_embedding_range(x: torch.Tensor, name: str) -> None:
    """NaN/Inf, then rows whose inner products would overflow the compute dtype (exact norms only when the cheap
    bound ``max|x| * sqrt(d)`` does not already clear them)."""
    m = _max_abs(x, name)
    if m * x.shape[1] ** 0.5 <= max_similarity(x.dtype) ** 0.5:
        return
    check_norm(float(torch.linalg.vector_norm(x.detach(), dim=1, dtype=torch.float64).max()), name, x.dtype)


def check_embeddings(embeddings: object, name: str = "embeddings") -> torch.Tensor:
    """Require a non-empty, finite, floating (N, d) tensor whose inner products cannot overflow (row norms below
    ``max_similarity(dtype) ** 0.5``: 1.76e13 for half and float32); returns it unchanged."""
    emb = _require_tensor(embeddings, name)
    if emb.dim() != 2:
        raise ValueError(f"{name} must have shape (N, d), got {tuple(emb.shape)}: flatten or stack it to 2-D")
    if not emb.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {emb.dtype}: call .float() on it")
    if emb.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (0 rows): pass at least 2 items of one class")
    if emb.shape[1] == 0:
        raise ValueError(f"{name} has 0 dimensions per item (shape {tuple(emb.shape)}): check the model head")
    _check_embedding_range(emb, name)
    return emb


def check_embedding_pair(query_emb: object, ref_emb: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Check query (Q, d) and reference (N, d) embeddings (which may be one tensor): same width, dtype, device."""
    query_emb = check_embeddings(query_emb, name="query_emb")
    ref_emb = query_emb if ref_emb is query_emb else check_embeddings(ref_emb, name="ref_emb")
    if query_emb.shape[1] != ref_emb.shape[1]:
        raise ValueError(
            f"query_emb has {query_emb.shape[1]} dimensions but ref_emb has {ref_emb.shape[1]}: embed both with "
            "one model"
        )
    if query_emb.device != ref_emb.device or query_emb.dtype != ref_emb.dtype:
        raise ValueError(
            f"query_emb ({query_emb.dtype}, {query_emb.device}) and ref_emb ({ref_emb.dtype}, {ref_emb.device}) "
            "must share dtype and device: convert one with .to(other)"
        )
    return query_emb, ref_emb


def check_similarity(sim: object, name: str = "sim", square: bool = False, scale: float = 1.0) -> torch.Tensor:
    """Require a non-empty, finite, floating (Q, N) tensor ((B, B) when ``square``) whose values times ``scale``
    (RS@k passes 1 / tau_rank) stay below a quarter of the largest value of the compute dtype (float32 for half
    and float32, float64 for float64), so that no later scaling or difference overflows; returns it unchanged."""
    s = _require_tensor(sim, name)
    if s.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (queries, references) similarity matrix, got shape {tuple(s.shape)}")
    if not s.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {s.dtype}: call .float() on it")
    if s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(s.shape)}): pass at least 2 items of one class")
    if square and s.shape[0] != s.shape[1]:
        raise ValueError(
            f"{name} must be square (B, B) for a batch against itself, got {tuple(s.shape)}: pass ref_labels "
            "for a separate reference set"
        )
    m = _max_abs(s, name)
    limit = torch.finfo(torch.float64 if s.dtype == torch.float64 else torch.float32).max / 4 / scale
    if m > limit:
        raise ValueError(
            f"{name} holds a similarity of magnitude {m:.3g}, which overflows the loss's arithmetic (limit "
            f"{limit:.3g} at this tau_rank): similarities of L2-normalised embeddings lie in [-1, 1]; L2-normalise "
            "the embeddings (torch.nn.functional.normalize(x, dim=1)) before forming the matrix"
        )
    return s


def check_labels(labels: object, n: int, name: str = "labels", against: str = "the embeddings") -> torch.Tensor:
    """Require a 1-D integer tensor of length ``n``; returns it as int64."""
    lab = _require_tensor(labels, name)
    if lab.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one class id per item), got shape {tuple(lab.shape)}")
    if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class ids, got {lab.dtype}: call .long() on integer labels")
    if lab.numel() != n:
        raise ValueError(
            f"{name} has {lab.numel()} entries but {against} has {n} rows: give exactly one label per item"
        )
    return lab.long()


def check_self_index(self_index: object, q: int, n: int) -> torch.Tensor | None:
    """Require None or a (Q,) integer tensor with values in [-1, N); returns it as int64 (or None)."""
    if self_index is None:
        return None
    idx = check_labels(self_index, q, name="self_index", against="sim")
    if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= n):
        raise ValueError(
            f"self_index values must be -1 (query not in the reference set) or a column in [0, {n}), got range "
            f"[{int(idx.min())}, {int(idx.max())}]"
        )
    return idx


def check_ks_and_taus(
    ks: Sequence[int], tau_rank: float, tau_k: float | Sequence[float] | torch.Tensor
) -> tuple[tuple[int, ...], float, tuple[float, ...]]:
    """Check the k values and temperatures; returns ``(ks, tau_rank, tau_k)`` with one tau_k per k."""
    try:
        ks_t = tuple(int(k) for k in ks)
    except TypeError as err:
        raise ValueError(f"ks must be a sequence of positive integers such as (1, 2, 4, 8, 16), got {ks!r}") from err
    if not ks_t or any(k < 1 for k in ks_t) or any(float(k) != float(k0) for k, k0 in zip(ks_t, ks)):
        raise ValueError(f"ks must be a non-empty sequence of positive integers such as (1, 2, 4, 8, 16), got {ks!r}")
    if not float(tau_rank) > 0.0 or not torch.isfinite(torch.tensor(float(tau_rank))):
        raise ValueError(f"tau_rank must be a positive finite number (the paper uses 0.01), got {tau_rank!r}")
    if isinstance(tau_k, torch.Tensor):
        taus = tuple(float(t) for t in tau_k.reshape(-1).tolist())
    elif isinstance(tau_k, (int, float)):
        taus = (float(tau_k),) * len(ks_t)
    else:
        taus = tuple(float(t) for t in tau_k)
    if len(taus) == 1 and len(ks_t) > 1:
        taus = taus * len(ks_t)
    if len(taus) != len(ks_t):
        raise ValueError(
            f"tau_k must be one number or one per k: got {len(taus)} values for {len(ks_t)} ks {ks_t}"
        )
    if any(not (t > 0.0 and t != float("inf")) for t in taus):
        raise ValueError(f"tau_k values must be positive and finite (the paper uses 1.0), got {taus}")
    return ks_t, float(tau_rank), taus


def _label_list(labels: torch.Tensor, limit: int = 8) -> str:
    values = torch.unique(labels.detach().cpu()).tolist()
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} distinct)" if len(values) > limit else "")


def no_reference_positive_message(query_labels: torch.Tensor, ref_labels: torch.Tensor) -> str:
    """The message for queries ranked against a separate reference set that holds none of their labels."""
    return (
        f"no reference item shares a query's label: none of the {query_labels.numel()} queries (labels "
        f"{_label_list(query_labels)}) has a positive among the {ref_labels.numel()} reference items (ref_labels "
        f"{_label_list(ref_labels)}); pass a reference set (ref_emb, ref_labels) holding items of the queries' "
        "classes, with the classes numbered as in labels"
    )


def check_has_positive(
    counts: torch.Tensor, query_labels: torch.Tensor | None = None, ref_labels: torch.Tensor | None = None,
    self_index: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """Raise ValueError when no query has a positive (``counts``: (Q,) number of positives per query).

    With the (Q,) ``query_labels``, (N,) ``ref_labels`` and (Q,) ``self_index`` (-1: the query is not in the
    reference set) of a separate reference set (every ``self_index`` -1), the message says that no reference item
    shares a query's label (:func:`no_reference_positive_message`); otherwise, a batch ranked against itself, it
    is :data:`NO_POSITIVE_MESSAGE` (classes of one item: the sampler's ``per_class``).
    """
    if counts.numel() > 0 and bool((counts > 0).any()):
        return
    separate = query_labels is not None and ref_labels is not None and self_index is not None
    if separate and counts.numel() > 0 and bool((self_index < 0).all()):
        raise ValueError(no_reference_positive_message(query_labels, ref_labels))
    raise ValueError(NO_POSITIVE_MESSAGE)


def check_optional_positive_int(value: object, name: str, what: str) -> int | None:
    """Require None or a positive integer (``what`` says what it counts, for the message)."""
    if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
        raise ValueError(f"{name} must be a positive integer number of {what} or None, got {value!r}")
    return value
