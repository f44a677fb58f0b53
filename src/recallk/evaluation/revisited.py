"""The revisited Oxford/Paris metrics: mAP and mP@k under the Easy, Medium and Hard protocols, with junk images.

Source: Radenovic, Iscen, Tolias, Avrithis, Chum, "Revisiting Oxford and Paris: Large-Scale Image Retrieval
Benchmarking", CVPR 2018, and ``compute_map`` of the benchmark's own evaluation code (``revisitop``). For a query,
its full ranking of the database (decreasing similarity) and its ground-truth lists:

- protocols: Easy: positives = easy, junk = junk + hard. Medium: positives = easy + hard, junk = junk.
  Hard: positives = hard, junk = junk + easy. (Concatenated lists, as that code builds them.)
- junk images are removed from the ranking: a positive's 0-based position p becomes p minus the number of junk
  images ranked before it.
- average precision, with that code's trapezoid interpolation: with n = len(positives) (the list's length) and the
  j-th positive (j = 0, 1, ...) at junk-free 0-based position p_j,
  AP = sum_j (P0_j + P1_j) / (2 n), where P0_j = j / p_j (1 when p_j = 0) and P1_j = (j + 1) / (p_j + 1).
- precision at k: with the 1-based junk-free positions r_j = p_j + 1 and k' = min(max_j r_j, k),
  mP@k = |{j : r_j <= k'}| / k' (that code's rule: k shrinks to the last positive's rank when it is above k).
- a query whose positive list is empty in a protocol is skipped in that protocol's averages (and counted).

Rankings follow ``recallk.evaluation.knn``'s order rule (decreasing float32 inner product, ties by increasing
database index). ``revisited_metrics`` finds the position of each ground-truth image by counting, in database
chunks, the images ranked before it: memory stays at one (Q, chunk) score block however large the database
(R1M), and no full ranking is ever stored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from recallk.evaluation.knn import _ieee_fp32_matmul, as_float32_matrix
from recallk.utils import resolve_device

PROTOCOLS = ("easy", "medium", "hard")
DEFAULT_KS = (1, 5, 10)
_SCORE_BUDGET = 1 << 24  # elements of one (Q, chunk) score block


def protocol_lists(entry: Mapping[str, Sequence[int]], protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """``(positives, junk)`` database indices (int64) of a ground-truth entry (``easy``, ``hard``, ``junk``) under
    ``protocol`` (see the module docstring); ValueError for another protocol name."""
    easy, hard, junk = (np.asarray(entry[key], dtype=np.int64).reshape(-1) for key in ("easy", "hard", "junk"))
    if protocol == "easy":
        return easy, np.concatenate([junk, hard])
    if protocol == "medium":
        return np.concatenate([easy, hard]), junk
    if protocol == "hard":
        return hard, np.concatenate([junk, easy])
    raise ValueError(f"unknown revisited protocol {protocol!r}; choose from {PROTOCOLS}")


def precision_scores(
    positive_positions: np.ndarray, junk_positions: np.ndarray, num_positives: int, ks: Sequence[int]
) -> tuple[float, np.ndarray]:
    """AP and precision@k of one query (formulas in the module docstring).

    Args:
        positive_positions: 0-based positions in the full ranking of the ranked positives (any order).
        junk_positions: 0-based positions of the ranked junk images.
        num_positives: n, the length of the query's positive list (> 0).
        ks: the k's of precision@k.

    Returns:
        ``(ap, precisions)``: a float and a (len(ks),) float64 array.
    """
    pos = np.sort(np.asarray(positive_positions, dtype=np.int64))
    junk = np.sort(np.asarray(junk_positions, dtype=np.int64))
    pos = pos - np.searchsorted(junk, pos, side="left")  # junk ranked before each positive
    j = np.arange(len(pos), dtype=np.float64)
    precision_before = np.where(pos == 0, 1.0, j / np.maximum(pos, 1))
    precision_after = (j + 1.0) / (pos + 1.0)
    ap = float(np.sum((precision_before + precision_after) / 2.0) / num_positives)
    rank = pos + 1
    last = int(rank.max()) if rank.size else 0
    precisions = np.zeros(len(ks), dtype=np.float64)
    for i, k in enumerate(ks):
        kq = min(last, int(k))
        precisions[i] = np.count_nonzero(rank <= kq) / kq if kq > 0 else 0.0
    return ap, precisions


def revisited_metric_names(ks: Sequence[int] = DEFAULT_KS) -> tuple[str, ...]:
    """The keys of the revisited metrics in table order: ``map_<protocol>``, then ``mp@<k>_<protocol>`` by
    protocol and k, then the counts ``num_queries`` and ``num_skipped_<protocol>``."""
    return (
        *(f"map_{p}" for p in PROTOCOLS),
        *(f"mp@{k}_{p}" for p in PROTOCOLS for k in ks),
        "num_queries",
        *(f"num_skipped_{p}" for p in PROTOCOLS),
    )


def _check_ground_truth(ground_truth: Sequence[Mapping[str, Sequence[int]]], n_queries: int, n_database: int) -> None:
    if len(ground_truth) != n_queries:
        raise ValueError(f"ground_truth has {len(ground_truth)} entries but there are {n_queries} queries")
    for q, entry in enumerate(ground_truth):
        for key in ("easy", "hard", "junk"):
            if key not in entry:
                raise ValueError(f"ground_truth[{q}] lacks {key!r} (needs 'easy', 'hard' and 'junk' index lists)")
            ids = np.asarray(entry[key]).reshape(-1)
            if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= n_database):
                raise ValueError(
                    f"ground_truth[{q}][{key!r}] must hold integer database indices in [0, {n_database - 1}]"
                )


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    return tuple(sorted({int(k) for k in ks}))


def _summarise(
    ground_truth: Sequence[Mapping[str, Sequence[int]]], position_of: list[dict[int, int]], ks: tuple[int, ...]
) -> dict[str, float | int]:
    """Average the per-query scores; ``position_of[q]`` maps each ground-truth index of query q to its position."""
    result: dict[str, float | int] = {}
    counts = {}
    for protocol in PROTOCOLS:
        ap_sum, precision_sum, used = 0.0, np.zeros(len(ks)), 0
        for q, entry in enumerate(ground_truth):
            positives, junk = protocol_lists(entry, protocol)
            if positives.size == 0:
                continue
            where = position_of[q]
            pos = np.fromiter({where[int(i)] for i in positives}, dtype=np.int64)  # each ranked image once
            jpos = np.fromiter({where[int(i)] for i in junk}, dtype=np.int64)
            ap, precisions = precision_scores(pos, jpos, positives.size, ks)
            ap_sum, precision_sum, used = ap_sum + ap, precision_sum + precisions, used + 1
        divisor = used or float("nan")  # NaN: no query has a positive in this protocol, nothing to average
        result[f"map_{protocol}"] = ap_sum / divisor
        for k, value in zip(ks, precision_sum):
            result[f"mp@{k}_{protocol}"] = float(value) / divisor
        counts[f"num_skipped_{protocol}"] = len(ground_truth) - used
    result["num_queries"] = len(ground_truth)
    result.update(counts)
    return result


def revisited_map(
    ranks: np.ndarray | torch.Tensor,
    ground_truth: Sequence[Mapping[str, Sequence[int]]],
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float | int]:
    """The revisited metrics of full rankings (definitions in the module docstring).

    Args:
        ranks: (Q, N) integer array; row q is a permutation of the database indices 0..N-1, most similar first
            (the transpose of the ``ranks`` (N, Q) of the benchmark's ``compute_map``).
        ground_truth: Q entries, each a mapping with ``easy``, ``hard`` and ``junk`` database index lists.
        ks: the k's of mP@k.

    Returns:
        ``{"map_easy", "map_medium", "map_hard": float, "mp@<k>_<protocol>": float, "num_queries": int,
        "num_skipped_<protocol>": int}``; metrics are fractions in [0, 1], averaged over the queries with at least
        one positive in that protocol (NaN when there is none).

    Raises:
        ValueError: ranks not a 2-D integer array of permutations, ground truth of another length or with
            indices out of range, bad ks.
    """
    ks = _check_ks(ks)
    ranks = ranks.detach().cpu().numpy() if isinstance(ranks, torch.Tensor) else np.asarray(ranks)
    if ranks.ndim != 2 or not np.issubdtype(ranks.dtype, np.integer) or ranks.shape[1] == 0:
        raise ValueError(f"ranks must be a (Q, N) integer array of database indices, got {ranks.dtype} {ranks.shape}")
    n = ranks.shape[1]
    if not (np.sort(ranks, axis=1) == np.arange(n)).all():
        raise ValueError(f"each row of ranks must be a permutation of 0..{n - 1} (a full ranking of the database)")
    _check_ground_truth(ground_truth, ranks.shape[0], n)
    position = np.argsort(ranks, axis=1)  # position[q, i]: where database image i sits in query q's ranking
    position_of = []
    for q, entry in enumerate(ground_truth):
        ids = np.unique(np.concatenate([np.asarray(entry[key], dtype=np.int64).reshape(-1) for key in
                                        ("easy", "hard", "junk")]))
        position_of.append(dict(zip(ids.tolist(), position[q, ids].tolist())))
    return _summarise(ground_truth, position_of, ks)


def ground_truth_positions(
    queries: np.ndarray,
    database: np.ndarray,
    items: np.ndarray,
    device: torch.device,
    chunk_size: int | None = None,
) -> np.ndarray:
    """0-based positions of database images in each query's full ranking, without storing any ranking.

    Args:
        queries: (Q, d) float32; database: (N, d) float32.
        items: (Q, M) int64 database indices, -1 for padding.
        device: where the score blocks are computed.
        chunk_size: database rows per score block; None: about 16M scores per block.

    Returns:
        (Q, M) int64: position of ``items[q, m]`` in query q's ranking by the order rule (decreasing float32
        inner product, ties by increasing index); -1 where ``items`` is -1.

    Two passes over the database: the first reads each item's score out of the same score blocks the second
    counts in, so an item's score is the one it is ranked by.
    """
    n = database.shape[0]
    chunk = chunk_size or max(1, min(n, _SCORE_BUDGET // max(1, queries.shape[0])))
    q = torch.from_numpy(queries).to(device)
    db = torch.from_numpy(database)
    item_t = torch.from_numpy(items).to(device)
    valid = item_t >= 0
    item_scores = torch.full(item_t.shape, float("inf"), dtype=torch.float32, device=device)
    ahead = torch.zeros(item_t.shape, dtype=torch.int64, device=device)

    def blocks():
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            yield a, b, q @ db[a:b].to(device).T

    with _ieee_fp32_matmul(device), torch.inference_mode():
        for a, b, scores in blocks():  # pass 1: each item's own score
            rows, cols = (valid & (item_t >= a) & (item_t < b)).nonzero(as_tuple=True)
            item_scores[rows, cols] = scores[rows, item_t[rows, cols] - a]
        for a, b, scores in blocks():  # pass 2: how many images rank before each item
            inside = valid & (item_t >= a) & (item_t < b)
            ordered = scores.sort(dim=1).values
            right = torch.searchsorted(ordered, item_scores, right=True)
            left = torch.searchsorted(ordered, item_scores, right=False)
            ahead += (b - a) - right  # strictly higher scores
            tied = (valid & (right - left > inside.long())).nonzero(as_tuple=True)  # equal scores besides itself
            for r, m in zip(*(t.tolist() for t in tied)):
                index = torch.arange(a, b, device=device)
                ahead[r, m] += int(((scores[r] == item_scores[r, m]) & (index < item_t[r, m])).sum())
    return torch.where(valid, ahead, torch.full_like(ahead, -1)).cpu().numpy()


def revisited_metrics(
    query_emb: np.ndarray | torch.Tensor,
    database_emb: np.ndarray | torch.Tensor,
    ground_truth: Sequence[Mapping[str, Sequence[int]]],
    ks: Sequence[int] = DEFAULT_KS,
    *,
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
) -> dict[str, float | int]:
    """The revisited metrics of embeddings: each query ranks the whole database by inner product.

    Args:
        query_emb: (Q, d) float query embeddings (L2-normalised for cosine similarity).
        database_emb: (N, d) float database embeddings; ground-truth indices refer to its rows (extra rows, e.g.
            R1M distractors, are ranked but are never positive nor junk).
        ground_truth: Q entries with ``easy``, ``hard`` and ``junk`` database index lists (the pickle's ``gnd``).
        ks: the k's of mP@k.
        device: where the scores are computed (None: CPU; "auto": a GPU when present).
        chunk_size: database rows per score block (memory knob: Q x chunk_size float32 scores).

    Returns:
        as :func:`revisited_map`, on the rankings of the order rule (``recallk.evaluation.knn``).

    Raises:
        ValueError: bad shapes, NaN/inf, dimensions that differ, bad ground truth or ks, chunk_size < 1.
    """
    ks = _check_ks(ks)
    queries = as_float32_matrix(query_emb, "query_emb")
    database = as_float32_matrix(database_emb, "database_emb")
    if queries.shape[1] != database.shape[1]:
        raise ValueError(f"query_emb has dimension {queries.shape[1]} but database_emb has {database.shape[1]}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    _check_ground_truth(ground_truth, queries.shape[0], database.shape[0])
    ids = [np.unique(np.concatenate([np.asarray(e[key], dtype=np.int64).reshape(-1) for key in
                                     ("easy", "hard", "junk")])) for e in ground_truth]
    items = np.full((len(ids), max(1, max(len(i) for i in ids))), -1, dtype=np.int64)
    for q, row in enumerate(ids):
        items[q, : len(row)] = row
    dev = resolve_device(device) if device is not None else torch.device("cpu")
    positions = ground_truth_positions(queries, database, items, dev, chunk_size)
    position_of = [dict(zip(row.tolist(), positions[q, : len(row)].tolist())) for q, row in enumerate(ids)]
    return _summarise(ground_truth, position_of, ks)
