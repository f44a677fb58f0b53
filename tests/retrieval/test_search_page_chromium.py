"""The search page renders in headless Chromium (as the report is tested): not blank, frames visible."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from recallk.report.examples import QUERY_RGB
from recallk.retrieval import GalleryIndex, Retriever, load_trained_model, write_embeddings, write_search_page
from recallk.retrieval.embed import ImageItems
from recallk.retrieval.search import NEIGHBOUR_RGB
from tests.helpers.chromium import CHROMIUM, colour_pixels, screenshot
from tests.helpers.retrieval import write_pngs


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_search_page_renders_in_headless_chromium(untrained_run, tmp_path):
    trained = load_trained_model(untrained_run)
    gallery = write_pngs(tmp_path / "gallery", 12)
    emb = write_embeddings(trained, ImageItems(gallery, trained.transform), tmp_path / "g.npz", {}, progress=False)
    GalleryIndex.build(emb).save(tmp_path / "g.faiss")
    retriever = Retriever.from_checkpoint(untrained_run, index=tmp_path / "g.faiss")
    queries = gallery[:3]
    results = retriever.search(queries, k=4)
    html = write_search_page(retriever, queries, results, tmp_path / "search.html")
    text = html.read_text()
    assert text.count('class="row"') == 3 and text.count('figure class="thumb neighbour"') == 12
    assert "img_000.png" in text and "<script" not in text
    png = tmp_path / "shot.png"
    result = screenshot(html, png, tmp_path / "profile", size="1280,900")
    assert result.returncode == 0 and png.is_file(), result.stderr[-2000:]
    image = np.asarray(Image.open(png).convert("RGB"))
    assert (image.min(axis=2) < 200).mean() > 0.02, "the page rendered (almost) blank"
    assert colour_pixels(image, QUERY_RGB) > 3 * 1500, "query frames not visible"
    assert colour_pixels(image, NEIGHBOUR_RGB) > 12 * 1500, "neighbour frames not visible"
