"""Small models, losses and data for the engine tests (no dependency on recallk.models / recallk.losses)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class TinyNet(nn.Module):
    """Conv -> BatchNorm -> ReLU -> Dropout -> pool -> Linear -> L2: (n, 3, H, W) -> (n, dim)."""

    def __init__(self, dim: int = 6, dropout: float = 0.3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(dropout)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(16, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(F.relu(self.bn(self.conv(x))))
        return F.normalize(self.head(self.pool(x).flatten(1)), dim=1)


def make_net(seed: int = 0, dropout: float = 0.3, dtype: torch.dtype = torch.float64) -> TinyNet:
    """A TinyNet with non-trivial BatchNorm running statistics."""
    torch.manual_seed(seed)
    net = TinyNet(dropout=dropout).to(dtype)
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net


def contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over queries of -log softmax mass on same-class items (temperature 0.2), query excluded."""
    sim = embeddings @ embeddings.T / 0.2
    eye = torch.eye(len(labels), dtype=torch.bool, device=embeddings.device)
    sim = sim.masked_fill(eye, float("-inf"))
    positive = (labels[:, None] == labels[None, :]) & ~eye
    log_prob = sim.log_softmax(dim=1)
    per_query = -(log_prob.masked_fill(~positive, 0).sum(1) / positive.sum(1).clamp(min=1))
    return per_query.mean()


class RandomMixLoss(nn.Module):
    """A loss that draws random numbers from the global torch RNG on every call (like SiMix) and has a
    learnable parameter (like proxy-based losses)."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.proxy = nn.Parameter(torch.linspace(-1, 1, dim, dtype=torch.float64))

    def draw(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.rand(n, 1, dtype=like.dtype, device=like.device)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        alpha = self.draw(len(labels), embeddings)
        mixed = alpha * embeddings + (1 - alpha) * embeddings.roll(1, dims=0)
        both = torch.cat([embeddings, mixed])
        return contrastive_loss(both, torch.cat([labels, labels])) + (embeddings @ self.proxy.to(embeddings)).pow(
            2
        ).mean()


class GeneratorMixLoss(RandomMixLoss):
    """RandomMixLoss drawing from its own generator, which it exposes as extra state in the losses' format
    (``{"generator_state": ByteTensor}``), so that it travels with ``state_dict()``."""

    def __init__(self, seed: int, dim: int = 6) -> None:
        super().__init__(dim)
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.rand(n, 1, generator=self.generator, dtype=like.dtype).to(like.device)

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        return {"generator_state": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator_state"])


def make_batch(batch: int = 12, classes: int = 4, size: int = 6, seed: int = 1, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=generator, dtype=dtype)
    labels = torch.arange(batch) % classes
    return images, labels


class NoisyImages(torch.utils.data.Dataset):
    """``classes`` x ``per_class`` random images; each access adds noise from the global torch RNG (stands for
    random augmentation in the loader)."""

    def __init__(self, classes: int = 6, per_class: int = 6, size: int = 6, seed: int = 0,
                 dtype: torch.dtype = torch.float64, noise: float = 0.05) -> None:
        self.noise = noise
        generator = torch.Generator().manual_seed(seed)
        self.labels = np.repeat(np.arange(classes), per_class).astype(np.int64)
        centers = torch.randn(classes, 3, size, size, generator=generator)
        noise = torch.randn(len(self.labels), 3, size, size, generator=generator)
        self.images = (centers[self.labels] + 0.5 * noise).to(dtype)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.noise:
            image = image + self.noise * torch.randn_like(image)
        return image, int(self.labels[index])


def nearest_neighbour_eval(dataset: NoisyImages):
    """eval_fn: leave-one-out 1-NN hit rate of the clean images, reported as recall@1 and (for the trainer's
    best-checkpoint choice) map@r."""

    def evaluate(model: nn.Module, epoch: int) -> dict[str, float]:
        with torch.no_grad():
            emb = model(dataset.images.to(next(model.parameters()).dtype))
        sim = emb @ emb.T
        sim.fill_diagonal_(-float("inf"))
        labels = torch.as_tensor(dataset.labels)
        hit = (labels[sim.argmax(1)] == labels).double().mean().item()
        return {"recall@1": hit, "map@r": hit, "num_queries": len(labels)}

    return evaluate


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}


class RandomRGBImages(torch.utils.data.Dataset):
    """4 classes x 4 random float32 RGB images of 32 x 32 (a model's input as the Trainer's loader gives it)."""

    def __init__(self) -> None:
        self.labels = np.repeat(np.arange(4), 4).astype(np.int64)
        self.images = torch.randn(len(self.labels), 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])
