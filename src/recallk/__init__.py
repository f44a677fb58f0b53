"""recallk: the Recall@k surrogate loss (RS@k), similarity mixup (SiMix) and batches larger than memory.

The public API is re-exported lazily so that ``import recallk`` stays cheap and the layers load only when used.
``recallk.load_model(path, device="cpu") -> (model, transform)`` gives a trained model and its test transform from
a checkpoint file alone (:func:`recallk.retrieval.load_model`).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "RecallAtKSurrogate": "recallk.losses",
    "simix": "recallk.losses",
    "simix_embeddings": "recallk.losses",
    "build_loss": "recallk.losses",
    "build_model": "recallk.models",
    "build_dataset": "recallk.data",
    "ClassBalancedBatchSampler": "recallk.data",
    "cached_backward": "recallk.engine",
    "Trainer": "recallk.engine",
    "retrieval_metrics": "recallk.evaluation",
    "embed_dataset": "recallk.evaluation",
    "write_report": "recallk.report",
    "Retriever": "recallk.retrieval",
    "GalleryIndex": "recallk.retrieval",
    "load_trained_model": "recallk.retrieval",
    "load_model": "recallk.retrieval",  # (model, test transform) from a checkpoint file alone
    "embed_images": "recallk.retrieval",
    "export_model": "recallk.retrieval",
    "load_config": "recallk.config",
}

__all__ = [*_EXPORTS, "__version__"]

# The sub-packages, reachable as attributes after ``import recallk`` alone (``recallk.models.freeze_batchnorm``,
# as the messages advise), imported on first use like the names above.
_SUBMODULES = ("checks", "config", "data", "engine", "evaluation", "kernels", "losses", "models", "provenance",
               "report", "retrieval", "run_folder", "testing", "utils")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"recallk.{name}")
    raise AttributeError(f"module 'recallk' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API and the sub-packages (for completion), besides the module's own names."""
    return sorted({*globals(), *__all__, *_SUBMODULES})
