"""Global pooling of backbone features into one vector per image: GeM, average, max, CLS token, or the backbone's
own head (``"head"``: timm's ``forward_head``, run by :class:`recallk.models.EmbeddingModel`)."""

from __future__ import annotations

import torch
from torch import nn

POOLINGS = ("gem", "avg", "max", "cls", "head")


class GeM(nn.Module):
    """Generalised mean pooling ``(mean x^p)^(1/p)`` with a learnable exponent p (Radenovic et al.).

    Input values are clamped to ``eps`` first, so GeM suits non-negative features (post-ReLU CNN maps).
    ``p = 1`` is average pooling and ``p -> inf`` tends to max pooling.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        """Pool ``x`` over ``dims``; the output drops those dims and keeps x's dtype."""
        p = self.p.to(x.dtype)
        return x.clamp(min=self.eps).pow(p).mean(dim=dims).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}"


class GlobalPool(nn.Module):
    """Turn backbone features into ``(N, C)`` vectors.

    Accepts feature maps ``(N, C, H, W)`` (``channels_last=False``) or ``(N, H, W, C)``
    (``channels_last=True``, e.g. Swin) and token sequences ``(N, T, C)`` whose first ``num_prefix_tokens``
    are class/register tokens.
    ``"cls"`` takes token 0 (sequences only); ``"gem"``, ``"avg"`` and ``"max"`` pool over the spatial
    positions or over the patch tokens (prefix tokens excluded). ``"head"`` (the backbone's own trained pooling
    and projection) is no computation of this module: :class:`recallk.models.EmbeddingModel` calls the
    backbone's ``forward_head`` instead, and calling this module with it raises ValueError.

    Raises:
        ValueError: unknown method, or ``"cls"`` for a backbone without a class token.
    """

    def __init__(self, method: str, num_prefix_tokens: int = 0, channels_last: bool = False) -> None:
        super().__init__()
        if method not in POOLINGS:
            raise ValueError(f"unknown pooling {method!r}; choose from {', '.join(POOLINGS)}")
        self.method = method
        self.num_prefix_tokens = num_prefix_tokens
        self.channels_last = channels_last
        self.gem = GeM() if method == "gem" else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.method == "head":
            raise ValueError("pooling 'head' is the backbone's own forward_head, which EmbeddingModel runs")
        if features.ndim == 3:
            if self.method == "cls":
                if self.num_prefix_tokens < 1:
                    raise ValueError("pooling 'cls' needs a backbone with a class token; use 'avg'")
                return features[:, 0]
            features, dims = features[:, self.num_prefix_tokens :], (1,)
        elif features.ndim == 4:
            if self.method == "cls":
                raise ValueError("pooling 'cls' needs a token sequence, but the backbone gives a feature map")
            dims = (1, 2) if self.channels_last else (2, 3)
        else:
            raise ValueError(f"cannot pool backbone features of shape {tuple(features.shape)}")
        if self.method == "gem":
            return self.gem(features, dims)
        if self.method == "avg":
            return features.mean(dim=dims)
        return features.amax(dim=dims)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, num_prefix_tokens={self.num_prefix_tokens}"
