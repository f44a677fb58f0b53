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

from recallk.kernels import rsk, torch_rsk, triton  # noqa: F401  (each backend file registers its backend)
from recallk.kernels.rsk import *  # noqa: F403

__all__ = list(rsk.__all__)

