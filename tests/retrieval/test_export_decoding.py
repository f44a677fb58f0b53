"""The export sidecar states the whole preprocessing: a deployer who follows only its keys (decode rules, resize,
centre crop and its offsets, scale, normalisation) with Pillow and numpy gets, through ONNX Runtime, the torch
model's embeddings of ``load_model``'s transform, for an RGBA image with alpha 128, a 16-bit greyscale image and a
JPEG with EXIF Orientation 6. The sidecar's additions do not change ``model_id``."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from PIL import Image, ImageOps

import recallk
from recallk.retrieval import export_model, load_trained_model
from tests.helpers.retrieval import make_untrained_run

pytestmark = pytest.mark.usefixtures("one_thread")

_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def _decode(image: Image.Image, rules: dict) -> np.ndarray:
    """The sidecar's ``decode`` rules by hand: (H, W, 3) uint8."""
    if rules["exif_transpose"]:
        image = ImageOps.exif_transpose(image)
    if image.mode in rules["alpha"]["modes"] or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA")).astype(np.float64)
        a, bg = rgba[..., 3:], np.array(rules["alpha"]["background"], np.float64)
        return np.rint((rgba[..., :3] * a + bg * (255 - a)) / 255).astype(np.uint8)
    if image.mode in rules["16-bit"]["modes"]:
        grey = np.rint(np.asarray(image).astype(np.float64) / 257).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode in rules["float"]["modes"]:
        grey = np.rint(np.asarray(image).astype(np.float64) * 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    assert image.mode in rules["other"]["modes"]
    return np.asarray(image.convert("RGB"))


def _deployer_input(path, spec: dict) -> np.ndarray:
    """(3, H, W) float32 network input made from the sidecar's ``preprocessing`` alone (Pillow + numpy)."""
    with Image.open(path) as image:
        rgb = Image.fromarray(_decode(image, spec["decode"]))
    w, h = rgb.size
    if spec["resize_mode"] == "shorter_side":
        s = spec["resize"]
        size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)  # resize_rule: longer side truncated
    else:
        size = (spec["resize"][1], spec["resize"][0])
    if size != rgb.size:
        rgb = rgb.resize(size, _RESAMPLE[spec["interpolation"]])
    x = np.asarray(rgb)
    if spec["crop"]:
        assert spec["crop_position"] == "center"
        (ch, cw), (hh, ww) = spec["crop"], x.shape[:2]
        top, left = round((hh - ch) / 2), round((ww - cw) / 2)  # crop_offsets: Python's round
        x = x[top:top + ch, left:left + cw]
    x = x.astype(np.float32) * np.float32(spec["scale"])
    x = (x - np.array(spec["mean"], np.float32)) / np.array(spec["std"], np.float32)
    return x.transpose(2, 0, 1)


@pytest.fixture()
def photo_run(tmp_path):
    """An untrained run whose test transform is the photo one (shorter side to 37, centre crop 32)."""
    ckpt = make_untrained_run(tmp_path / "run")
    config_path = tmp_path / "run" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["data"]["dataset"] = "cub"
    config_path.write_text(yaml.safe_dump(config))
    return ckpt


def _images(folder) -> list:
    rng = np.random.default_rng(3)
    folder.mkdir()
    rgba = rng.integers(0, 256, (47, 60, 4), dtype=np.uint8)
    rgba[..., 3] = 128
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    grey16 = Image.fromarray(rng.integers(0, 65536, (53, 41), dtype=np.uint16))
    assert grey16.mode == "I;16"
    grey16.save(folder / "grey16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    photo = Image.fromarray(rng.integers(0, 256, (37, 50, 3), dtype=np.uint8))
    photo.save(folder / "rotated.jpg", exif=exif, quality=95)
    return [folder / "rgba.png", folder / "grey16.png", folder / "rotated.jpg"]


def test_sidecar_preprocessing_reproduces_the_model(photo_run, tmp_path):
    trained = load_trained_model(photo_run)
    out = export_model(trained, tmp_path / "m.onnx", "onnx")
    sidecar = json.loads((tmp_path / "m.onnx.json").read_text())
    spec = sidecar["preprocessing"]
    assert spec["crop"] == [32, 32] and spec["resize_mode"] == "shorter_side" and spec["crop_position"] == "center"
    # the hashed preprocessing is unchanged: the sidecar only adds keys, model_id stays that of the checkpoint
    assert {k: spec[k] for k in trained.preprocessing} == trained.preprocessing
    assert sidecar["model_id"] == trained.model_id

    paths = _images(tmp_path / "imgs")
    with Image.open(paths[1]) as im:
        assert im.mode == "I;16"
    batch = np.stack([_deployer_input(p, spec) for p in paths])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(["embeddings"], {"images": batch})[0]

    model, transform = recallk.load_model(photo_run)
    with torch.no_grad():
        inputs = []
        for p in paths:
            with Image.open(p) as image:
                inputs.append(transform(image))
        expected = model(torch.stack(inputs)).numpy()
    np.testing.assert_allclose(batch, torch.stack(inputs).numpy(), atol=1e-6)  # the same pixels, not just close
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_sidecar_of_an_exact_resize_has_no_crop_position(untrained_run, tmp_path):
    trained = load_trained_model(untrained_run)
    export_model(trained, tmp_path / "m.pt", "torchscript")
    spec = json.loads((tmp_path / "m.pt.json").read_text())["preprocessing"]
    assert spec["resize_mode"] == "exact" and spec["crop"] is None and spec["crop_position"] is None
    assert spec["decode"]["exif_transpose"] is True and spec["decode"]["alpha"]["background"] == [255, 255, 255]
