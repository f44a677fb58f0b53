"""Kanji across fonts: character set, class split, rendering geometry, bad-glyph guards and cache reuse.

Small temporary caches only (at most 20 characters x 3 fonts); the full render is measured in docs/datasets.md.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from recallk.data import KanjiFontsMissingError, build_dataset, kanji
from recallk.data.kanji import FontEntry, KanjiDataset, fonts, render

FONTS = ["ipag", "KouzanBrushFontSousyo", "DotGothic16-Regular"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kanji-cache")


@pytest.fixture(scope="module")
def small(cache):
    return build_dataset("kanji", cache, "train", max_classes=20, fonts=FONTS, progress=False)


def test_level1_kanji_is_the_jis_level1_block():
    chars = kanji.level1_kanji()
    # JIS X 0208 level 1: rows 16-47 x 94 cells; row 47 stops at cell 51 (腕), leaving 43 cells unassigned
    assert len(chars) == 32 * 94 - 43 == 2965
    assert chars[0] == "亜" and chars[-1] == "腕"
    assert len(set(chars)) == len(chars)
    assert all(0x4E00 <= ord(c) <= 0x9FFF for c in chars)
    assert [c.encode("euc_jp") for c in chars] == sorted(c.encode("euc_jp") for c in chars)


def test_split_is_disjoint_fixed_and_half_half():
    train, test = kanji.split_candidates("train"), kanji.split_candidates("test")
    assert len(train) == 1483 and len(test) == 1482
    assert not set(train) & set(test)
    assert set(train) | set(test) == set(kanji.level1_kanji())
    # fixed: membership follows the documented hash rule, not any RNG state
    import hashlib

    order = sorted(kanji.level1_kanji(), key=lambda c: hashlib.sha256(("recallk-kanji-split-0:" + c).encode()).digest())
    assert set(train) == set(order[:1483])
    with pytest.raises(ValueError, match="split"):
        kanji.split_candidates("val")


def test_small_dataset_layout(small):
    assert len(small.classes) == 20 and small.fonts == FONTS
    assert len(small) == 60
    assert small.labels.dtype == np.int64
    np.testing.assert_array_equal(small.labels, np.repeat(np.arange(20), 3))
    np.testing.assert_array_equal(small.font_ids, np.tile(np.arange(3), 20))
    train = kanji.split_candidates("train")
    assert small.classes == train[:20]  # none of the first 20 is dropped by these fonts
    image, label = small[7]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (64, 64)
    assert label == 2
    grey = np.asarray(image)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 0] == grey[..., 2]).all()


def test_glyphs_are_centred_and_scaled_to_the_margin(small):
    for i in range(len(small)):
        img = small.image_array(i)
        ink = np.argwhere(img < 128)
        assert len(ink) > 20, f"item {i} is (nearly) blank"
        (y0, x0), (y1, x1) = ink.min(0), ink.max(0)
        # the longer side of the ink box fills size - 2 * margin = 56 px (+-2 for antialiasing at 50 %)
        assert 53 <= max(y1 - y0, x1 - x0) + 1 <= 58
        assert abs((y0 + y1) / 2 - 31.5) <= 2 and abs((x0 + x1) / 2 - 31.5) <= 2
        assert (img[0, :] == 255).all() and (img[:, -1] == 255).all()  # white margin


def test_items_differ_across_fonts_and_characters(small):
    a = [small.image_array(i).astype(int) for i in range(6)]  # 2 characters x 3 fonts
    for i in range(6):
        for j in range(i + 1, 6):
            assert np.abs(a[i] - a[j]).mean() > 5


def test_cache_is_reused_without_rendering(cache, small, monkeypatch):
    manifests = sorted(cache.glob("*.json"))
    assert len(manifests) == 1 and small.cache_file == manifests[0]

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(kanji, "render_cache", fail)
    again = build_dataset("kanji", cache, "train", max_classes=20, fonts=FONTS, progress=False)
    np.testing.assert_array_equal(again.image_array(5), small.image_array(5))
    # a subset of the fonts and fewer classes is served by the same cache
    subset = build_dataset("kanji", cache, "train", max_classes=5, fonts=FONTS[1:], progress=False)
    assert subset.classes == small.classes[:5] and subset.fonts == FONTS[1:]
    np.testing.assert_array_equal(subset.image_array(1), small.image_array(2))
    assert sorted(cache.glob("*.json")) == manifests


def test_manifest_records_chars_fonts_version(small):
    m = json.loads(small.cache_file.read_text(encoding="utf-8"))
    assert m["version"] == kanji.RENDER_VERSION and m["fonts"] == FONTS
    assert set(small.classes) <= set(m["chars"])
    arr = np.load(small.cache_file.with_suffix(".npy"), mmap_mode="r")
    assert arr.dtype == np.uint8 and arr.shape == (len(m["chars"]), 3, 64, 64)


def test_missing_and_blank_glyphs_are_dropped(tmp_path):
    # DotGothic16 has no 牙 in its cmap; Oradano Mincho GSRR maps 穐 to an empty glyph
    table = {e.name: e for e in kanji.font_table()}
    _, _, bad = render._render_task((table["DotGothic16-Regular"].path, 0, ["牙", "亜"], 64))
    assert bad == [(0, "not in cmap")]
    _, images, bad = render._render_task((table["OradanoGSRR"].path, 0, ["穐", "亜"], 64))
    assert bad == [(0, "blank")] and (images[1] < 128).any()
    n = kanji.split_candidates("test").index("穐") + 1
    ds = KanjiDataset(tmp_path, "test", fonts=["OradanoGSRR"], max_classes=n, progress=False, num_workers=0)
    assert "穐" in ds.dropped and "穐" not in ds.classes


def test_tofu_is_detected_by_comparison_with_notdef():
    table = {e.name: e for e in kanji.font_table()}
    font, _, tofu = render._load_font(table["ipag"].path, 64)
    drawn = kanji.render_glyph(font, "\U0010fffc", 64)  # also unmapped: the same .notdef drawing
    assert tofu is not None and drawn is not None and np.array_equal(drawn, tofu)
    assert not np.array_equal(kanji.render_glyph(font, "亜", 64), tofu)


def test_missing_fonts_error_names_packages(tmp_path, monkeypatch):
    fake = [FontEntry("fonts-not-installed-here", str(tmp_path / "nope.ttf")), *kanji.font_table()[:1]]
    monkeypatch.setattr(fonts, "font_table", lambda: fake)  # where select_fonts looks it up
    with pytest.raises(KanjiFontsMissingError, match="fonts-not-installed-here") as err:
        KanjiDataset(tmp_path / "cache", "train", max_classes=2, progress=False)
    assert "apt-get install -y fonts-not-installed-here" in str(err.value) and "make setup" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_bad_options():
    with pytest.raises(ValueError, match="unknown kanji font"):
        kanji.select_fonts(["Comic Sans"])
    with pytest.raises(ValueError, match="max_classes"):
        KanjiDataset(split="train", max_classes=0)
    assert [e.name for e in kanji.select_fonts(["fonts-kouzan-mouhitsu"])] == [
        "kouzan-mouhitsu",
        "kouzan-mouhitsu-gyosho",
        "KouzanBrushFontSousyo",
    ]


def test_every_tsv_font_file_is_installed():
    kanji.check_fonts_installed(kanji.font_table())
    assert len(kanji.font_table()) == 26


def test_dataset_pickles_without_the_array(small):
    import pickle

    assert small.array.shape[1:] == (3, 64, 64)  # opens the memory map
    clone = pickle.loads(pickle.dumps(small))
    assert clone._array is None
    np.testing.assert_array_equal(clone.image_array(3), small.image_array(3))
