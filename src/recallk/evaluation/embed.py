"""Embed every item of a dataset with a model, in batches, without gradients."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from recallk.data.transforms import with_device_normalize
from recallk.utils import autocast_dtype, resolve_device

_FLUSH_EVERY = 16  # batches whose embeddings stay on the device before one copy to the host (fewer syncs)


def embed_dataset(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    device: str | torch.device | None = "auto",
    num_workers: int = 0,
    amp: bool | str | None = "auto",
    progress: bool = True,
    device_normalize: bool = True,
    prefetch_factor: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``model`` over ``dataset`` in item order and return its embeddings and labels.

    The model is moved to ``device`` and put in eval mode (its previous train/eval mode is restored after);
    the forward passes run under ``torch.inference_mode``. No normalisation is applied: the model's output is
    returned as is (recallk models end with L2 normalisation).

    Args:
        model: maps an image batch (B, ...) to embeddings (B, d).
        dataset: items ``(image_tensor, label)`` with an integer label.
        batch_size: images per forward pass.
        device: "auto" (a GPU when present), None (same as "auto"), or any torch device.
        num_workers: DataLoader worker processes.
        amp: autocast setting (``recallk.utils.autocast_dtype``): "auto" = bf16 on CUDA and full precision on
            the CPU; None/False = full precision; True or "bf16" = bfloat16; "fp16" = float16.
        progress: show a tqdm bar.
        device_normalize: when the dataset's ``.transform`` ends with ``ToTensor() + Normalize`` (what
            :func:`recallk.data.build_transforms` makes), the workers hand uint8 images (a quarter of the bytes
            to move; pinned on CUDA, copied without blocking) and the float conversion and normalisation run on
            the device (:func:`recallk.data.transforms.split_device_normalize`; the same values bit for bit).
        prefetch_factor: batches each worker loads ahead (ignored without workers).

    Returns:
        ``(embeddings, labels)``: numpy (N, d) float32 and (N,) int64, row i from item i.

    Raises:
        ValueError: empty dataset, batch_size < 1, a bad ``amp``, or a model output that is not (B, d).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: nothing to embed")
    dev = resolve_device(device)
    amp_dtype = autocast_dtype(amp, dev)
    source, normalize = with_device_normalize(dataset) if device_normalize else (dataset, None)
    loader = DataLoader(
        source,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
        drop_last=False,
        prefetch_factor=prefetch_factor if num_workers else None,
    )
    was_training = model.training
    model.to(dev).eval()
    n = len(dataset)
    embeddings: np.ndarray | None = None  # allocated once the embedding size is known
    labels = np.empty(n, dtype=np.int64)
    filled = 0
    pending: list[torch.Tensor] = []  # embeddings still on the device, rows [flushed, filled)
    flushed = 0

    def flush() -> None:
        nonlocal flushed, pending
        if pending:
            block = torch.cat(pending).float().cpu().numpy()
            embeddings[flushed: flushed + len(block)] = block  # type: ignore[index]
            flushed += len(block)
            pending = []

    try:
        with torch.inference_mode():
            for images, batch_labels in tqdm(loader, desc="embedding", unit="batch", disable=not progress):
                images = images.to(dev, non_blocking=True)
                if normalize is not None:
                    images = normalize(images)
                with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    out = model(images)
                if out.ndim != 2 or out.shape[0] != images.shape[0]:
                    raise ValueError(
                        f"the model must return (batch, dim) embeddings; got shape {tuple(out.shape)} "
                        f"for a batch of {images.shape[0]}"
                    )
                if embeddings is None:
                    embeddings = np.empty((n, out.shape[1]), dtype=np.float32)
                stop = filled + out.shape[0]
                if stop > n:
                    raise ValueError(f"the dataset reports {n} items but yielded more")
                pending.append(out)
                labels[filled:stop] = torch.as_tensor(batch_labels).cpu().numpy()
                filled = stop
                if len(pending) >= _FLUSH_EVERY:
                    flush()
            flush()
    finally:
        model.train(was_training)
    if filled != n:  # a dataset whose __len__ disagrees with what it yields
        raise ValueError(f"the dataset reports {n} items but yielded {filled}")
    return embeddings, labels
