"""The Recall@k surrogate loss (RS@k) as a :class:`~recallk.losses.base.MetricLoss`, with optional SiMix."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from recallk import checks, kernels
from recallk.losses.base import MetricLoss, register_loss, shard_range
from recallk.losses.gram import gram
from recallk.losses.simix import simix, simix_embeddings

__all__ = ["MEMORY_MODES", "RECOMPUTE_ABOVE_BYTES", "RecallAtKSurrogate", "gram"]

MEMORY_MODES = ("auto", "matrix", "recompute")
#: ``memory="auto"`` never stores a float32 similarity of the (augmented) batch larger than this: 1 GiB, i.e.
#: about B = 16,384 (B + V = 16,384 with SiMix). Below it the choice is measured (:mod:`recallk.kernels.dispatch`).
RECOMPUTE_ABOVE_BYTES = kernels.MATRIX_BUDGET_BYTES

_SIMIX_WITH_REF = (
    "simix=True mixes items of one batch and needs the batch against itself: drop ref_emb/ref_labels or build "
    "the loss with simix=False"
)


class RecallAtKSurrogate(MetricLoss):
    """RS@k loss (Patel, Tolias, Matas, CVPR 2022), method.md sections 1-2.

    Args:
        ks: the training k values.
        tau_rank: temperature of the rank sigmoids (paper: 0.01).
        tau_k: temperature of the k sigmoids, one number or one per k (paper: 1.0).
        include_query: count the query itself (its own similarity) when ranking its positives, as the
            authors' code does (shifts every rank by about +1). Off by default, as in the paper. It only acts
            when the query is in the reference set: with ``ref_emb``/``ref_labels`` it is not, so it changes
            nothing (a copy of the query inside ``ref_emb`` is an ordinary reference item and, having the query's
            label, a positive: leave the current batch out of a memory bank). Not pytorch-metric-learning's
            ``ref_includes_query`` (see :class:`recallk.kernels.RSkParams`).
        simix: apply :func:`recallk.losses.simix` to the batch similarity in ``forward``/``from_similarity``
            (not with a separate reference set).
        max_pairs_per_class: SiMix cap on pairs per class (None: all pairs).
        backend: "torch", "triton", "triton_fused" or "auto": with ``memory``, the fastest measured path for the
            device and batch size (:mod:`recallk.kernels.dispatch`: on CUDA the Triton matrix kernel from about
            5,000 rows while the matrix fits, the torch recompute path otherwise; torch on the CPU).
            "triton_fused" (tensor-core kernels from embeddings, not yet measured on a GPU) is never chosen by
            "auto"; name it to try it.
        generator: random source of SiMix; by default a CPU generator seeded with ``torch.initial_seed()``
            (so ``torch.manual_seed`` makes training reproducible). Replace the ``generator`` attribute to
            change it; its state is saved and restored with ``state_dict()`` (see :class:`MetricLoss`).
        block_size: query rows per block of the torch path (None: automatic).
        memory: how ``forward`` forms similarities (a memory strategy). "matrix" computes the (B, N) matrix and
            its gradient; "recompute" never stores them: the torch path computes the similarity rows of one
            block of queries at a time, the Triton path recomputes tiles inside its kernels, and
            SiMix mixes the embeddings instead of the matrix (same pairs and alphas); "auto" (default) never
            stores a float32 matrix above ``RECOMPUTE_ABOVE_BYTES`` (1 GiB) and below it takes the measured
            fastest path (on the CPU the matrix, or recompute from 4,000^2 pairs at d <= 256:
            :mod:`recallk.kernels.dispatch`). Both give the same loss up to float rounding.
            ``from_similarity`` always takes a matrix.
        normalize_embeddings: L2-normalise ``embeddings`` and ``ref_emb`` first, in the loss and differentiably
            (default, as pytorch-metric-learning's losses do with their ``normalize_embeddings=True`` distance):
            the loss is that of ``e_i / max(||e_i||, 1e-12)`` (:func:`recallk.losses.base.unit_rows`), whatever
            the input's scale; input already of unit norm to float rounding (a model's output) is used as given,
            so a run's numbers are unchanged to the last bit. False: the rows are used as given, unit norm or
            not (the similarities are then plain inner products ``e_i . r_j``). Not a config key: the models
            L2-normalise their output. ``from_similarity`` takes the similarities as given.

    SiMix mixes the (normalised) items, so its virtual items are unnormalised by definition. The loss is in
    [0, 1) but its minimum is not 0 (a positive at rank 1 scores sig(0) = 1/2 for k = 1 with tau_k = 1).

    Raises (on call):
        ValueError: NaN/Inf, wrong shapes, non-integer labels, an empty batch, or no query with a positive.
    Raises (here): ValueError on bad options.
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
        memory: str = "auto",
        normalize_embeddings: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(normalize_embeddings, bool):
            raise ValueError(f"normalize_embeddings must be True or False, got {normalize_embeddings!r}")
        self.normalize_embeddings = normalize_embeddings
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
        self.memory = memory
        self.params = kernels.RSkParams(ks, tau_rank, tau_k, include_query)
        if backend not in kernels.backend_names():
            raise ValueError(f"backend must be one of {kernels.backend_names()}, got {backend!r}")
        self.simix = bool(simix)
        self.max_pairs_per_class = checks.check_optional_positive_int(max_pairs_per_class, "max_pairs_per_class",
                                                                      "pairs per class")  # fmt: skip
        self.backend = backend
        self.block_size = block_size
        if generator is None:
            generator = torch.Generator().manual_seed(torch.initial_seed())
        self.generator = generator

    ks = property(lambda self: self.params.ks, doc="the training k values")
    tau_rank = property(lambda self: self.params.tau_rank, doc="temperature of the rank sigmoids")
    tau_k = property(lambda self: self.params.tau_k, doc="temperatures of the k sigmoids, one per k")
    include_query = property(lambda self: self.params.include_query, doc="see the class docstring")

    def extra_repr(self) -> str:
        return (
            f"ks={self.ks}, tau_rank={self.tau_rank}, tau_k={self.tau_k}, include_query={self.include_query}, "
            f"simix={self.simix}, max_pairs_per_class={self.max_pairs_per_class}, backend={self.backend!r}, "
            f"memory={self.memory!r}, normalize_embeddings={self.normalize_embeddings}"
        )

    def compute(
        self, embeddings: torch.Tensor, labels: torch.Tensor, ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        """The loss of checked inputs (see :meth:`MetricLoss.forward`): float32, or float64 for float64 input."""
        emb = embeddings
        if ref_emb is None:
            backend, memory = self._path(emb.device, emb.shape[1], self._augmented_size(labels))
            if memory == "matrix":
                return self.from_similarity(gram(emb), labels, backend=backend)
            if self.simix:
                emb, labels = simix_embeddings(
                    emb, labels, generator=self.generator, max_pairs_per_class=self.max_pairs_per_class
                )
            self_index = torch.arange(emb.shape[0], device=emb.device)
            return kernels.rsk_loss_from_embeddings(emb, emb, labels, labels, self.params, self_index=self_index,
                                                    backend=backend, block_size=self.block_size)  # fmt: skip
        if self.simix:
            raise ValueError(_SIMIX_WITH_REF)
        backend, memory = self._path(emb.device, emb.shape[1], emb.shape[0], ref_emb.shape[0])
        if memory == "matrix":
            return self.from_similarity(emb @ ref_emb.T, labels, ref_labels, backend=backend)
        return kernels.rsk_loss_from_embeddings(emb, ref_emb, labels, ref_labels, self.params, backend=backend,
                                                block_size=self.block_size)  # fmt: skip

    shardable = True

    def compute_shard(self, embeddings: torch.Tensor, labels: torch.Tensor, shard: int,
                      shards: int) -> torch.Tensor:
        """Share ``shard`` of ``shards`` of the loss of checked inputs (see :meth:`MetricLoss.sharded_forward`).

        SiMix forms the virtual items from the embeddings (:func:`simix_embeddings`: the pairs and alphas of
        :meth:`forward` for the same generator state), giving the B + V rows of the augmented batch; this share
        ranks the contiguous rows ``[lo, hi)`` of them (``lo = (B + V) * shard // shards``) against all B + V,
        with ``self_index = arange(lo, hi)``. RS@k is a mean over the queries with a positive (method.md section
        1), so the share is ``sum over its valid queries / the valid queries of the whole batch`` = (its own mean)
        x (its valid queries / all valid queries); a share without a valid query is 0 with a zero gradient.
        ``memory="auto"`` sizes the matrix-or-recompute choice for the share's (hi - lo, B + V) similarity.
        """
        emb = embeddings
        if self.simix:
            emb, labels = simix_embeddings(emb, labels, generator=self.generator,
                                           max_pairs_per_class=self.max_pairs_per_class)
        rows = emb.shape[0]
        lo, hi = shard_range(rows, shard, shards)
        _, inverse, class_sizes = torch.unique(labels, return_inverse=True, return_counts=True)
        valid = class_sizes[inverse] >= 2  # a query's positives: the other items of its class
        total = int(valid.sum())
        if total == 0:
            raise ValueError(checks.NO_POSITIVE_MESSAGE)
        mine = int(valid[lo:hi].sum())
        if mine == 0:
            return emb[:0].sum()  # 0, and a zero gradient for every row
        backend, memory = self._path(emb.device, emb.shape[1], hi - lo, rows)
        self_index = torch.arange(lo, hi, device=emb.device)
        if memory == "matrix":
            loss = kernels.rsk_loss_from_similarity(emb[lo:hi] @ emb.T, labels[lo:hi], labels, self.params,
                                                    self_index=self_index, backend=backend,
                                                    block_size=self.block_size)  # fmt: skip
        else:
            loss = kernels.rsk_loss_from_embeddings(emb[lo:hi], emb, labels[lo:hi], labels, self.params,
                                                    self_index=self_index, backend=backend,
                                                    block_size=self.block_size)  # fmt: skip
        return loss * (mine / total)

    def _augmented_size(self, labels: torch.Tensor) -> int:
        """Rows of a batch against itself after SiMix (its virtual items counted), as "auto" sizes it."""
        if not self.simix:
            return labels.numel()
        sizes = torch.unique(labels, return_counts=True)[1]
        pairs = sizes * (sizes - 1) // 2
        if self.max_pairs_per_class is not None:
            pairs = pairs.clamp(max=self.max_pairs_per_class)
        return labels.numel() + int(pairs.sum())

    def _path(self, device: torch.device, dim: int, rows: int, cols: int | None = None) -> tuple[str, str]:
        """``(backend, memory)`` for ``rows`` queries against ``cols`` references (default: ``rows``) of
        dimension ``dim``."""
        return kernels.auto_path(device, rows, rows if cols is None else cols, self.backend, self.memory,
                                 RECOMPUTE_ABOVE_BYTES, dim=dim)  # fmt: skip

    def from_similarity(
        self, sim: torch.Tensor, labels: torch.Tensor, ref_labels: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Loss from a similarity matrix already computed.

        Args:
            sim: (B, B) similarity of the batch with itself (item i is query i and column i), or (B, N) against
                a separate reference set when ``ref_labels`` is given.
            labels: (B,) integer labels of the rows. ref_labels: (N,) integer labels of the columns.
            backend: overrides the loss's ``backend`` for this call.

        Returns:
            Scalar loss tensor.
        """
        self_index = None
        if ref_labels is None:
            sim = checks.check_similarity(sim, square=True)
            labels = checks.check_labels(labels, sim.shape[0], against="sim").to(sim.device)
            if self.simix:
                sim, labels = simix(
                    sim, labels, generator=self.generator, max_pairs_per_class=self.max_pairs_per_class
                )
            self_index, ref_labels = torch.arange(sim.shape[0], device=sim.device), labels
        elif self.simix:
            raise ValueError(_SIMIX_WITH_REF)
        return kernels.rsk_loss_from_similarity(sim, labels, ref_labels, self.params, self_index=self_index,
                                                backend=backend or self.backend,
                                                block_size=self.block_size)  # fmt: skip


#: the generator is random state (checkpointed with the loss), block_size a test knob, normalize_embeddings changes
#: nothing for a model's (unit-norm) output: no config keys
register_loss("rsk", RecallAtKSurrogate, not_config=("generator", "block_size", "normalize_embeddings"))
