"""Using a trained model: embed images and collections, index a gallery with faiss, search it, export the model.

- :func:`load_trained_model`: checkpoint (it carries its config) -> :class:`TrainedModel` (network, test transform,
  identity); :func:`load_model`: the short form, ``(model, transform)``
- :func:`embed_images`, :func:`write_embeddings`, :func:`read_embeddings`: embeddings and the ``.npz`` file
- :class:`GalleryIndex`: faiss index (flat / ivf / hnsw) with a JSON sidecar
- :class:`Retriever`: ``Retriever.from_checkpoint(ckpt, index=path).search(images, k=10)``
- :func:`export_model`: ONNX / TorchScript with a preprocessing sidecar
- :func:`evaluate_embedding_files`: query file against gallery file, the evaluation's metrics
"""

from recallk.retrieval.checkpoint import (
    CheckpointError,
    TrainedModel,
    load_model,
    load_trained_model,
    preprocessing_spec,
)
from recallk.retrieval.embed import EmbeddingFile, embed_images, image_files, read_embeddings, write_embeddings
from recallk.retrieval.evaluate import evaluate_embedding_files
from recallk.retrieval.export import export_model
from recallk.retrieval.index import GalleryIndex, IndexMismatchError
from recallk.retrieval.search import Retriever, SearchResults, search_page, write_search_page

__all__ = [
    "CheckpointError",
    "EmbeddingFile",
    "GalleryIndex",
    "IndexMismatchError",
    "Retriever",
    "SearchResults",
    "TrainedModel",
    "embed_images",
    "evaluate_embedding_files",
    "export_model",
    "image_files",
    "load_model",
    "load_trained_model",
    "preprocessing_spec",
    "read_embeddings",
    "search_page",
    "write_embeddings",
    "write_search_page",
]
