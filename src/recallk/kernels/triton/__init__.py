"""The Triton backend of RS@k: fused kernels (CUDA; CPU only under Triton's interpreter, TRITON_INTERPRET=1).

This file only registers :class:`TritonBackend`; its methods import the kernel modules (``rsk_similarity``,
``rsk_embeddings``, ``rsk_fused``) on first call, not with this package: Triton decides at a kernel's definition
whether it is compiled or interpreted (TRITON_INTERPRET), so importing ``recallk`` must not fix that choice.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

import torch

from recallk.kernels.rsk import CLAMP, Positives, RSkParams, register_backend

__all__ = ["KERNELS", "TritonBackend", "loss_from_rank", "triton_available"]

#: ``TritonBackend(kernel=...)`` values: the kernel sets of ``from_embeddings``
KERNELS = ("tiles", "fused")


def triton_available() -> bool:
    """True when the ``triton`` package is installed (it still needs CUDA or TRITON_INTERPRET=1 to run)."""
    return importlib.util.find_spec("triton") is not None


def loss_from_rank(rank: torch.Tensor, pos: torch.Tensor, counts: torch.Tensor, params: RSkParams) -> torch.Tensor:
    """The R^k epilogue: loss = mean over queries with a positive of (1 - mean_k R^k(q)), a float32 scalar
    differentiable w.r.t. ``rank`` (Q, Pmax) float32, laid out as ``pos`` (Q, Pmax) int32 (-1: padding, which is
    ignored and gets no gradient; :meth:`Positives.padded`); ``counts`` (Q,) int64 = |P(q)|."""
    valid = pos >= 0
    n_pos = counts.to(rank.dtype)
    tau_k = torch.tensor(params.tau_k, dtype=torch.float32, device=rank.device)
    recall = torch.zeros(rank.shape[0], dtype=rank.dtype, device=rank.device)
    for i, k in enumerate(params.ks):
        u = ((k - rank) / tau_k[i]).clamp(-CLAMP, CLAMP)
        soft_hits = torch.where(valid, torch.sigmoid(u), 0.0).sum(1)
        recall = recall + soft_hits.clamp(max=float(k)) / n_pos.clamp(max=float(k)).clamp(min=1.0)
    return (1.0 - recall[counts > 0] / len(params.ks)).mean()


class TritonBackend:
    """The fused kernels: float16/bfloat16/float32 inputs, sigmoids in float32; ``block_size`` is ignored.

    Args:
        precision: ``tl.dot`` input precision of the recomputed similarity tiles (from embeddings): "ieee"
            (exact float32), "tf32x3" (three TF32 tensor-core passes, float32-level accuracy) or "tf32" (about
            1e-3 relative error in s). None: "ieee" for ``kernel="tiles"``, "tf32x3" for ``kernel="fused"``.
        kernel: the kernel set of :meth:`from_embeddings`: "tiles" (``rsk_embeddings``: the registered backend's,
            measured on an H200, 4-8x slower than the torch recompute path) or "fused" (``rsk_fused``: each
            similarity tile computed once per pass on tensor cores and reused for every positive; not yet
            measured on a GPU, so nothing picks it by default). Pass such an instance as ``backend=``, e.g.
            ``backend=TritonBackend(kernel="fused")``, or the registered name ``backend="triton_fused"``.
        fused_config: tiles of the fused kernels, a ``rsk_fused.FusedConfig`` (None: its defaults).

    Registered: ``"triton"`` (kernel "tiles", precision "ieee") and ``"triton_fused"`` (kernel "fused", "tf32x3");
    ``backend="auto"`` picks neither's from-embeddings kernels (``kernels/dispatch.py``: unmeasured or slower).

    Raises:
        ValueError: an unknown precision or kernel, or ``fused_config`` without ``kernel="fused"``.
    """

    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    requirement = (
        "triton (pip install 'recallk[triton]') and a CUDA tensor (or TRITON_INTERPRET=1 set before triton is "
        "imported)"
    )

    name = "triton"

    def __init__(self, precision: str | None = None, kernel: str = "tiles", fused_config: Any = None) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if precision is None:
            precision = "ieee" if kernel == "tiles" else "tf32x3"
        if precision not in ("ieee", "tf32", "tf32x3"):
            raise ValueError(f"precision must be one of ('ieee', 'tf32', 'tf32x3'), got {precision!r}")
        if fused_config is not None and kernel != "fused":
            raise ValueError("fused_config applies to kernel='fused' only")
        self.precision, self.kernel, self.fused_config = precision, kernel, fused_config
        self.name = "triton" if kernel == "tiles" else "triton_fused"

    def available(self, device: torch.device, auto: bool = False) -> bool:
        if not triton_available():
            return False
        if device.type == "cuda":
            return True
        return not auto and bool(importlib.import_module("triton").knobs.runtime.interpret)

    @staticmethod
    def _kernels(name: str) -> ModuleType:
        return importlib.import_module(f"recallk.kernels.triton.{name}")

    def from_similarity(self, sim: torch.Tensor, positives: Positives, params: RSkParams, block_size: int | None):
        pos = positives.padded()
        rank = self._kernels("rsk_similarity").rank_from_similarity(
            sim, pos, positives.self_index.contiguous(), params.tau_rank, params.include_query
        )
        return loss_from_rank(rank, pos, positives.counts, params)

    def from_embeddings(self, query_emb, ref_emb, positives, params, block_size):  # type: ignore[no-untyped-def]
        pos = positives.padded()
        query_emb, ref_emb = (x if x.stride(1) == 1 else x.contiguous() for x in (query_emb, ref_emb))
        if self.kernel == "fused":
            fused = self._kernels("rsk_fused")
            rank = fused.rank_from_embeddings_fused(
                query_emb, ref_emb, pos, positives.self_index.contiguous(), params.tau_rank, params.include_query,
                self.precision, self.fused_config or fused.DEFAULT_CONFIG,
            )  # fmt: skip
            return loss_from_rank(rank, pos, positives.counts, params)
        rank = self._kernels("rsk_embeddings").rank_from_embeddings(
            query_emb, ref_emb, pos, positives.self_index.contiguous(), params.tau_rank, params.include_query,
            self.precision,
        )  # fmt: skip
        return loss_from_rank(rank, pos, positives.counts, params)


register_backend(TritonBackend())
register_backend(TritonBackend(kernel="fused"))

