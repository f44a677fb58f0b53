"""Transforms: method.md section 4 for photos, the kanji variants, and normalisation from a model's config."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from recallk.data import IMAGENET_MEAN, IMAGENET_STD, build_dataset, build_transforms, transforms_for_model
from recallk.data.kanji import RandomStrokeWidth


def solid(size=(300, 200), colour=(200, 100, 50)) -> Image.Image:
    return Image.new("RGB", size, colour)


def expected_pixel(colour, mean, std) -> torch.Tensor:
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, mean, std)])


@pytest.mark.parametrize("kind", ["train", "test"])
def test_photo_transforms_shape_and_normalisation(kind):
    out = build_transforms(kind)(solid())
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    # a solid image stays solid under crops, flips and resizes: every pixel is the normalised colour
    want = expected_pixel((200, 100, 50), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(out[:, 100, 100], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.mean(dim=(1, 2)), want, atol=1e-4, rtol=0)


def test_test_transform_is_resize_then_centre_crop():
    # left half black, right half white, 512 x 256: Resize(256) keeps it (short side 256), CenterCrop(224)
    # takes columns 144..367, so the crop's columns 0..111 are black and 112..223 white
    img = Image.new("RGB", (512, 256), (0, 0, 0))
    img.paste((255, 255, 255), (256, 0, 512, 256))
    out = build_transforms("test", mean=(0, 0, 0), std=(1, 1, 1))(img)
    assert out.shape == (3, 224, 224)
    assert torch.all(out[:, :, :111] == 0) and torch.all(out[:, :, 113:] == 1)


def test_train_transform_is_random():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    t = build_transforms("train", image_size=32)
    torch.manual_seed(0)
    a, b = t(img), t(img)
    assert a.shape == (3, 32, 32) and not torch.equal(a, b)


def test_kanji_transforms(tmp_path):
    ds = build_dataset("kanji", tmp_path, "train", max_classes=2, fonts=["ipag"], progress=False)
    image, _ = ds[0]
    train, test = build_transforms("train", dataset="kanji"), build_transforms("test", dataset="kanji")
    x = test(image)
    assert x.shape == (3, 64, 64)
    pixels = torch.from_numpy(ds.image_array(0)).float() / 255
    torch.testing.assert_close(x[0], (pixels - IMAGENET_MEAN[0]) / IMAGENET_STD[0])
    torch.manual_seed(0)
    random.seed(0)
    y = [train(image) for _ in range(4)]
    assert all(t.shape == (3, 64, 64) for t in y)
    assert not torch.equal(y[0], y[1])
    # white fill: the corners stay background (normalised 1.0) in most augmented samples
    white = (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert sum(float(t[0, 0, 0]) > white - 0.1 for t in y) >= 3
    assert build_transforms("test", dataset="kanji", image_size=96)(image).shape == (3, 96, 96)


def test_random_stroke_width_dilates_or_erodes():
    img = Image.new("L", (20, 20), 255)
    img.paste(0, (8, 2, 11, 18))  # a 3-px dark vertical stroke
    thick, thin = img.filter(ImageFilter.MinFilter(3)), img.filter(ImageFilter.MaxFilter(3))
    assert (np.asarray(thick) == 0).sum() > (np.asarray(img) == 0).sum() > (np.asarray(thin) == 0).sum()
    t = RandomStrokeWidth(p=1.0)
    random.seed(1)
    outs = [np.asarray(t(img)) for _ in range(30)]
    kinds = {"thick" if np.array_equal(o, np.asarray(thick)) else "thin" for o in outs}
    assert all(np.array_equal(o, np.asarray(thick)) or np.array_equal(o, np.asarray(thin)) for o in outs)
    assert kinds == {"thick", "thin"}
    assert np.array_equal(np.asarray(RandomStrokeWidth(p=0.0)(img)), np.asarray(img))
    with pytest.raises(ValueError):
        RandomStrokeWidth(sizes=(2,))


def test_bad_kind():
    with pytest.raises(ValueError, match="kind"):
        build_transforms("val")


class _Configured(torch.nn.Module):
    """A model exposing a data config the way recallk models and timm models do."""

    def __init__(self, mean, std, size, fixed):
        super().__init__()
        self.data_config = {"input_size": (3, size, size), "mean": mean, "std": std, "interpolation": "bicubic"}
        self.fixed_input_size = fixed


def test_transforms_for_model_reads_mean_std_and_size():
    vit_like = _Configured((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 224, fixed=True)
    out = transforms_for_model(vit_like, "test")(solid())
    torch.testing.assert_close(out[:, 5, 5], expected_pixel((200, 100, 50), (0.5,) * 3, (0.5,) * 3))
    assert transforms_for_model(vit_like, "train", dataset="kanji")(solid()).shape == (3, 224, 224)
    cnn_like = _Configured(IMAGENET_MEAN, IMAGENET_STD, 224, fixed=False)
    assert transforms_for_model(cnn_like, "train", dataset="kanji")(solid()).shape == (3, 64, 64)
    override = transforms_for_model(vit_like, "test", mean=(0, 0, 0), std=(1, 1, 1), image_size=32)(solid())
    assert override.shape == (3, 32, 32)
    torch.testing.assert_close(override[:, 0, 0], torch.tensor([200 / 255, 100 / 255, 50 / 255]))


def test_transforms_for_a_plain_timm_model():
    import timm

    model = timm.create_model("vit_tiny_patch16_224.augreg_in21k", pretrained=False, num_classes=0)
    out = transforms_for_model(model, "test")(solid())
    assert out.shape == (3, 224, 224)
    torch.testing.assert_close(out[:, 0, 0], expected_pixel((200, 100, 50), (0.5,) * 3, (0.5,) * 3))
