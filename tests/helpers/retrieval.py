"""Untrained run folders and hand-made PNGs for the retrieval tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from recallk.config import dump_config, load_config
from recallk.engine.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from recallk.models import build_model

ROOT = Path(__file__).resolve().parents[2]


def make_untrained_run(folder: Path, embed_dim: int = 16, seed: int = 0, image_size: int = 32,
                       model: str = "resnet10t") -> Path:
    """A run folder (config.yaml + checkpoints/best.pt, trainer format) of a randomly initialised model."""
    config = load_config(ROOT / "configs" / "kanji.yaml",
                         [f"model.name={model}", f"model.embed_dim={embed_dim}", f"data.image_size={image_size}"])
    folder.mkdir(parents=True, exist_ok=True)
    dump_config(config, folder / "config.yaml")
    torch.manual_seed(seed)
    net = build_model(model, embed_dim=embed_dim, freeze_bn=False).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so eval mode matters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    save_checkpoint({"format": CHECKPOINT_FORMAT, "model": net.state_dict()}, folder / "checkpoints" / "best.pt")
    return folder / "checkpoints" / "best.pt"


def write_pngs(folder: Path, count: int, size: tuple[int, int] = (45, 37), seed: int = 0) -> list[Path]:
    """Hand-made PNGs (shapes on noise, not square) in ``folder``; returns their paths in name order."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        draw.ellipse((4 + i, 5, 30 + i, 30), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        path = folder / f"img_{i:03d}.png"
        image.save(path)
        paths.append(path)
    return paths
