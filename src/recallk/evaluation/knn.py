"""Exact k-nearest neighbours by inner product, with a deterministic order.

Order rule (both backends): neighbours are sorted by decreasing float32 inner product, and items with equal
scores by increasing reference index. This rule also decides which of several equally scored items make it
into the k nearest ("boundary ties"). Neither faiss nor ``torch.topk`` guarantees it, so every search asks for
k + 1 candidates; a row whose k-th and (k+1)-th scores are equal is recomputed in full and its neighbours are
chosen by the rule. Such rows are rare on real embeddings (duplicate images) and cheap to redo.

Self exclusion is by index: the search takes k + 1 neighbours and drops the entry whose index is the query's
own; if the query is not among them (more than k items tie with it and precede it by index), the last one is
dropped. The query's position in the list is never assumed.

Backends: ``"faiss"`` (``faiss.knn``, inner product, no index copy) on the CPU; ``"torch"`` (a score block per
query chunk, then ``torch.topk``) on any device, used on a GPU and when faiss is not installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from recallk import checks
from recallk.utils import resolve_device

try:  # faiss is a dependency, but the torch backend keeps working without it
    import faiss
except ImportError:  # pragma: no cover - exercised only where faiss is missing
    faiss = None

BACKENDS = ("faiss", "torch")

# Working-memory targets, in elements: candidate lists per query chunk (faiss), score blocks (torch), and the
# full score rows of rows with a tie at the k-th place (redone by the order rule, ~13 bytes per element).
_CANDIDATE_BUDGET = 1 << 20
_CPU_SCORE_BUDGET = 1 << 24
_GPU_SCORE_BUDGET = 1 << 28
_TIE_BUDGET = 1 << 20
#: faiss queries per chunk at most: faiss's own BLAS query block (larger chunks only copy more queries).
_FAISS_MAX_CHUNK = 4096
#: Bytes per element of each working set, an upper bound over the temporaries the code creates (see
#: :func:`chunk_memory_bound`): faiss candidates (float32 + int64 lists, their k-prefix copies and the sorts of
#: ``_canonical_order``), torch scores (the float32 block, 4, plus 1 of slack for topk), tie rows.
_BYTES_PER_CANDIDATE = 64
_BYTES_PER_SCORE = 5
_BYTES_PER_TIE_SCORE = 16


def faiss_available() -> bool:
    """True when faiss can be imported."""
    return faiss is not None


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Pick ``"faiss"`` or ``"torch"``: None/"auto" means faiss on the CPU if installed, else torch.

    Raises:
        ValueError: unknown backend, faiss requested but not installed, or faiss requested on a GPU.
    """
    if backend in (None, "auto"):
        return "faiss" if device.type == "cpu" and faiss is not None else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown kNN backend {backend!r}; choose from {BACKENDS} or 'auto'")
    if backend == "faiss":
        if faiss is None:
            raise ValueError("backend='faiss' needs the faiss-cpu package: pip install faiss-cpu")
        if device.type != "cpu":
            raise ValueError(f"backend='faiss' runs on the CPU, got device={device}; use backend='torch'")
    return backend


def as_float32_matrix(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 numpy (N, d) array (no copy when it already is one).

    Raises:
        ValueError: not 2-D, empty, holds NaN/inf, or has a row whose float32 inner products would overflow
            (``recallk.checks.check_norm``: the same message as the loss).
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (N, d) array, got shape {x.shape}")
    lo, hi = float(x.min()), float(x.max())  # two reductions, no array-sized temporary (NaN propagates)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} holds NaN or inf values; check the model's outputs")
    if max(-lo, hi) * x.shape[1] ** 0.5 > checks.max_similarity(torch.float32) ** 0.5:
        checks.check_norm(float(np.sqrt(np.square(x, dtype=np.float64).sum(1).max())), name, torch.float32)
    return x


@contextmanager
def _ieee_fp32_matmul(device: torch.device) -> Iterator[None]:
    """Disable TF32 for CUDA matmuls inside the block (exact float32 scores), restoring the setting after."""
    if device.type != "cuda" or not torch.backends.cuda.matmul.allow_tf32:
        yield
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = True


def _canonical_order(scores: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by decreasing score, equal scores by increasing index."""
    indices, perm = indices.sort(dim=1)
    scores = scores.gather(1, perm)
    scores, perm = scores.sort(dim=1, descending=True, stable=True)
    return scores, indices.gather(1, perm)


def _select_by_rule(full_scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row of ``full_scores`` (t, N) by the order rule.

    Takes every item scoring above the row's k-th best score, then the lowest-index ones scoring exactly that.
    """
    kth = full_scores.topk(k, dim=1).values[:, -1]
    above = full_scores > kth[:, None]
    equal = full_scores == kth[:, None]
    needed = k - above.sum(dim=1)
    chosen = equal.cumsum(dim=1, dtype=torch.int32).le_(needed[:, None].to(torch.int32)).logical_and_(equal)
    chosen.logical_or_(above)
    indices = chosen.nonzero()[:, 1].view(-1, k)  # nonzero is row-major: indices ascend within a row
    return full_scores.gather(1, indices), indices


def _fix_boundary_ties(
    scores: torch.Tensor,
    indices: torch.Tensor,
    k: int,
    n_reference: int,
    full_rows: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Given k + 1 candidates per row, keep k; rows with a tie at the boundary are redone by the order rule.

    ``full_rows(rows)`` returns the complete score rows (len(rows), N) of the given query rows.
    """
    tied = (scores[:, k - 1] == scores[:, k]).nonzero()[:, 0]
    scores, indices = scores[:, :k].contiguous(), indices[:, :k].contiguous()
    step = max(1, _TIE_BUDGET // n_reference)
    for start in range(0, len(tied), step):
        rows = tied[start : start + step]
        s, i = _select_by_rule(full_rows(rows), k)
        scores[rows], indices[rows] = s, i
    return scores, indices


def _drop_self(
    scores: torch.Tensor, indices: torch.Tensor, self_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """From k + 1 neighbours per row keep k: drop the query's own index, or the last entry if it is absent."""
    is_self = indices == self_ids[:, None]
    is_self[~is_self.any(dim=1), -1] = True
    n, kk = indices.shape
    return scores[~is_self].view(n, kk - 1), indices[~is_self].view(n, kk - 1)


def default_chunk_size(backend: str, k: int, n_reference: int, device: torch.device) -> int:
    """Queries per chunk so that a chunk's working memory stays below :func:`chunk_memory_bound`: on the CPU at
    most 150 MiB plus the chunk's float32 query copy (at most 4,096 (faiss) or 8,192 (torch) queries x d x 4
    bytes), for reference sets up to 4 million items and k up to 16,383 (faiss; a larger k needs 64 bytes per
    candidate and query); 1 GiB score blocks on a GPU. ``k`` is the number of neighbours searched (k + 1 with
    self exclusion). Pinned by ``tests/evaluation/test_knn_memory.py``."""
    if backend == "faiss":
        return int(min(_FAISS_MAX_CHUNK, max(1, _CANDIDATE_BUDGET // (k + 1))))
    budget = _GPU_SCORE_BUDGET if device.type == "cuda" else _CPU_SCORE_BUDGET
    return int(min(8192, max(1, budget // n_reference)))


def chunk_memory_bound(backend: str, chunk: int, k: int, n_reference: int, dim: int) -> int:
    """Upper bound in bytes on the working memory of one chunk of :func:`iter_knn` on the CPU (what the search
    allocates besides its inputs and outputs): the query copy ``chunk * dim * 4``, plus for faiss 64 bytes per
    candidate (``chunk * (k + 2)``) and faiss's own 16 MiB BLAS block, or for torch 5 bytes per score
    (``chunk * n_reference``: the float32 block and slack for topk) and 64 per candidate; plus the tie rows
    (16 bytes x max(2^20, N): 16 MiB up to a million references).
    ``tests/evaluation/test_knn_memory.py`` measures the process's peak against it."""
    tie = _BYTES_PER_TIE_SCORE * max(_TIE_BUDGET, n_reference)
    queries = chunk * dim * 4
    if backend == "faiss":
        return queries + _BYTES_PER_CANDIDATE * chunk * (k + 2) + (16 << 20) + tie
    return queries + _BYTES_PER_SCORE * chunk * n_reference + _BYTES_PER_CANDIDATE * chunk * (k + 2) + tie


def iter_knn(
    query_source: np.ndarray,
    rows: np.ndarray,
    reference: np.ndarray,
    k: int,
    exclude_self: bool = False,
    backend: str = "faiss",
    device: torch.device | None = None,
    chunk_size: int | None = None,
    self_ids: np.ndarray | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(start, scores, indices)`` for consecutive chunks of the queries ``query_source[rows]``.

    ``scores`` (c, k) float32 and ``indices`` (c, k) int64 belong to queries ``rows[start:start + c]``, in the
    order rule of this module. With ``exclude_self`` the query source is the reference set and a query's own index
    is its row number, or ``self_ids[row]`` when given (the reference row of each query source row: a separate
    query set whose items are also in the reference set). ``k`` must be at most the reference set size (minus
    one with ``exclude_self``); the caller validates. Memory: one chunk's candidates (faiss) or score block
    (torch), never Q x N.
    """
    device = device or torch.device("cpu")
    n_ref = reference.shape[0]
    search_k = k + 1 if exclude_self else k  # neighbours to return before dropping the query's own entry
    chunk = chunk_size or default_chunk_size(backend, search_k, n_ref, device)
    ref_torch = torch.from_numpy(reference) if backend == "faiss" else torch.from_numpy(reference).to(device)

    def search(q: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if backend == "faiss":
            qt = torch.from_numpy(q)
            with_extra = min(search_k + 1, n_ref)
            d, i = faiss.knn(q, reference, with_extra, metric=faiss.METRIC_INNER_PRODUCT)
            scores, indices = torch.from_numpy(d), torch.from_numpy(i)
            if with_extra > search_k:
                scores, indices = _fix_boundary_ties(scores, indices, search_k, n_ref, lambda r: qt[r] @ ref_torch.T)
            return _canonical_order(scores, indices)
        qt = torch.from_numpy(q).to(device)
        full = qt @ ref_torch.T
        if search_k == n_ref:
            scores, indices = full.sort(dim=1, descending=True, stable=True)
            return scores, indices
        scores, indices = full.topk(search_k + 1, dim=1)
        scores, indices = _fix_boundary_ties(scores, indices, search_k, n_ref, lambda r: full[r])
        return _canonical_order(scores, indices)

    with _ieee_fp32_matmul(device), torch.inference_mode():
        for start in range(0, len(rows), chunk):
            ids = rows[start : start + chunk]
            scores, indices = search(np.ascontiguousarray(query_source[ids]))
            if exclude_self:
                own = ids if self_ids is None else self_ids[ids]
                scores, indices = _drop_self(scores, indices, torch.from_numpy(own).to(indices.device))
            yield start, scores.cpu().numpy(), indices.cpu().numpy()


def exact_knn(
    queries: np.ndarray | torch.Tensor,
    reference: np.ndarray | torch.Tensor,
    k: int,
    exclude_self: bool = False,
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
    *,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of each query in ``reference`` by inner product.

    Args:
        queries: (Q, d) float array or tensor. For cosine similarity pass L2-normalised embeddings.
        reference: (N, d) float array or tensor.
        k: neighbours per query, 1 <= k <= N (N - 1 with ``exclude_self``).
        exclude_self: queries are the reference set itself (Q == N, row i is item i); each query's own index is
            removed from its list (by index; see the module docstring).
        device: where the torch backend computes; None means CPU, "auto" a GPU when present.
        chunk_size: queries per chunk (memory knob); None picks one from a memory budget.
        backend: "faiss" (CPU), "torch", or None/"auto" (faiss on the CPU when installed, else torch).
        rows: (R,) integer indices: search only for the queries ``queries[rows]`` (in that order; with
            ``exclude_self`` each one's own index is its row). None: every query.

    Returns:
        ``(scores, indices)``: numpy arrays (Q, k) float32 (inner products, decreasing along a row) and (Q, k)
        int64 (reference indices), Q = R with ``rows``; equal scores are ordered by increasing index.

    Raises:
        ValueError: bad shapes, dimensions that differ, NaN/inf values, k out of range, ``exclude_self`` with
            Q != N, query indices out of range, or an unavailable backend.
    """
    dev = resolve_device(device) if device is not None else torch.device("cpu")
    name = resolve_backend(backend, dev)
    q = as_float32_matrix(queries, "queries")
    ref = q if queries is reference else as_float32_matrix(reference, "reference")
    if q.shape[1] != ref.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]} but the reference set has {ref.shape[1]}")
    if exclude_self and q.shape != ref.shape:
        raise ValueError(
            f"exclude_self=True needs the queries to be the reference set itself, got shapes {q.shape} and {ref.shape}"
        )
    limit = ref.shape[0] - int(exclude_self)
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= limit:
        raise ValueError(f"k must be an integer in [1, {limit}] for this reference set, got {k!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    if rows is None:
        rows = np.arange(q.shape[0], dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= q.shape[0]):
        raise ValueError(f"query indices (rows) must be in [0, {q.shape[0] - 1}]")
    scores = np.empty((rows.size, k), dtype=np.float32)
    indices = np.empty((rows.size, k), dtype=np.int64)
    for start, s, i in iter_knn(q, rows, ref, int(k), exclude_self, name, dev, chunk_size):
        scores[start : start + len(s)] = s
        indices[start : start + len(i)] = i
    return scores, indices
