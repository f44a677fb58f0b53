"""Export the embedding model for serving without recallk: ONNX or TorchScript, plus a preprocessing sidecar.

The exported graph maps ``images`` (B, 3, H, W) float32, B free (dynamic batch), already preprocessed, to
``embeddings`` (B, d) float32 with unit L2 norm. ``<out>.json`` states the preprocessing (resize, crop,
interpolation, scale, mean, std: :func:`recallk.retrieval.checkpoint.preprocessing_spec`), the input and output,
and the model identity.

ONNX uses torch's TorchScript-based exporter (``torch.onnx.export(dynamo=False)``, opset 17), which needs only
the ``onnx`` package; TorchScript uses ``torch.jit.trace``. Both are deprecated in recent torch releases in
favour of ``torch.export``; their deprecation warnings are silenced here.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from recallk.retrieval.checkpoint import TrainedModel
from recallk.retrieval.files import atomic_path, atomic_write

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17


def export_model(trained: TrainedModel, out: str | os.PathLike, fmt: str = "onnx") -> Path:
    """Write ``out`` (the model) and ``out.json`` (preprocessing and identity), each atomically.

    Args:
        trained: the model to export (exported on the CPU in float32).
        out: the file to write (``.onnx`` or ``.pt`` by convention).
        fmt: ``"onnx"`` or ``"torchscript"``.

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: unknown format, or a transform without a fixed input size (no crop, no exact resize).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {FORMATS}")
    spec = trained.preprocessing
    if not spec.get("input_size"):
        raise ValueError("the model's test transform gives no fixed input size (no crop or exact resize): "
                         "cannot choose the example input of the export")
    model = copy.deepcopy(trained.model).to("cpu", torch.float32).eval()
    example = torch.zeros(2, *spec["input_size"])
    out = Path(out)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*(deprecated|legacy|will be removed).*")
        with atomic_path(out) as tmp:
            if fmt == "onnx":
                torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                                  input_names=["images"], output_names=["embeddings"],
                                  dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}})
            else:
                torch.jit.save(torch.jit.trace(model, example), str(tmp))
    sidecar: dict[str, Any] = {
        "format": fmt,
        "input": {"name": "images", "shape": ["batch", *spec["input_size"]], "dtype": "float32", "layout": "NCHW",
                  "note": "preprocessed as 'preprocessing' says: resize, crop, pixels / 255, (x - mean) / std"},
        "output": {"name": "embeddings", "shape": ["batch", trained.embed_dim], "dtype": "float32",
                   "l2_normalized": True, "similarity": "inner product (cosine)"},
        "preprocessing": spec,
        **{k: v for k, v in trained.identity().items() if k != "preprocessing"},
    }
    if fmt == "onnx":
        sidecar["onnx_opset"] = ONNX_OPSET
    atomic_write(out.with_name(out.name + ".json"), lambda f: f.write(json.dumps(sidecar, indent=2).encode()))
    return out
