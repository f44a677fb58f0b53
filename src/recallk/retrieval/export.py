"""Export the embedding model for serving without recallk: ONNX or TorchScript, plus a preprocessing sidecar.

The exported graph maps ``images`` (B, 3, H, W) float32, B free (dynamic batch), already preprocessed, to
``embeddings`` (B, d) float32 with unit L2 norm. ``<out>.json`` states the preprocessing in full
(:func:`export_preprocessing`: how a decoded image becomes 8-bit RGB, then resize, crop and where, scale, mean,
std), the input and output, and the model identity.

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

from recallk.data.datasets.base import (
    ALPHA_MODES,
    PLAIN_MODES,
    SIXTEEN_BIT_MODES,
    TRANSPARENCY_BACKGROUND,
)
from recallk.retrieval.checkpoint import TrainedModel
from recallk.run_folder import atomic_path, write_atomic

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17


def decoding_rules() -> dict[str, Any]:
    """How recallk turns a decoded Pillow image into the 8-bit RGB picture its transform resizes (the transform's
    first step, ``ToRGB8`` = :func:`recallk.data.datasets.base.to_rgb8`), as data for users of exported models.

    Returns a JSON-ready dict: ``exif_transpose`` (True: apply the EXIF Orientation tag first, as
    ``PIL.ImageOps.exif_transpose``), then by Pillow mode ``alpha`` (background, rule), ``16-bit``, ``float``,
    ``other``; ``reference`` names the function.
    """
    background = list(TRANSPARENCY_BACKGROUND)
    return {
        "order": "apply exif_transpose, then the rule of the image's Pillow mode, giving 8-bit RGB (uint8 c)",
        "exif_transpose": True,
        "exif_transpose_note": "rotate/flip by the EXIF Orientation tag (PIL.ImageOps.exif_transpose) first",
        "alpha": {
            "modes": sorted(ALPHA_MODES),
            "also": "P, L and RGB images with a 'transparency' entry in Image.info",
            "background": background,
            "rule": "convert('RGBA'), composite on an opaque background of this colour (Image.alpha_composite), "
                    "drop alpha: c_out = round((c * a + bg * (255 - a)) / 255), c, a, bg in 0..255",
        },
        "16-bit": {
            "modes": sorted(SIXTEEN_BIT_MODES),
            "rule": "greyscale v in 0..65535 -> round(v / 257) as 8-bit grey (values outside 0..65535 are refused), "
                    "then R = G = B = that grey",
        },
        "float": {
            "modes": ["F"],
            "rule": "greyscale v in [0, 1] -> round(255 * v) as 8-bit grey (other values are refused), then "
                    "R = G = B = that grey",
        },
        "other": {"modes": sorted(PLAIN_MODES), "rule": "Pillow's image.convert('RGB')"},
        "rounding": "round half to even (numpy.rint); halves do not occur in the 16-bit and alpha rules",
        "reference": "recallk.data.datasets.base.to_rgb8",
    }


def export_preprocessing(spec: dict[str, Any]) -> dict[str, Any]:
    """The export sidecar's ``preprocessing``: ``spec`` (:func:`recallk.retrieval.checkpoint.preprocessing_spec`,
    the part hashed into ``model_id``, unchanged) plus what a deployer needs to reproduce it exactly without
    recallk: ``decode`` (:func:`decoding_rules`), ``resize_rule``, ``crop_position`` and ``crop_offsets``,
    and ``steps`` (the order). Returns a new dict; ``spec`` is not changed."""
    out = dict(spec)
    if spec.get("resize_mode") == "shorter_side":
        resize_rule = ("the shorter side becomes 'resize' pixels, the longer side int(resize * longer / shorter) "
                       "(truncated), with 'interpolation' by Pillow's Image.resize")
    elif spec.get("resize_mode") == "exact":
        resize_rule = "Image.resize((width, height)) with [height, width] = 'resize', by 'interpolation'"
    else:
        resize_rule = None
    out.update({
        "decode": decoding_rules(),
        "resize_rule": resize_rule,
        "crop_position": "center" if spec.get("crop") else None,
        "crop_offsets": ("top = round((H - crop_h) / 2), left = round((W - crop_w) / 2) with Python's round (halves "
                         "to even), H, W: the size after the resize; the crop is rows top..top+crop_h, columns "
                         "left..left+crop_w" if spec.get("crop") else None),
        "steps": ["decode to 8-bit RGB ('decode')", "resize ('resize', 'resize_mode', 'resize_rule')",
                  "crop ('crop', 'crop_position', 'crop_offsets')", "to float32, times 'scale' (1/255)",
                  "(x - mean) / std per channel", "HWC -> CHW ('layout'), stack into a batch"],
    })
    return out


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
                  "note": "preprocessed as 'preprocessing' says: decode to 8-bit RGB ('decode': EXIF orientation, "
                          "alpha on white, 16-bit / 257), resize, centre crop, pixels / 255, (x - mean) / std"},
        "output": {"name": "embeddings", "shape": ["batch", trained.embed_dim], "dtype": "float32",
                   "l2_normalized": True, "similarity": "inner product (cosine)"},
        "preprocessing": export_preprocessing(spec),
        **{k: v for k, v in trained.identity().items() if k != "preprocessing"},
    }
    if fmt == "onnx":
        sidecar["onnx_opset"] = ONNX_OPSET
    write_atomic(out.with_name(out.name + ".json"), json.dumps(sidecar, indent=2))
    return out
