"""The cached two-pass step: batches larger than memory with the gradient of one full-batch backward.

method.md section 3. Pass 1 embeds the batch in chunks without autograd and keeps only the (B, d) embeddings
and each chunk's RNG state; the loss of the full batch gives G = dL/dE; pass 2 re-runs each chunk with autograd,
the RNG state replayed, and back-propagates ``G[chunk]``. Memory is that of one chunk plus O(B * d) (plus
whatever the loss itself needs, O(B^2) for RS@k), independent of B.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import torch
from torch import nn

from recallk.engine.rng import RngState

_HALF_DTYPES = (torch.float16, torch.bfloat16)
Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: A function run on each chunk once it is on the device, before the model (pass 1 and pass 2 alike).
Prepare = Callable[[torch.Tensor], torch.Tensor]


class Gather(Protocol):
    """How :func:`cached_backward` shares one global batch between processes (see ``engine/distributed.py``)."""

    def loss_and_grad(
        self, criterion: Criterion, embeddings: torch.Tensor, labels: torch.Tensor, *,
        scaler: torch.amp.GradScaler | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The loss of the global batch and this rank's rows of G = dL/dE, from this rank's pass-1 ``embeddings``
        (n_r, d) and ``labels`` (n_r,): (detached scalar loss, the same on every rank; G's rows (n_r, d), scaled
        by the GradScaler as :func:`loss_and_embedding_grad` scales them). Collective: every rank calls it.
        How the loss's work is split between the ranks is the gather's business."""

    def shared_randomness(self, criterion: Criterion, device: torch.device) -> contextlib.AbstractContextManager:
        """Context in which the criterion (run on ``device``) draws the same random numbers on every rank."""

    def reduce_gradients(self, model: nn.Module, criterion: Criterion) -> None:
        """Combine the ranks' gradients after pass 2 into those of the whole global batch."""


def split_into_chunks(images: torch.Tensor, chunk_size: int) -> list[torch.Tensor]:
    """Views of ``images`` (B, ...) along dim 0, each of at most ``chunk_size`` items (the last may be smaller).

    Raises ValueError for an empty batch or ``chunk_size < 1``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    if images.shape[0] == 0:
        raise ValueError("cannot take a step on an empty batch (images has 0 rows)")
    return list(torch.split(images, chunk_size, dim=0))


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_step_device(model: nn.Module, images: torch.Tensor, device: torch.device | str | None) -> torch.device:
    """The device to run the model on: ``device`` if given, else that of the model's first parameter/buffer."""
    if device is not None:
        return torch.device(device)
    return next(itertools.chain(model.parameters(), model.buffers()), images).device


def _prepared(chunk: torch.Tensor, device: torch.device, prepare: Prepare | None) -> torch.Tensor:
    chunk = chunk.to(device, non_blocking=True)
    return prepare(chunk) if prepare is not None else chunk


def _embed_stream(
    model: nn.Module,
    chunks: Iterable[torch.Tensor],
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    prepare: Prepare | None,
) -> tuple[torch.Tensor, list[RngState], list[torch.Tensor]]:
    """Pass 1 over chunks as they arrive: (embeddings (B, d), RNG states, the chunks as received)."""
    states: list[RngState] = []
    outputs: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    with torch.no_grad():
        for chunk in chunks:
            kept.append(chunk)
            states.append(RngState(device))
            with _autocast(device, autocast_dtype):
                out = model(_prepared(chunk, device, prepare))
            outputs.append(out.float() if out.dtype in _HALF_DTYPES else out)
    if not outputs:
        raise ValueError("cannot take a step on an empty batch (no chunk arrived)")
    embeddings = torch.cat(outputs)
    if embeddings.ndim != 2:
        raise ValueError(f"the model must return (chunk, d) embeddings, got shape {tuple(outputs[0].shape)}")
    return embeddings, states, kept


def embed_without_grad(
    model: nn.Module,
    chunks: Iterable[torch.Tensor],
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    prepare: Prepare | None = None,
) -> tuple[torch.Tensor, list[RngState]]:
    """Pass 1: embed every chunk under ``torch.no_grad()``.

    Each chunk is moved to ``device`` (non-blocking) and, if given, ``prepare(chunk)`` runs there first (e.g.
    :class:`recallk.data.transforms.DeviceNormalize`: uint8 -> normalised float32). Returns the embeddings
    (B, d) on ``device`` (float32 when the model outputs half precision, else the model's dtype, e.g. float64
    in tests), and the RNG state captured just before each chunk's forward, for :func:`backward_chunks` to
    replay.
    """
    embeddings, states, _ = _embed_stream(model, chunks, device=device, autocast_dtype=autocast_dtype,
                                          prepare=prepare)
    return embeddings, states


def loss_and_embedding_grad(
    criterion: Criterion,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of the full batch and G = dL/dE.

    ``embeddings`` (B, d) is used as a leaf that requires grad; the criterion's own parameters (if any)
    receive their gradients here. With a GradScaler both G and those gradients are scaled, as
    ``scaler.scale(loss).backward()`` would scale them.
    Returns (detached scalar loss, G (B, d) in the dtype of ``embeddings``).
    Raises ValueError if the criterion does not return a scalar.
    """
    leaf = embeddings.detach().requires_grad_(True)
    loss = criterion(leaf, labels)
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"the criterion must return a scalar tensor, got {shape}")
    if not loss.requires_grad:  # e.g. a batch with no positive pairs: the loss is a constant
        return loss.detach(), torch.zeros_like(leaf)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    return loss.detach(), grad


def backward_chunks(
    model: nn.Module,
    chunks: Sequence[torch.Tensor],
    embedding_grad: torch.Tensor,
    rng_states: Sequence[RngState],
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    prepare: Prepare | None = None,
) -> None:
    """Pass 2: re-run each chunk with autograd and back-propagate its rows of ``embedding_grad`` (B, d).

    Each chunk's forward runs with its pass-1 RNG state replayed (``rng_states[i]``, from
    :func:`embed_without_grad`) on ``prepare(chunk)`` when given (the same function as in pass 1).
    Gradients accumulate into ``.grad``.
    """
    start = 0
    for chunk, rng_state in zip(chunks, rng_states, strict=True):
        stop = start + chunk.shape[0]
        with rng_state.replay(), _autocast(device, autocast_dtype):
            out = model(_prepared(chunk, device, prepare))
        grad = embedding_grad[start:stop]
        if out.shape != grad.shape:
            raise ValueError(f"pass 2 returned shape {tuple(out.shape)} for a chunk whose pass-1 embeddings "
                             f"have shape {tuple(grad.shape)}: the model must be deterministic given its input")
        out.backward(grad.to(out.dtype))
        start = stop


_BN_WARNED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _training_norms(model: nn.Module) -> list[nn.modules.batchnorm._NormBase]:
    """Normalisation layers (BatchNorm, SyncBatchNorm, InstanceNorm with running statistics) that are in train
    mode and track running statistics: the ones whose forward updates buffers."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats]  # fmt: skip


def _warn_ghost_batchnorm(model: nn.Module, norms: list[nn.Module], chunk_size: int) -> None:
    """The one-time warning (per model) that BatchNorm trains with per-chunk ("ghost batch") statistics."""
    if model in _BN_WARNED:
        return
    _BN_WARNED.add(model)
    warnings.warn(
        f"cached_backward: {len(norms)} BatchNorm layer(s) are in train mode, so each chunk of at most "
        f"{chunk_size} images is normalised with its own statistics (ghost-batch BatchNorm) and running statistics "
        "are updated once per chunk; the gradient is exactly that of this ghost-batch model, not of one BatchNorm "
        "over the whole batch. For the paper's setting (frozen BatchNorm, chunk-independent gradients) call "
        "recallk.models.freeze_batchnorm(model) or set model.freeze_bn: true in the config.",
        UserWarning,
        stacklevel=_caller_level(),
    )


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside this module: the warning then points at the user's call of
    the step (the cached step reaches the check through generators of varying depth)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


@contextlib.contextmanager
def _running_stats_kept(norms: list[nn.Module]) -> Iterator[None]:
    """Pass 2 must not update running statistics a second time: put them back as pass 1 left them."""
    saved = [(m.running_mean, m.running_var, m.num_batches_tracked) for m in norms]
    saved = [tuple(None if t is None else t.clone() for t in ts) for ts in saved]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, ts in zip(norms, saved):
                for name, value in zip(("running_mean", "running_var", "num_batches_tracked"), ts):
                    if value is not None and getattr(m, name) is not None:
                        getattr(m, name).copy_(value)


def cached_backward(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    criterion: Criterion,
    chunk_size: int,
    *,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    gather: Gather | None = None,
    prepare: Prepare | None = None,
) -> torch.Tensor:
    """Gradient of ``criterion(model(images), labels)`` in chunks of ``chunk_size``: one step of method.md §3.

    Args:
        model: maps (n, C, H, W) images to (n, d) embeddings. Its train/eval mode is the caller's business.
            BatchNorm in train mode has defined "ghost batch" semantics: each chunk is normalised with its own
            batch statistics, the gradient is exactly that of ``cat([model(chunk) for chunk in chunks])``, and
            running statistics are updated exactly once per chunk (in pass 1; pass 2 leaves them as it found
            them); a one-time warning per model says so. Frozen BatchNorm (:func:`freeze_batchnorm`,
            ``model.freeze_bn: true``) gives the gradient of one full-batch backward, whatever the chunk size.
        images: (B, C, H, W), already augmented; any device (moved chunk by chunk to ``device``).
        labels: int64 (B,).
        criterion: ``criterion(embeddings (B, d) float32 or wider, labels (B,)) -> scalar``; may have parameters and may
            draw random numbers (it is called once per step).
        chunk_size: images per forward pass; need not divide B.
        scaler: optional GradScaler; all gradients are then scaled as ``scaler.scale(loss).backward()`` does.
        autocast_dtype: torch.bfloat16 / torch.float16 to run the model under autocast, or None.
        device: where the model runs; default: the device of its parameters.
        gather: several processes (:class:`recallk.engine.distributed.DistributedGather`): ``images`` and
            ``labels`` are then this rank's rows of the global batch, the loss is that of the global batch (its
            work shared between the ranks as the gather's ``sharding`` says) and every rank ends with its
            gradient (gradients already in ``.grad`` are reduced too: zero them first).
        prepare: run on each chunk once on ``device`` (both passes), e.g. uint8 -> normalised float32
            (:class:`recallk.data.transforms.DeviceNormalize`); the gradient is that of the prepared batch.

    Returns:
        The loss, detached (a scalar on ``device``). Parameter gradients of the model and the criterion are
        accumulated into ``.grad`` exactly like a single ``criterion(model(images), labels).backward()`` on the
        (global) batch, with dropout/drop-path masks drawn as in pass 1.

    Raises:
        ValueError: empty batch, ``chunk_size < 1``, images/labels of different lengths, a non-scalar loss.
    """
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images has {images.shape[0]} rows but labels has {labels.shape[0]}; they must match")
    chunks = split_into_chunks(images, chunk_size)
    label_chunks = torch.split(labels, chunk_size)
    return cached_backward_stream(model, zip(chunks, label_chunks), criterion, scaler=scaler,
                                  autocast_dtype=autocast_dtype, device=resolve_step_device(model, images, device),
                                  gather=gather, prepare=prepare)


def cached_backward_stream(
    model: nn.Module,
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor]],
    criterion: Criterion,
    *,
    prepare: Prepare | None = None,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    gather: Gather | None = None,
) -> torch.Tensor:
    """:func:`cached_backward` on a batch that arrives chunk by chunk (streaming pass 1).

    Pass 1 embeds each chunk as soon as ``chunks`` yields it (later chunks may still be loading, e.g. from a
    :class:`recallk.data.loading.ChunkedBatchLoader`), and keeps the chunk as it arrived (uint8 when the
    loader hands uint8: 150 KB per 224 px image) for pass 2, which therefore reloads nothing and runs on
    exactly the pass-1 inputs (``prepare`` is deterministic and runs again on the device).

    Args:
        chunks: ``(images (n, ...), labels (n,) int64)`` pairs in batch order; images on any device (pinned
            host memory on CUDA: non-blocking copies). The chunk sizes may differ.
        prepare: run on each chunk once it is on ``device``, before the model (e.g.
            :class:`recallk.data.transforms.DeviceNormalize`: uint8 -> normalised float32, channels_last).
        criterion, scaler, autocast_dtype, device, gather: as in :func:`cached_backward`.

    Returns:
        The loss, detached; gradients accumulate into ``.grad`` exactly as :func:`cached_backward` on the
        concatenated (prepared) batch.

    Raises:
        ValueError: no chunk, a chunk whose images and labels differ in length, a non-scalar loss.
    """
    label_parts: list[torch.Tensor] = []
    norms = _training_norms(model)
    run_device = resolve_step_device(model, torch.empty(0), device)

    def images_of(stream: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[torch.Tensor]:
        for images, chunk_labels in stream:
            if images.shape[0] != chunk_labels.shape[0]:
                raise ValueError(f"a chunk has {images.shape[0]} images but {chunk_labels.shape[0]} labels; they "
                                 "must match")
            if images.shape[0] == 0:
                raise ValueError("cannot take a step on an empty chunk (0 images)")
            if norms and not label_parts:
                _warn_ghost_batchnorm(model, norms, images.shape[0])
            label_parts.append(chunk_labels)
            yield images

    embeddings, rng_states, kept = _embed_stream(model, images_of(chunks), device=run_device,
                                                 autocast_dtype=autocast_dtype, prepare=prepare)
    labels = torch.cat(label_parts).to(run_device)
    if gather is None:
        loss, grad = loss_and_embedding_grad(criterion, embeddings, labels, scaler=scaler)
    else:
        with gather.shared_randomness(criterion, run_device):
            loss, grad = gather.loss_and_grad(criterion, embeddings, labels, scaler=scaler)
    del embeddings
    with _running_stats_kept(norms):
        backward_chunks(model, kept, grad, rng_states, device=run_device, autocast_dtype=autocast_dtype,
                        prepare=prepare)
    if gather is not None:
        gather.reduce_gradients(model, criterion)
    return loss
