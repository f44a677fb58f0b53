"""RS@k loss kernels behind one interface: :func:`rsk_loss_from_similarity` (from a (Q, N) similarity matrix) and
:func:`rsk_loss_from_embeddings` (never storing that matrix) check their inputs once and dispatch to a registered
:class:`Backend` by name:

- ``"torch"``: :mod:`recallk.kernels.torch_rsk` (any device);
- ``"triton"``: :mod:`recallk.kernels.triton` (CUDA; its kernel modules are imported on first use);
- ``"auto"``: Triton for CUDA tensors when it is installed, torch otherwise.

A new backend is one file with an object satisfying :class:`Backend` and a ``register_backend(...)`` line,
imported below; ``tests/kernels/test_backend_contract.py`` then tests it.
"""

from __future__ import annotations

import warnings
from typing import Any

from recallk.kernels import rsk, torch_rsk, triton  # noqa: F401  (each backend file registers its backend)
from recallk.kernels.rsk import *  # noqa: F403

__all__ = list(rsk.__all__)


def _rsk_loss_torch(sim, q_labels, db_labels, self_index, ks, tau_rank, tau_k, include_query, block_size=None):  # type: ignore[no-untyped-def]
    params = rsk.RSkParams(ks, tau_rank, tau_k, include_query)
    return rsk.rsk_loss_from_similarity(sim, q_labels, db_labels, params, self_index=self_index, backend="torch",
                                        block_size=block_size)  # fmt: skip


def _rsk_loss_torch_from_embeddings(  # type: ignore[no-untyped-def]
    q_emb, db_emb, q_labels, db_labels, self_index, ks, tau_rank, tau_k, include_query, block_size=None
):
    params = rsk.RSkParams(ks, tau_rank, tau_k, include_query)
    return rsk.rsk_loss_from_embeddings(q_emb, db_emb, q_labels, db_labels, params, self_index=self_index,
                                        backend="torch", block_size=block_size)  # fmt: skip


_DEPRECATED = {  # old name -> (value, new spelling)
    "BACKENDS": (rsk.backend_names, "backend_names()"),
    "rsk_loss_torch": (lambda: _rsk_loss_torch, "rsk_loss_from_similarity(..., RSkParams(...), backend='torch')"),
    "rsk_loss_torch_from_embeddings": (
        lambda: _rsk_loss_torch_from_embeddings, "rsk_loss_from_embeddings(..., RSkParams(...), backend='torch')"
    ),
}


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        value, new = _DEPRECATED[name]
        warnings.warn(f"recallk.kernels.{name} is deprecated: use recallk.kernels.{new}", DeprecationWarning,
                      stacklevel=2)  # fmt: skip
        return value()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
