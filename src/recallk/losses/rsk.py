"""The Recall@k surrogate loss (RS@k) as an ``nn.Module``, with optional SiMix."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from recallk import kernels
from recallk.losses import validation as v
from recallk.losses.simix import simix, simix_embeddings

__all__ = ["RECOMPUTE_ABOVE_BYTES", "SIMILARITY_MODES", "RecallAtKSurrogate", "gram"]

SIMILARITY_MODES = ("auto", "matrix", "recompute")
#: ``similarity="auto"`` switches to "recompute" when the float32 similarity of the (augmented) batch would be
#: larger than this: 1 GiB, i.e. about B = 16,384 (B + V = 16,384 with SiMix).
RECOMPUTE_ABOVE_BYTES = 1 << 30


#: ``gram`` on the CPU computes only the upper triangle of row blocks from this many rows up, in this many blocks
#: (10 of 16 block products; 2-core EPYC, d = 512: B = 2000 21.2 -> 14.7 ms, B = 4000 100 -> 79 ms).
_SYMMETRIC_MIN_ROWS = 512
_SYMMETRIC_BLOCKS = 4


def _symmetric_gram(emb: torch.Tensor) -> torch.Tensor:
    """E E^T from the block products on and above the diagonal; the blocks below are their transposes (values
    as a plain matmul up to float rounding)."""
    b = emb.shape[0]
    out = torch.empty(b, b, dtype=emb.dtype, device=emb.device)
    edges = [b * i // _SYMMETRIC_BLOCKS for i in range(_SYMMETRIC_BLOCKS + 1)]
    for lo, hi in itertools.pairwise(edges):
        torch.mm(emb[lo:hi], emb[lo:].T, out=out[lo:hi, lo:])
        out[lo:hi, :lo].copy_(out[:lo, lo:hi].T)
    return out


class _Gram(torch.autograd.Function):
    """S = E E^T whose backward is one matmul, (G + G^T) E, instead of two."""

    @staticmethod
    def forward(ctx, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(emb)
        if emb.device.type == "cpu" and emb.shape[0] >= _SYMMETRIC_MIN_ROWS:
            return _symmetric_gram(emb)
        return emb @ emb.T

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (emb,) = ctx.saved_tensors
        return (grad + grad.T) @ emb


def gram(embeddings: torch.Tensor) -> torch.Tensor:
    """(B, d) -> (B, B) matrix of inner products ``E E^T``, differentiable (twice only through autograd's
    first-order rule; use ``embeddings @ embeddings.T`` when double backward is needed)."""
    return _Gram.apply(embeddings)


_SIMIX_WITH_REF = (
    "simix=True mixes items of one batch and needs the batch against itself: drop ref_emb/ref_labels or build "
    "the loss with simix=False"
)


class RecallAtKSurrogate(nn.Module):
    """RS@k loss (Patel, Tolias, Matas, CVPR 2022), method.md sections 1-2.

    Args:
        ks: the training k values.
        tau_rank: temperature of the rank sigmoids (paper: 0.01).
        tau_k: temperature of the k sigmoids, one number or one per k (paper: 1.0).
        include_query: count the query itself (its own similarity) when ranking its positives, as the
            authors' code does (shifts every rank by about +1). Off by default, as in the paper. It only acts
            when the query is in the database: with ``ref_emb``/``ref_labels`` the queries are not in the
            database, so it changes nothing (a copy of the query inside ``ref_emb`` is an ordinary database item
            and, having the query's label, a positive: leave the current batch out of a memory bank).
        simix: apply :func:`recallk.losses.simix` to the batch similarity in ``forward``/``from_similarity``
            (not with a separate database).
        max_pairs_per_class: SiMix cap on pairs per class (None: all pairs).
        backend: "auto" (Triton kernel for CUDA tensors when importable, else torch), "torch" or "triton".
        generator: random source of SiMix; by default a CPU generator seeded with ``torch.initial_seed()``
            (so ``torch.manual_seed`` makes training reproducible). Replace the ``generator`` attribute to
            change it.
        block_size: query rows per block of the torch path (None: automatic).
        similarity: how ``forward`` forms similarities. "matrix" computes the (B, N) matrix and its gradient
            (fastest while they fit); "recompute" never stores them: the torch path computes the similarity
            rows of one block of queries at a time, the Triton path recomputes tiles inside its kernels, and
            SiMix mixes the embeddings instead of the matrix (same pairs and alphas); "auto" (default) uses
            "recompute" when the float32 matrix would exceed ``RECOMPUTE_ABOVE_BYTES`` (1 GiB). Both give the
            same loss up to float rounding. ``from_similarity`` always takes a matrix.

    Embeddings are used as given (not re-normalised): the model L2-normalises, and SiMix's virtual items are
    unnormalised by definition. The loss is in [0, 1) but its minimum is not 0 (a positive at rank 1 scores
    sig(0) = 1/2 for k = 1 with tau_k = 1).

    Raises (on call):
        ValueError: NaN/Inf, wrong shapes, non-integer labels, an empty batch, or no query with a positive.
    """

    def __init__(
        self,
        ks: Sequence[int] = (1, 2, 4, 8, 16),
        tau_rank: float = 0.01,
        tau_k: float | Sequence[float] = 1.0,
        include_query: bool = False,
        simix: bool = False,
        max_pairs_per_class: int | None = None,
        backend: str = "auto",
        generator: torch.Generator | None = None,
        block_size: int | None = None,
        similarity: str = "auto",
    ) -> None:
        super().__init__()
        if similarity not in SIMILARITY_MODES:
            raise ValueError(f"similarity must be one of {SIMILARITY_MODES}, got {similarity!r}")
        self.similarity = similarity
        self.ks, self.tau_rank, self.tau_k = v.check_ks_and_taus(ks, tau_rank, tau_k)
        if backend not in kernels.BACKENDS:
            raise ValueError(f"backend must be one of {kernels.BACKENDS}, got {backend!r}")
        if max_pairs_per_class is not None and (int(max_pairs_per_class) != max_pairs_per_class
                                                or max_pairs_per_class < 1):
            raise ValueError(f"max_pairs_per_class must be a positive integer or None, got {max_pairs_per_class!r}")
        self.include_query = bool(include_query)
        self.simix = bool(simix)
        self.max_pairs_per_class = max_pairs_per_class
        self.backend = backend
        self.block_size = block_size
        if generator is None:
            generator = torch.Generator().manual_seed(torch.initial_seed())
        self.generator = generator

    def extra_repr(self) -> str:
        return (
            f"ks={self.ks}, tau_rank={self.tau_rank}, tau_k={self.tau_k}, include_query={self.include_query}, "
            f"simix={self.simix}, max_pairs_per_class={self.max_pairs_per_class}, backend={self.backend!r}, "
            f"similarity={self.similarity!r}"
        )

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of a batch.

        Args:
            embeddings: (B, d) floating query embeddings (L2-normalised by the model).
            labels: (B,) integer labels.
            ref_emb: optional (N, d) database (e.g. a memory bank); each query is ranked against it alone,
                with no self exclusion. Needs ``ref_labels``.
            ref_labels: (N,) integer labels of ``ref_emb``.

        Returns:
            Scalar loss tensor (float32, or float64 for float64 input).
        """
        emb = v.check_embeddings(embeddings)
        labels = v.check_labels(labels, emb.shape[0])
        if (ref_emb is None) != (ref_labels is None):
            raise ValueError("pass ref_emb and ref_labels together (the database and its labels), or neither")
        if ref_emb is None:
            if not self._recompute_batch(labels):
                return self.from_similarity(gram(emb), labels)
            if self.simix:
                emb, labels = simix_embeddings(
                    emb, labels, generator=self.generator, max_pairs_per_class=self.max_pairs_per_class
                )
            return kernels.rsk_loss_from_embeddings(
                emb, emb, labels, labels, torch.arange(emb.shape[0], device=emb.device), self.ks, self.tau_rank,
                self.tau_k, self.include_query, backend=self.backend, block_size=self.block_size,
            )
        ref = v.check_embeddings(ref_emb, name="ref_emb")
        if ref.shape[1] != emb.shape[1]:
            raise ValueError(
                f"ref_emb has {ref.shape[1]} dimensions but embeddings have {emb.shape[1]}: use the same model"
            )
        ref_labels = v.check_labels(ref_labels, ref.shape[0], name="ref_labels", against="ref_emb")
        if self.simix:
            raise ValueError(_SIMIX_WITH_REF)
        if not self._recompute(emb.shape[0], ref.shape[0]):
            return self.from_similarity(emb @ ref.T, labels, ref_labels)
        return kernels.rsk_loss_from_embeddings(
            emb, ref, labels, ref_labels, None, self.ks, self.tau_rank, self.tau_k, self.include_query,
            backend=self.backend, block_size=self.block_size,
        )

    def _recompute_batch(self, labels: torch.Tensor) -> bool:
        """Whether a batch against itself goes the "recompute" way; "auto" counts SiMix's virtual items."""
        if self.similarity != "auto" or not self.simix:
            return self._recompute(labels.numel(), labels.numel())
        sizes = torch.unique(labels, return_counts=True)[1]
        pairs = sizes * (sizes - 1) // 2
        if self.max_pairs_per_class is not None:
            pairs = pairs.clamp(max=self.max_pairs_per_class)
        augmented = labels.numel() + int(pairs.sum())
        return self._recompute(augmented, augmented)

    def _recompute(self, rows: int, cols: int) -> bool:
        if self.similarity == "auto":
            return rows * cols * 4 > RECOMPUTE_ABOVE_BYTES
        return self.similarity == "recompute"

    def from_similarity(
        self, sim: torch.Tensor, labels: torch.Tensor, ref_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Loss from a similarity matrix already computed.

        Args:
            sim: (B, B) similarity of the batch with itself (item i is query i and column i), or (B, N) against
                a separate database when ``ref_labels`` is given.
            labels: (B,) integer labels of the rows. ref_labels: (N,) integer labels of the columns.

        Returns:
            Scalar loss tensor.
        """
        if ref_labels is None:
            sim = v.check_similarity(sim, square=True)
            labels = v.check_labels(labels, sim.shape[0], against="sim").to(sim.device)
            if self.simix:
                sim, labels = simix(
                    sim, labels, generator=self.generator, max_pairs_per_class=self.max_pairs_per_class
                )
            self_index = torch.arange(sim.shape[0], device=sim.device)
            db_labels = labels
        else:
            if self.simix:
                raise ValueError(_SIMIX_WITH_REF)
            self_index = None
            db_labels = ref_labels
        return kernels.rsk_loss_from_similarity(
            sim, labels, db_labels, self_index, self.ks, self.tau_rank, self.tau_k, self.include_query,
            backend=self.backend, block_size=self.block_size,
        )
