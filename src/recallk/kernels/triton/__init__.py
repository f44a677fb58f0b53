"""Fused Triton kernels for the RS@k loss (CUDA; CPU only under Triton's interpreter, TRITON_INTERPRET=1).

Public names:

* ``rsk_loss_triton(sim, q_labels, db_labels, self_index, ks, tau_rank, tau_k, include_query)``: the loss of a
  (Q, N) similarity matrix, differentiable w.r.t. ``sim``.
* ``rsk_loss_triton_from_embeddings(q_emb, db_emb, q_labels, db_labels, self_index, ks, tau_rank, tau_k,
  include_query, precision="ieee")``: the same loss of ``q_emb @ db_emb^T`` without storing it.
* ``triton_available()``: whether triton can be imported.

The kernel modules are imported on first use, not with this package: Triton decides at a kernel's definition
whether it is compiled or interpreted (TRITON_INTERPRET), so importing ``recallk`` must not fix that choice.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__all__ = ["rsk_loss_triton", "rsk_loss_triton_from_embeddings", "triton_available"]

_LAZY = {
    "rsk_loss_triton": "recallk.kernels.triton.rsk_similarity",
    "rsk_loss_triton_from_embeddings": "recallk.kernels.triton.rsk_embeddings",
}


def triton_available() -> bool:
    """True when the ``triton`` package is installed (it still needs CUDA or TRITON_INTERPRET=1 to run)."""
    return importlib.util.find_spec("triton") is not None


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
