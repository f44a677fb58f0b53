"""The transforms of ``build_transforms`` / ``transforms_for_model`` take a PIL image of any mode as the dataset
loaders do: the result equals that of the image decoded by the loaders' path (``load_rgb``) first."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from recallk.data import build_transforms, transforms_for_model
from recallk.data.datasets.base import load_rgb
from recallk.data.transforms import ToRGB8
from recallk.models import build_model


def image_of_mode(mode: str) -> Image.Image:
    rng = np.random.default_rng(0)
    h, w = 41, 57
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))  # mode "I;16"
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L")
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), mode="RGBA")  # alpha varies
    if mode == "RGBA":
        return rgba
    if mode == "P":
        return rgba.convert("RGB").quantize(64)
    return rgba.convert("RGB").convert(mode)  # CMYK


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model("resnet18", embed_dim=16)


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P", "CMYK"])
def test_transforms_take_any_mode_as_the_loaders_do(mode, model, tmp_path):
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    image_of_mode(mode).save(path)
    with Image.open(path) as user_image:  # what a user hands over: the file as Pillow opens it
        user_image.load()
        assert user_image.mode == mode
        loader_image = load_rgb(path)  # what the dataset loaders hand the transform
        for transform in (transforms_for_model(model, "test"), build_transforms("test", image_size=32)):
            out = transform(user_image)
            assert out.shape[0] == 3 and out.dtype == torch.float32
            assert torch.equal(out, transform(loader_image))
        train = transforms_for_model(model, "train")
        torch.manual_seed(3)
        a = train(user_image)
        torch.manual_seed(3)
        assert torch.equal(a, train(loader_image))
        assert user_image.mode == mode  # the caller's image is not changed


def test_to_rgb8_returns_a_loader_image_as_is_and_converts_the_rest():
    rgb = Image.new("RGB", (5, 4), (10, 20, 30))
    assert ToRGB8()(rgb) is rgb  # the loaders' images: no copy per item
    keyed = Image.new("RGB", (5, 4), (10, 20, 30))
    keyed.info["transparency"] = (10, 20, 30)  # transparent colour key: composited on white
    assert np.asarray(ToRGB8()(keyed)).tolist() == np.full((4, 5, 3), 255).tolist()
    rotated = Image.new("RGB", (5, 4))
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate
    rotated.info["exif"] = exif.tobytes()
    assert ToRGB8()(rotated).size == (4, 5)
    tensor = torch.zeros(3, 2, 2)
    assert ToRGB8()(tensor) is tensor
