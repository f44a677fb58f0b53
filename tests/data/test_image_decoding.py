"""Every Pillow mode a file can decode to comes out as the right 8-bit RGB picture (or a clear error naming the
file and the mode); EXIF orientation; symbolic links in the folder dataset (issue 13, section 1).

Expected pixels come from hand-made numpy arrays, never from the loader itself."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from recallk.data import build_dataset
from recallk.data.datasets.base import (
    TRANSPARENCY_BACKGROUND,
    BadImageError,
    ImageListDataset,
    UnsupportedImageModeError,
    load_rgb,
)
from recallk.data.datasets.folder import SymlinkLoopError

# A horizontal ramp 10..245 (8-bit), 8 rows x 48 columns.
RAMP8 = np.tile(np.linspace(10, 245, 48).round().astype(np.uint8), (8, 1))


def _rgb(path) -> np.ndarray:
    img = load_rgb(path)
    assert img.mode == "RGB"
    return np.asarray(img).astype(np.int64)


def _grey(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None].astype(np.int64), 3, axis=2)


def test_16bit_greyscale_png_keeps_its_pixels(tmp_path):
    """The issue's example: a ramp stored as uint16 x 257 loads like the 8-bit file of the same ramp."""
    Image.fromarray(RAMP8).save(tmp_path / "r8.png")
    Image.fromarray(RAMP8.astype(np.uint16) * 257).save(tmp_path / "r16.png")
    assert Image.open(tmp_path / "r16.png").mode == "I;16"
    r8, r16 = _rgb(tmp_path / "r8.png"), _rgb(tmp_path / "r16.png")
    assert abs(r16.mean() - 127.5) < 1.0
    np.testing.assert_array_equal(r16, r8)


@pytest.mark.parametrize("dtype", ["<u2", ">u2"])
def test_16bit_tiff_both_byte_orders(tmp_path, dtype):
    path = tmp_path / "r16.tif"
    Image.fromarray((RAMP8.astype(np.uint16) * 257).astype(dtype)).save(path)
    assert Image.open(path).mode in ("I;16", "I;16B", "I;16L")
    np.testing.assert_array_equal(_rgb(path), _grey(RAMP8))


def test_mode_I_is_read_as_16_bit_and_out_of_range_is_refused(tmp_path):
    path = tmp_path / "i32.tif"
    Image.fromarray(RAMP8.astype(np.int32) * 257).save(path)
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(_rgb(path), _grey(RAMP8))
    bad = tmp_path / "i32_big.tif"
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(bad)
    with pytest.raises(UnsupportedImageModeError, match=r"i32_big\.tif.*'I'"):
        load_rgb(bad)


def test_mode_F_in_0_1_scales_and_other_ranges_are_refused(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(RAMP8.astype(np.float32) / 255.0).save(path)
    assert Image.open(path).mode == "F"
    np.testing.assert_array_equal(_rgb(path), _grey(RAMP8))
    bad = tmp_path / "f_big.tif"
    Image.fromarray(RAMP8.astype(np.float32)).save(bad)
    with pytest.raises(UnsupportedImageModeError, match=r"f_big\.tif.*'F'") as err:
        load_rgb(bad)
    assert isinstance(err.value, BadImageError) and err.value.mode == "F"


def _png16_rgb(path, rgb16: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))  # fmt: skip


def test_16bit_rgb_png(tmp_path):
    rgb8 = np.stack([RAMP8, RAMP8[:, ::-1], np.full_like(RAMP8, 77)], axis=2)
    _png16_rgb(tmp_path / "rgb16.png", rgb8.astype(np.uint16) * 257)
    np.testing.assert_array_equal(_rgb(tmp_path / "rgb16.png"), rgb8.astype(np.int64))


def test_plain_modes(tmp_path):
    rgb = np.stack([RAMP8, RAMP8[:, ::-1], np.full_like(RAMP8, 200)], axis=2)
    Image.fromarray(RAMP8).save(tmp_path / "l.png")
    np.testing.assert_array_equal(_rgb(tmp_path / "l.png"), _grey(RAMP8))
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(_rgb(tmp_path / "rgb.png"), rgb)
    Image.fromarray(RAMP8 > 128).save(tmp_path / "one.png")
    assert Image.open(tmp_path / "one.png").mode == "1"
    np.testing.assert_array_equal(_rgb(tmp_path / "one.png"), _grey(np.where(RAMP8 > 128, 255, 0)))
    # "P" without transparency: a palette of 4 colours.
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [10, 20, 30]], np.uint8)
    idx = (np.arange(48)[None, :] % 4).repeat(8, 0).astype(np.uint8)
    p = Image.fromarray(idx, mode="P")
    p.putpalette(palette.reshape(-1).tolist())
    p.save(tmp_path / "p.png")
    np.testing.assert_array_equal(_rgb(tmp_path / "p.png"), palette[idx].astype(np.int64))
    # CMYK with K = 0: R = 255 - C (Pillow's conversion); stored as TIFF (JPEG would be lossy).
    cmyk = np.stack([255 - rgb[..., 0], 255 - rgb[..., 1], 255 - rgb[..., 2], np.zeros_like(RAMP8)], 2)
    Image.fromarray(cmyk.astype(np.uint8), mode="CMYK").save(tmp_path / "cmyk.tif")
    np.testing.assert_array_equal(_rgb(tmp_path / "cmyk.tif"), rgb)
    # YCbCr: grey (Cb = Cr = 128) gives R = G = B = Y.
    ycc = np.stack([RAMP8, np.full_like(RAMP8, 128), np.full_like(RAMP8, 128)], 2)
    Image.fromarray(ycc, mode="YCbCr").save(tmp_path / "ycc.tif")
    assert Image.open(tmp_path / "ycc.tif").mode == "YCbCr"
    assert np.abs(_rgb(tmp_path / "ycc.tif") - _grey(RAMP8)).max() <= 1


def _over_background(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha compositing onto the documented background, computed in float."""
    a = alpha[..., None] / 255.0
    return np.rint(colour * a + np.array(TRANSPARENCY_BACKGROUND) * (1 - a)).astype(np.int64)


def test_transparency_goes_onto_white(tmp_path):
    assert TRANSPARENCY_BACKGROUND == (255, 255, 255)
    colour = np.stack([RAMP8, np.zeros_like(RAMP8), np.full_like(RAMP8, 60)], 2).astype(np.float64)
    alpha = np.tile(np.linspace(0, 255, 8).round()[:, None], (1, 48)).astype(np.uint8)
    Image.fromarray(np.dstack([colour.astype(np.uint8), alpha]), mode="RGBA").save(tmp_path / "rgba.png")
    got = _rgb(tmp_path / "rgba.png")
    assert np.abs(got - _over_background(colour, alpha)).max() <= 1
    assert (got[0] == 255).all()  # the fully transparent row is the background, not the hidden colour
    Image.fromarray(np.dstack([RAMP8, alpha]), mode="LA").save(tmp_path / "la.png")
    got = _rgb(tmp_path / "la.png")
    assert np.abs(got - _over_background(_grey(RAMP8).astype(np.float64), alpha)).max() <= 1
    # "P" with one transparent palette entry.
    idx = (np.arange(48)[None, :] % 2).repeat(8, 0).astype(np.uint8)
    p = Image.fromarray(idx, mode="P")
    p.putpalette([0, 0, 0, 200, 10, 10])
    p.save(tmp_path / "pt.png", transparency=0)
    want = np.where(idx[..., None] == 0, 255, np.array([200, 10, 10]))
    np.testing.assert_array_equal(_rgb(tmp_path / "pt.png"), want)


def test_exif_orientation_6_comes_out_upright(tmp_path):
    """A phone photo stored sideways with orientation 6 (rotate 90 degrees clockwise to view)."""
    upright = np.zeros((20, 40, 3), np.uint8)
    upright[:, :20] = (255, 0, 0)  # left half red
    upright[:, 20:] = (0, 0, 255)  # right half blue
    stored = np.rot90(upright, k=1)  # stored rotated 90 degrees anticlockwise: 40 x 20
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(stored)).save(tmp_path / "phone.png", exif=exif)
    got = _rgb(tmp_path / "phone.png")
    assert got.shape == (20, 40, 3)
    np.testing.assert_array_equal(got, upright.astype(np.int64))


def test_unreadable_mode_is_skipped_by_skip_bad_images(tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "bad.tif"
    Image.fromarray(RAMP8).save(good)
    Image.fromarray(RAMP8.astype(np.float32)).save(bad)
    with pytest.warns(UserWarning, match="skipped 1"):
        ds = ImageListDataset([good, bad], [0, 0], skip_bad_images=True)
    assert ds.skipped == [str(bad)]


def _image(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RAMP8).save(path)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_folder_follows_every_kind_of_link(tmp_path):
    outside = tmp_path / "outside"
    _image(outside / "sub" / "x.png")
    _image(outside / "classC" / "c.png")
    _image(outside / "file.png")
    root = tmp_path / "root"
    _image(root / "a" / "real.png")
    os.symlink(outside / "sub", root / "a" / "linked_sub")  # a linked sub-folder of a class folder
    os.symlink(outside / "file.png", root / "a" / "linked.png")  # a linked file
    (root / "b" / "deeper").mkdir(parents=True)
    _image(root / "b" / "b.png")
    os.symlink(outside / "sub", root / "b" / "deeper" / "link2")  # a link two levels down
    os.symlink(outside / "classC", root / "c")  # a linked class folder
    ds = build_dataset("folder", root, split=None)
    rel = sorted(os.path.relpath(p, root) for p in ds.paths)
    assert rel == sorted(["a/real.png", "a/linked_sub/x.png", "a/linked.png", "b/b.png", "b/deeper/link2/x.png",
                          "c/c.png"])  # fmt: skip
    assert ds.classes == ["a", "b", "c"]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_folder_link_loop_and_dangling_link_are_refused(tmp_path):
    root = tmp_path / "root"
    _image(root / "a" / "x.png")
    os.symlink(root / "a", root / "a" / "loop")
    with pytest.raises(SymlinkLoopError, match="loop"):
        build_dataset("folder", root, split=None)
    os.remove(root / "a" / "loop")
    os.symlink(root / "missing", root / "a" / "gone")
    with pytest.raises(ValueError, match="dangling"):
        build_dataset("folder", root, split=None)
