"""Embedding images and collections, and the embedding file.

**The embedding file** is an uncompressed ``.npz`` (numpy's zip of ``.npy`` arrays). ``numpy.load(path)`` opens
it without recallk and without pickle (every array is numeric or fixed-width unicode), it stores float16 and
float32 exactly as they are, and it adds no dependency (parquet would need pyarrow and a row layout for a
matrix). Arrays:

- ``embeddings``: (N, d) float32 or float16, L2-normalised rows, row i from item i;
- ``labels``: (N,) int64 class ids, -1 where unknown (a plain image folder);
- ``paths``: (N,) unicode, the image file of each item, or ``"<dataset>/<split>#<i>"`` for items without a
  file (kanji renders its images);
- ``classes``: (C,) unicode class names (``classes[labels[i]]``), empty when unknown;
- ``metadata``: a 0-d unicode array holding JSON: ``format`` ("recallk-embeddings"), ``format_version``, the
  model identity (``model_id``, ``checkpoint``, ``checkpoint_sha256``, the model config, ``preprocessing``),
  ``source`` (dataset, root, split, options, or the image folder), ``count``, ``dim``, ``dtype``.

The run folder's ``embeddings/<split>.npz`` (``embeddings``, ``labels``) is a subset of this layout.

Writing is atomic (temporary file + ``os.replace``) and restartable: finished shards of ``shard_size`` items
wait in ``<out>.partial/`` and a rerun with the same model and items continues from them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from recallk import __version__
from recallk.data.datasets.base import load_rgb, to_rgb8
from recallk.data.datasets.folder import IMAGE_SUFFIXES
from recallk.data.transforms import transforms_for_model
from recallk.evaluation import embed_dataset
from recallk.retrieval.checkpoint import TrainedModel
from recallk.run_folder import write_atomic

FILE_FORMAT = "recallk-embeddings"
FILE_FORMAT_VERSION = 1
UNKNOWN_LABEL = -1
ImageLike = str | os.PathLike | Image.Image | np.ndarray


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Every image file below ``folder`` (recursively, suffixes of ``recallk.data``'s folder loader, any case;
    hidden files and folders skipped), sorted by path.

    Raises:
        ValueError: ``folder`` is not a directory, or holds no image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"image folder not found: {root}")
    found = sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not found:
        raise ValueError(f"no images in {root} (looked recursively for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


def expand_images(items: Sequence[ImageLike] | ImageLike) -> tuple[list[ImageLike], list[str]]:
    """Images and their names: a folder becomes its :func:`image_files`; a path or image stays one item.

    Raises:
        ValueError: no items, a path that does not exist, an empty folder.
    """
    if isinstance(items, (str, os.PathLike, Image.Image, np.ndarray)):
        items = [items]
    images: list[ImageLike] = []
    names: list[str] = []
    for i, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if path.is_dir():
                files = image_files(path)
                images.extend(files)
                names.extend(str(f) for f in files)
            elif path.is_file():
                images.append(path)
                names.append(str(path))
            else:
                raise ValueError(f"query image not found: {path}")
        else:
            images.append(item)
            names.append(f"image #{i}")
    if not images:
        raise ValueError("no images given")
    return images, names


def to_rgb(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a path (``recallk.data``'s reader: bad files raise BadImageError, a ValueError), a
    PIL image in any mode (``recallk.data``'s conversion: 16-bit, transparency, EXIF orientation) or a uint8 array
    (H, W) / (H, W, 3)."""
    if isinstance(image, (str, os.PathLike)):
        return load_rgb(image)
    if isinstance(image, Image.Image):
        return to_rgb8(image)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"image arrays must be uint8 (H, W) or (H, W, 3), got {array.dtype} {array.shape}")
    return Image.fromarray(array).convert("RGB")


def class_folder_labels(folder: str | os.PathLike, files: Sequence[Path]) -> tuple[np.ndarray, list[str]] | None:
    """The class labels of ``files`` (:func:`image_files` of ``folder``) when ``folder`` is laid out as
    ``<class>/<image>`` (the folder dataset's layout: every image below a sub-folder, the class its first folder,
    class ids in sorted name order), as ``(labels (N,) int64, class names)``; None when an image lies directly in
    ``folder`` or ``folder`` holds ``train/`` and ``test/`` (split folders, not classes). Raises nothing."""
    root = Path(folder)
    if (root / "train").is_dir() and (root / "test").is_dir():
        return None
    parts = [Path(f).relative_to(root).parts for f in files]
    if not parts or any(len(p) < 2 for p in parts):
        return None
    classes = sorted({p[0] for p in parts})
    ids = {name: i for i, name in enumerate(classes)}
    return np.array([ids[p[0]] for p in parts], dtype=np.int64), classes


class ImageItems(Dataset):
    """Images (paths, PIL images or uint8 arrays) as a dataset of ``(transform(image), label)``; ``.paths`` names
    them (the path, or ``"image #i"``), ``.labels`` are -1 unless given, ``.classes`` the class names of the labels
    (empty unless given)."""

    def __init__(self, images: Sequence[ImageLike], transform: Any, labels: Sequence[int] | None = None,
                 classes: Sequence[str] = ()) -> None:
        self.images = list(images)
        self.paths = [str(p) if isinstance(p, (str, os.PathLike)) else f"image #{i}" for i, p in enumerate(self.images)]
        self.transform = transform
        self.labels = np.full(len(self.images), UNKNOWN_LABEL, np.int64) if labels is None else np.asarray(labels)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = to_rgb(self.images[i])
        return (self.transform(image) if self.transform is not None else image), int(self.labels[i])


def embed_images(
    model: TrainedModel | torch.nn.Module,
    images: Sequence[ImageLike] | ImageLike,
    transform: Any = None,
    batch_size: int = 64,
    device: str | torch.device | None = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """Embed images with a model's test-time transform.

    Args:
        model: a :class:`TrainedModel` (its own transform is used) or an embedding ``nn.Module`` (then
            ``transform``; else the run's test transform for a model of :func:`recallk.load_model` (its
            ``test_transform``); else ``recallk.data.transforms_for_model(model, "test")``, the default size).
        images: image paths, folders (all their images, sorted), PIL images or uint8 arrays, or one of these.
        transform: PIL image -> (3, H, W) float tensor; overrides the model's.
        batch_size, device, progress: as ``recallk.evaluation.embed_dataset`` (full precision on the CPU).

    Returns:
        (N, d) float32 numpy embeddings, row i from image i (folders expanded in place).

    Raises:
        ValueError: no images, a missing path, an empty folder, an unreadable image (``BadImageError`` names it).
    """
    network = model.model if isinstance(model, TrainedModel) else model
    if transform is None:
        transform = (model.transform if isinstance(model, TrainedModel)
                     else getattr(model, "test_transform", None) or transforms_for_model(model, "test"))
    items, _ = expand_images(images)
    embeddings, _ = embed_dataset(network, ImageItems(items, transform), batch_size=batch_size, device=device,
                                  progress=progress)
    return embeddings


@dataclass
class EmbeddingFile:
    """The arrays and metadata of an embedding file (module docstring); ``embeddings`` as stored."""

    embeddings: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    classes: list[str]
    metadata: dict[str, Any]

    @property
    def model_id(self) -> str | None:
        return self.metadata.get("model_id")

    def float32(self) -> np.ndarray:
        """The embeddings as C-contiguous float32 (N, d)."""
        return np.ascontiguousarray(self.embeddings, dtype=np.float32)


def read_embeddings(path: str | os.PathLike) -> EmbeddingFile:
    """Read an embedding file written by :func:`write_embeddings` (or a run's ``embeddings/<split>.npz``: only
    ``embeddings`` and ``labels``, empty metadata).

    Raises:
        ValueError: missing file, not an npz, missing arrays, shapes that disagree, an unknown format version.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"embedding file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as e:
        raise ValueError(f"{path} is not a readable .npz embedding file ({type(e).__name__}: {e})") from e
    if "embeddings" not in arrays:
        raise ValueError(f"{path} holds no 'embeddings' array (has: {sorted(arrays)}); write it with recallk embed")
    emb = arrays["embeddings"]
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(f"{path}: embeddings must be a non-empty (N, d) array, got shape {emb.shape}")
    n = emb.shape[0]
    labels = arrays.get("labels", np.full(n, UNKNOWN_LABEL, np.int64)).reshape(-1).astype(np.int64)
    paths = arrays.get("paths", np.array([f"#{i}" for i in range(n)]))
    metadata = json.loads(str(arrays["metadata"])) if "metadata" in arrays else {}
    if metadata and (metadata.get("format") != FILE_FORMAT or metadata.get("format_version") != FILE_FORMAT_VERSION):
        raise ValueError(
            f"{path} is a {metadata.get('format')!r} file of version {metadata.get('format_version')!r}; this "
            f"recallk ({__version__}) reads {FILE_FORMAT!r} version {FILE_FORMAT_VERSION}: re-embed with it"
        )
    if labels.shape[0] != n or paths.shape[0] != n:
        raise ValueError(f"{path}: {n} embeddings but {labels.shape[0]} labels and {paths.shape[0]} paths")
    return EmbeddingFile(emb, labels, paths, [str(c) for c in arrays.get("classes", [])], metadata)


def _item_ids(dataset: Any, source: dict[str, Any]) -> list[str]:
    paths = getattr(dataset, "paths", None)
    if paths is not None and len(paths) == len(dataset):
        return [str(p) for p in paths]
    return [f"{source.get('dataset')}/{source.get('split')}#{i}" for i in range(len(dataset))]


def write_embeddings(
    trained: TrainedModel,
    dataset: Dataset,
    out: str | os.PathLike,
    source: dict[str, Any],
    *,
    float16: bool = False,
    batch_size: int = 64,
    device: str | torch.device | None = "cpu",
    num_workers: int = 0,
    shard_size: int = 2048,
    progress: bool = True,
) -> Path:
    """Embed every item of ``dataset`` (items ``(transformed image, label)``) and write an embedding file.

    Args:
        trained: the model (its identity goes into the file).
        dataset: with ``.labels`` ((N,) int, -1 unknown), optionally ``.paths`` and ``.classes``.
        out: the ``.npz`` to write (atomically); ``<out>.partial/`` holds finished shards until it is written.
        source: JSON-ready description of what was embedded (dataset, root, split, options or folder).
        float16: store the embeddings as float16 (half the size; scores change by about 1e-3).
        batch_size, device, num_workers: as ``recallk.evaluation.embed_dataset``.
        shard_size: items per restart unit.
        progress: a tqdm bar over the items.

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: an empty dataset, an unreadable image (the finished shards stay for a rerun), shard_size < 1.
    """
    out = Path(out)
    n = len(dataset)
    if n == 0:
        raise ValueError("nothing to embed: the dataset is empty")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    ids = _item_ids(dataset, source)
    labels = np.asarray(getattr(dataset, "labels", np.full(n, UNKNOWN_LABEL)), dtype=np.int64).reshape(-1)
    partial = out.with_name(out.name + ".partial")
    manifest = {"model_id": trained.model_id, "count": n, "shard_size": shard_size,
                "items": _digest(ids)}
    manifest_path = partial / "manifest.json"
    if partial.is_dir() and (not manifest_path.is_file() or json.loads(manifest_path.read_text()) != manifest):
        shutil.rmtree(partial)  # another model, other items or another shard size: start again
    partial.mkdir(parents=True, exist_ok=True)
    write_atomic(manifest_path, json.dumps(manifest))
    starts = range(0, n, shard_size)
    bar = tqdm(total=n, desc=f"embedding {out.name}", unit="img", disable=not progress)
    shards = []
    try:
        for start in starts:
            shard = partial / f"shard_{start // shard_size:06d}.npy"
            stop = min(start + shard_size, n)
            if not shard.is_file():
                emb, _ = embed_dataset(trained.model, Subset(dataset, range(start, stop)), batch_size=batch_size,
                                       device=device, num_workers=num_workers, progress=False)
                write_atomic(shard, lambda f, e=emb: np.save(f, e))
            shards.append(shard)
            bar.update(stop - start)
    finally:
        bar.close()
    embeddings = np.concatenate([np.load(s) for s in shards]).astype(np.float16 if float16 else np.float32)
    classes = [str(c) for c in (getattr(dataset, "classes", None) or [])]
    metadata = {"format": FILE_FORMAT, "format_version": FILE_FORMAT_VERSION, **trained.identity(),
                "source": source, "count": n, "dim": int(embeddings.shape[1]), "dtype": str(embeddings.dtype),
                "normalized": True}
    arrays = {"embeddings": embeddings, "labels": labels, "paths": np.array(ids, dtype=str),
              "classes": np.array(classes, dtype=str), "metadata": np.array(json.dumps(metadata))}
    write_atomic(out, lambda f: np.savez(f, **arrays))
    shutil.rmtree(partial, ignore_errors=True)
    return out


def _digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()
