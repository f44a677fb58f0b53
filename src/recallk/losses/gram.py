"""The batch similarity ``E E^T`` with a one-matmul backward (the Gram trick), used by RS@k's matrix path."""

from __future__ import annotations

import itertools

import torch

__all__ = ["gram"]

#: On the CPU, from this many rows up, only the upper triangle of ``_SYMMETRIC_BLOCKS`` x ``_SYMMETRIC_BLOCKS``
#: row blocks is multiplied (10 of 16 block products); the blocks below are their transposes.
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
        if torch.amp.is_autocast_available(emb.device.type):  # a backward run inside autocast stays in emb's dtype
            with torch.autocast(device_type=emb.device.type, enabled=False):
                return (grad + grad.T).to(emb.dtype) @ emb
        return (grad + grad.T) @ emb


def gram(embeddings: torch.Tensor) -> torch.Tensor:
    """(B, d) -> (B, B) matrix of inner products ``E E^T``, differentiable (twice only through autograd's
    first-order rule; use ``embeddings @ embeddings.T`` when double backward is needed)."""
    return _Gram.apply(embeddings)
