"""A faiss index of a gallery's embeddings, with a JSON sidecar naming what it indexes.

Kinds (all by inner product, i.e. cosine similarity of the L2-normalised embeddings):

- ``flat``: ``faiss.IndexFlatIP``, exact. recallk searches it with ``recallk.evaluation.exact_knn`` on the stored
  vectors, so its results are those of the evaluation (same scores, same tie order).
- ``ivf``: ``faiss.IndexIVFFlat`` (k-means coarse quantiser with ``nlist`` lists, ``nprobe`` visited per query;
  Jégou et al., "Product quantization for nearest neighbor search", TPAMI 2011).
- ``hnsw``: ``faiss.IndexHNSWFlat`` (graph with ``M`` links per node, ``ef_search`` candidates; Malkov &
  Yashunin, "Efficient and robust approximate nearest neighbor search using HNSW graphs", TPAMI 2018).

Approximate kinds are checked when built: recall@10 against the exact index (of the 10 items the index
returns, the fraction whose exact similarity is at least that of the exact 10th nearest: tie-aware, so duplicates
tied with the 10th count; averaged over a seeded sample of up to 1,000 gallery items used as queries;
:func:`recall_against_exact`) is stored in the sidecar and printed.

Files: ``INDEX`` (``faiss.write_index``) and ``INDEX.json``: format, kind and parameters, the index file's
SHA-256, the embedding file's identity and the model's (``model_id``, ``embed_dim``, ...), and the gallery items
(``paths``, ``labels``, ``classes``). Both are written atomically; a sidecar that does not match its index
file is refused.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from recallk import __version__
from recallk.evaluation import exact_knn
from recallk.retrieval.embed import EmbeddingFile, read_embeddings
from recallk.retrieval.files import file_sha256
from recallk.run_folder import atomic_path, write_atomic

INDEX_FORMAT = "recallk-index"
INDEX_FORMAT_VERSION = 1
KINDS = ("flat", "ivf", "hnsw")
RECALL_QUERIES = 1000


class IndexMismatchError(ValueError):
    """An index used with a model or with vectors it was not built for."""


def _default_nlist(n: int) -> int:
    """4 sqrt(N) lists (faiss's guideline), at most N / 39 so that k-means has 39 points per centroid."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def _similarities(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(Q, k) float32 inner products of ``queries[q]`` with ``vectors[ids[q, j]]`` (ids < 0: -inf): accumulated in
    float64 (products of float32 values are exact there) and rounded to float32, the index's precision, so that
    identical vectors give identical values whatever the summation order or memory alignment."""
    safe = np.where(ids >= 0, ids, 0)
    sims = np.einsum("qd,qkd->qk", queries.astype(np.float64), vectors[safe].astype(np.float64)).astype(np.float32)
    return np.where(ids >= 0, sims, np.float32(-np.inf))


def recall_against_exact(index: faiss.Index, vectors: np.ndarray, k: int = 10, queries: int = RECALL_QUERIES,
                         seed: int = 0, query_vectors: np.ndarray | None = None) -> float:
    """Tie-aware recall@k of an approximate index against exact search, averaged over queries.

    For each query, a returned neighbour counts as a hit when its exact similarity is at least that of the exact
    k-th neighbour (``exact_knn`` on ``vectors``); the figure is (distinct hits) / k. Both similarities are
    recomputed from the stored vectors in float32 (as the index computes them) by the same arithmetic, so an item
    exactly tied with the k-th (a duplicate image) is a hit, not a miss because exact search ordered the tie
    otherwise. A padded result (-1: nothing found) is a miss. Without ties this is |approx top-k ∩ exact top-k| / k.

    Args:
        index: the faiss index of ``vectors``; vectors: (N, d) float32 as indexed; k: neighbours (at most N).
        queries, seed: a seeded sample of up to ``queries`` rows of ``vectors`` is the query set, unless
            ``query_vectors`` (Q, d) is given.

    Returns:
        The mean over queries, in [0, 1].
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if query_vectors is None:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(len(vectors), size=min(queries, len(vectors)), replace=False))
        query_vectors = vectors[rows]
    query_vectors = np.ascontiguousarray(query_vectors, dtype=np.float32)
    k = min(k, len(vectors))
    _, exact = exact_knn(query_vectors, vectors, k)
    _, approx = index.search(query_vectors, k)
    kth = _similarities(query_vectors, vectors, exact).min(axis=1)  # the exact k-th similarity
    hit = _similarities(query_vectors, vectors, approx) >= kth[:, None]
    return float(np.mean([len(set(row[h].tolist())) / k for row, h in zip(approx, hit)]))


def make_faiss_index(vectors: np.ndarray, kind: str = "flat", *, nlist: int | None = None, nprobe: int = 16,
                     hnsw_m: int = 32, ef_construction: int = 40, ef_search: int = 64,
                     seed: int = 0) -> tuple[faiss.Index, dict[str, Any]]:
    """A faiss inner-product index of ``vectors`` (N, d) float32 and its parameters (see the module docstring).

    Raises:
        ValueError: unknown kind, or a parameter < 1.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose from {KINDS}")
    if min(nprobe, hnsw_m, ef_construction, ef_search, nlist or 1) < 1:
        raise ValueError("nlist, nprobe, hnsw_m, ef_construction and ef_search must be >= 1")
    n, d = vectors.shape
    params: dict[str, Any] = {}
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = nlist or _default_nlist(n)
        if nlist > n:
            raise ValueError(f"nlist={nlist} is more than the {n} vectors; pass a smaller --nlist")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(vectors)
        index.nprobe = min(nprobe, nlist)
        params = {"nlist": nlist, "nprobe": index.nprobe}
    else:
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
        params = {"hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search}
    index.add(vectors)
    return index, params


def _apply_search_params(index: faiss.Index, kind: str, params: dict[str, Any]) -> None:
    if kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    elif kind == "hnsw":
        index.hnsw.efSearch = int(params["ef_search"])


@dataclass
class GalleryIndex:
    """A faiss index plus what it indexes; ``search`` gives (scores, indices) of the gallery items."""

    index: faiss.Index
    metadata: dict[str, Any]
    paths: np.ndarray
    labels: np.ndarray
    classes: list[str]

    @property
    def kind(self) -> str:
        return self.metadata["kind"]

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, embeddings: str | os.PathLike | EmbeddingFile, kind: str = "flat",
              **options: Any) -> GalleryIndex:
        """Index an embedding file (path or :class:`EmbeddingFile`); ``options`` go to :func:`make_faiss_index`
        (``nlist``, ``nprobe``, ``hnsw_m``, ``ef_construction``, ``ef_search``, ``seed``).

        ``metadata`` gets ``build_seconds`` and, for ivf/hnsw, ``recall@10_vs_exact`` (module docstring).

        Raises:
            ValueError: unreadable embedding file, unknown kind, bad parameters.
        """
        emb = embeddings if isinstance(embeddings, EmbeddingFile) else read_embeddings(embeddings)
        source_path = None if isinstance(embeddings, EmbeddingFile) else Path(embeddings)
        vectors = emb.float32()
        t0 = time.perf_counter()
        index, params = make_faiss_index(vectors, kind, **options)
        seconds = time.perf_counter() - t0
        meta = emb.metadata
        metadata = {
            "format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION, "recallk_version": __version__,
            "kind": kind, "params": params, "count": int(index.ntotal), "dim": int(index.d),
            "build_seconds": round(seconds, 4),
            "embeddings": {"path": str(source_path.resolve()) if source_path else None,
                           "sha256": file_sha256(source_path) if source_path else None,
                           "dtype": str(emb.embeddings.dtype)},
            "model_id": meta.get("model_id"), "checkpoint": meta.get("checkpoint"),
            "checkpoint_sha256": meta.get("checkpoint_sha256"), "model": meta.get("model"),
            "preprocessing": meta.get("preprocessing"), "source": meta.get("source"),
        }
        if kind != "flat":
            metadata["recall@10_vs_exact"] = round(recall_against_exact(index, vectors, seed=options.get("seed", 0)), 4)
            metadata["recall_queries"] = min(RECALL_QUERIES, len(vectors))
        return cls(index, metadata, emb.paths, emb.labels, emb.classes)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (faiss) and ``path.json`` (sidecar), each atomically; returns ``path``."""
        path = Path(path)
        with atomic_path(path) as tmp:
            faiss.write_index(self.index, str(tmp))
            digest = file_sha256(tmp)
        sidecar = {**self.metadata, "index_sha256": digest, "paths": [str(p) for p in self.paths],
                   "labels": [int(v) for v in self.labels], "classes": list(self.classes)}
        write_atomic(sidecar_path(path), json.dumps(sidecar))
        self.metadata["index_sha256"] = digest
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> GalleryIndex:
        """Read an index written by :meth:`save`.

        Raises:
            ValueError: a missing or unreadable file or sidecar, another format version, or a sidecar that
                belongs to another index file.
        """
        path = Path(path)
        side = sidecar_path(path)
        for p, what in ((path, "index file"), (side, "index sidecar")):
            if not p.is_file():
                raise ValueError(f"{what} not found: {p} (write both with recallk index)")
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{side} is not valid JSON ({e}); rebuild the index with recallk index") from e
        if meta.get("format") != INDEX_FORMAT or meta.get("format_version") != INDEX_FORMAT_VERSION:
            raise ValueError(f"{side} is not a {INDEX_FORMAT!r} version {INDEX_FORMAT_VERSION} sidecar; rebuild the "
                             f"index with this recallk ({__version__})")
        if file_sha256(path) != meta.get("index_sha256"):
            raise IndexMismatchError(f"{path} is not the index file {side} was written with (SHA-256 differs); "
                                     "rebuild both with recallk index")
        index = faiss.read_index(str(path))
        _apply_search_params(index, meta["kind"], meta["params"])
        paths, labels, classes = meta.pop("paths"), meta.pop("labels"), meta.pop("classes")
        return cls(index, meta, np.array(paths, dtype=str), np.array(labels, dtype=np.int64), classes)

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The k best gallery items of each query by inner product.

        Args:
            queries: (Q, d) float embeddings of the same model.
            k: neighbours per query, 1 <= k <= len(self).

        Returns:
            ``(scores, indices)``: (Q, k) float32 decreasing along a row, (Q, k) int64 gallery rows. ``flat``:
            ``recallk.evaluation.exact_knn`` on the stored vectors (its order rule). Approximate kinds: faiss's
            answer; an index that finds fewer than k items (IVF with a small nprobe) pads with index -1, score -inf.

        Raises:
            ValueError: ``queries`` is not a 2-D (Q, d) array (one query ``e`` of shape (d,): pass ``e[None]``),
                or k out of range. IndexMismatchError (a ValueError): the queries' width d differs from the
                index's (embeddings of another model).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2:
            raise ValueError(
                f"queries must be a 2-D (Q, d) array of Q query embeddings, got shape {queries.shape}; for a single "
                "query e of shape (d,) pass e[None] or e.reshape(1, -1)"
            )
        if queries.shape[1] != self.dim:
            raise IndexMismatchError(
                f"query embeddings have shape {queries.shape} but the index holds {self.dim}-d vectors: they come "
                "from another model; search with the checkpoint the gallery was embedded with"
            )
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be in [1, {len(self)}] (the gallery size), got {k}")
        if self.kind == "flat":
            return exact_knn(queries, self.index.reconstruct_n(0, self.index.ntotal), k)
        scores, indices = self.index.search(queries, k)
        scores[indices < 0] = -np.inf
        return scores, indices.astype(np.int64)


def sidecar_path(path: str | os.PathLike) -> Path:
    """``INDEX`` -> ``INDEX.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")
