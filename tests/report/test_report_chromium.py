"""The report renders in a real browser: headless Chromium screenshot, not blank, frames visible."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from recallk.report import write_report
from recallk.report.examples import HIT_RGB, MISS_RGB, QUERY_RGB
from tests.helpers.chromium import CHROMIUM, colour_pixels, screenshot


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_report_renders_in_headless_chromium(make_run, tmp_path):
    run, dataset, _, _ = make_run()
    html = write_report(run, dataset=dataset)
    png = tmp_path / "shot.png"
    result = screenshot(html, png, tmp_path / "profile")
    assert result.returncode == 0 and png.is_file(), result.stderr[-2000:]
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape == (3000, 1280, 3)
    assert (image.min(axis=2) < 200).mean() > 0.02, "the page rendered (almost) blank"
    # a 106 px thumbnail's 5 px frame is about 2,000 pixels of its colour
    for name, rgb in (("query", QUERY_RGB), ("same-class", HIT_RGB), ("other-class", MISS_RGB)):
        assert colour_pixels(image, rgb) > 1500, f"no {name} frames visible in the screenshot"

    # control: the same checks reject a page without the examples
    (tmp_path / "empty.html").write_text("<!DOCTYPE html><html><body><p>nothing</p></body></html>")
    screenshot(tmp_path / "empty.html", tmp_path / "empty.png", tmp_path / "profile")
    empty = np.asarray(Image.open(tmp_path / "empty.png").convert("RGB"))
    assert (empty.min(axis=2) < 200).mean() < 0.02
    assert colour_pixels(empty, HIT_RGB) == colour_pixels(empty, MISS_RGB) == 0
