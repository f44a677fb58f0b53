"""Searching a gallery index with query images: :class:`Retriever`, its results as JSON and as an HTML page."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from recallk.report import html as report_html
from recallk.report.examples import QUERY_RGB, thumbnail_png
from recallk.retrieval.checkpoint import TrainedModel, load_trained_model
from recallk.retrieval.embed import ImageLike, embed_images, expand_images, to_rgb
from recallk.retrieval.index import GalleryIndex, IndexMismatchError
from recallk.run_folder import write_atomic

NEIGHBOUR_RGB = (230, 140, 0)  # frame of a gallery item whose class is not compared (query label unknown)
THUMB_SIZE = 96


@dataclass
class SearchResults:
    """Top-k gallery items of each query.

    Attributes:
        queries: (Q,) names (file paths, or ``"image #i"`` for in-memory images).
        scores: (Q, k) float32 inner products (cosine similarity), decreasing along a row.
        indices: (Q, k) int64 gallery rows. An approximate index (ivf with a small nprobe, hnsw with a small
            ef_search) may find fewer than k items: the row is then padded at its end with index -1 and score
            -inf. Index ``paths``/``labels`` only where :attr:`valid` (``paths[-1]`` is the last item, not a
            match); ``to_json`` leaves padding out.
        paths, labels, classes: the gallery's items (from the index sidecar).
    """

    queries: list[str]
    scores: np.ndarray
    indices: np.ndarray
    paths: np.ndarray
    labels: np.ndarray
    classes: list[str]

    @property
    def valid(self) -> np.ndarray:
        """(Q, k) bool: True where ``indices`` holds a gallery row, False at padding (-1, score -inf)."""
        return self.indices >= 0

    @property
    def short_queries(self) -> int:
        """How many queries got fewer than k neighbours (rows with padding)."""
        return int((~self.valid).any(axis=1).sum())

    def class_name(self, label: int) -> str | None:
        if label < 0:
            return None
        return self.classes[label] if 0 <= label < len(self.classes) else str(label)

    def to_json(self) -> list[dict[str, Any]]:
        """``[{"query": name, "neighbours": [{"rank", "index", "path", "label", "class", "score"}, ...]}, ...]``."""
        out = []
        for name, row_s, row_i in zip(self.queries, self.scores.tolist(), self.indices.tolist()):
            neighbours = [
                {"rank": r, "index": i, "path": str(self.paths[i]), "label": int(self.labels[i]),
                 "class": self.class_name(int(self.labels[i])), "score": s}
                for r, (s, i) in enumerate(zip(row_s, row_i), start=1) if i >= 0
            ]
            out.append({"query": name, "neighbours": neighbours})
        return out


class Retriever:
    """A trained model and a gallery index: ``Retriever.from_checkpoint(ckpt, index=path).search(images, k=10)``.

    Raises (constructor): IndexMismatchError (a ValueError) when the index was built from another model's
    embeddings (dimension or model identity differ).
    """

    def __init__(self, trained: TrainedModel, index: GalleryIndex, device: str | torch.device | None = "cpu",
                 batch_size: int = 64) -> None:
        if index.dim != trained.embed_dim:
            raise IndexMismatchError(
                f"the index holds {index.dim}-d embeddings but {trained.checkpoint} gives {trained.embed_dim}-d ones: "
                "the gallery was embedded with another model; search with that model's checkpoint, or re-embed the "
                "gallery (recallk embed) and rebuild the index with this one"
            )
        built_with = index.metadata.get("model_id")
        if built_with != trained.model_id:
            raise IndexMismatchError(
                f"the index was built from embeddings of model {str(built_with)[:12]} (checkpoint "
                f"{index.metadata.get('checkpoint')}) but {trained.checkpoint} is model {trained.model_id[:12]}: "
                "search with the checkpoint the gallery was embedded with, or re-embed the gallery with this one"
            )
        self.trained, self.index, self.device, self.batch_size = trained, index, device, batch_size

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, index: str | os.PathLike | GalleryIndex,
                        config: str | os.PathLike | None = None, device: str | torch.device | None = "cpu",
                        batch_size: int = 64) -> Retriever:
        """Load a checkpoint (:func:`load_trained_model`) and an index (path or :class:`GalleryIndex`)."""
        gallery = index if isinstance(index, GalleryIndex) else GalleryIndex.load(index)
        return cls(load_trained_model(checkpoint, config), gallery, device, batch_size)

    def embed(self, images: Sequence[ImageLike] | ImageLike) -> np.ndarray:
        """(Q, d) float32 embeddings of query images (paths, folders, PIL images, uint8 arrays)."""
        return embed_images(self.trained, images, batch_size=self.batch_size, device=self.device)

    def search(self, images: Sequence[ImageLike] | ImageLike, k: int = 10) -> SearchResults:
        """Embed the query images and return their k best gallery items (:meth:`GalleryIndex.search`).

        Raises:
            ValueError: no images, missing paths, empty folders, unreadable images, k out of range.
        """
        items, names = expand_images(images)
        scores, indices = self.index.search(self.embed(items), k)
        return SearchResults(names, scores, indices, self.index.paths, self.index.labels, self.index.classes)

    def gallery_image(self, row: int) -> Image.Image:
        """The image of gallery item ``row``: its file, or the item of the dataset named by the index's source."""
        path = Path(str(self.index.paths[row]))
        if path.is_file():
            return to_rgb(path)
        source = self.index.metadata.get("source") or {}
        if not source.get("dataset"):
            raise ValueError(f"gallery item {row} ({path}) is not a file and the index names no dataset")
        if not hasattr(self, "_gallery_dataset"):
            from recallk.data import build_dataset

            self._gallery_dataset = build_dataset(source["dataset"], source.get("root"), source.get("split"),
                                                  transform=None, **(source.get("options") or {}))
        return to_rgb(self._gallery_dataset[row][0])


def search_page(results: SearchResults, query_image: Callable[[int], Image.Image],
                gallery_image: Callable[[int], Image.Image], out: str | os.PathLike, title: str = "recallk search",
                subtitle: str = "") -> Path:
    """Write a self-contained HTML page (the report's look): one row per query, its neighbours after it.

    ``query_image(q)`` and ``gallery_image(row)`` give PIL images. Frames: query blue, neighbours orange;
    captions give rank, cosine similarity and class. Written atomically; returns ``out``.
    """
    cache: dict[int, str] = {}

    def gallery_uri(row: int) -> str:
        if row not in cache:
            cache[row] = report_html.data_uri(thumbnail_png(gallery_image(row), THUMB_SIZE, NEIGHBOUR_RGB))
        return cache[row]

    def figure(uri: str, lines: Sequence[str], tip: str, css: str) -> str:
        caption = "<br>".join(escape(line) for line in lines)
        return (f'<figure class="thumb {css}"><img alt="{escape(tip)}" src="{uri}">'
                f'<figcaption title="{escape(tip)}">{caption}</figcaption></figure>')

    rows = []
    for q, entry in enumerate(results.to_json()):
        name = Path(entry["query"]).name
        cells = [figure(report_html.data_uri(thumbnail_png(query_image(q), THUMB_SIZE, QUERY_RGB)),
                        ("query", name), entry["query"], "query"), '<span class="arrow">→</span>']
        for n in entry["neighbours"]:
            label = n["class"] if n["class"] is not None else Path(n["path"]).name
            cells.append(figure(gallery_uri(n["index"]), (f"{n['rank']}. {n['score']:.3f}", label),
                                f"rank {n['rank']}: {n['path']}, similarity {n['score']:.4f}", "neighbour"))
        rows.append(f'<div class="row" data-query="{q}">' + "".join(cells) + "</div>")
    legend = (f'<p class="legend"><span style="background:rgb{QUERY_RGB}">query</span>'
              f'<span style="background:rgb{NEIGHBOUR_RGB}">gallery item</span> caption: rank, cosine similarity, '
              "class (or file name)</p>")
    k = results.indices.shape[1]
    section = f"<h2>Queries and their top {k} gallery items</h2>\n{legend}\n" + "\n".join(rows)
    subtitle = subtitle or f"{len(results.queries)} queries · generated {time.strftime('%Y-%m-%d %H:%M:%S')}"
    document = report_html.page(title, subtitle, [section])
    return write_atomic(out, document)


def write_search_page(retriever: Retriever, images: Sequence[ImageLike] | ImageLike, results: SearchResults,
                      out: str | os.PathLike) -> Path:
    """:func:`search_page` for results of ``retriever.search(images)``."""
    items, _ = expand_images(images)
    subtitle = (f"checkpoint {retriever.trained.checkpoint} · index of {len(retriever.index)} items "
                f"({retriever.index.kind}) · generated {time.strftime('%Y-%m-%d %H:%M:%S')}")
    return search_page(results, lambda q: to_rgb(items[q]), retriever.gallery_image, out, subtitle=subtitle)
