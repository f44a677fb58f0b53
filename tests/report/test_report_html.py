"""write_report: a self-contained page holding the config, the metrics and correctly framed examples."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from recallk.report import write_report
from recallk.report.examples import HIT_RGB, MISS_RGB, QUERY_RGB
from tests.helpers.report_runs import metrics_lines


class Page(HTMLParser):
    """Collects every URL-carrying attribute, the tags used, and the thumbnails of each example row."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []
        self.tags: set[str] = set()
        self.rows: list[dict] = []
        self._figure: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        for name in ("src", "href", "srcset", "data", "action", "poster"):
            if name in attrs:
                self.urls.append((tag, name, attrs[name]))
        if tag == "div" and "data-query" in attrs:
            self.rows.append({"query": int(attrs["data-query"]), "thumbs": []})
        if tag == "figure":
            self._figure = attrs.get("class", "")
        if tag == "img" and self._figure is not None:
            self.rows[-1]["thumbs"].append((self._figure.split()[1], attrs["alt"], attrs["src"]))

    def handle_endtag(self, tag):
        if tag == "figure":
            self._figure = None


def decode_png(uri: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(uri[len(prefix) :], validate=True)))
    assert image.format == "PNG"
    return image.convert("RGB")


def brute_neighbours(emb, q, k):
    x = emb.astype(np.float64)
    return sorted((j for j in range(len(x)) if j != q), key=lambda j: (-(x[q] @ x[j]), j))[:k]


def test_report_is_self_contained(make_run):
    run, dataset, _, _ = make_run()
    path = write_report(run, dataset=dataset)
    assert path == run / "report.html"
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    assert page.urls, "the page must hold images"
    for tag, name, value in page.urls:
        assert tag == "img" and name == "src" and value.startswith("data:image/png;base64,"), (tag, name)
        decode_png(value)
    assert not re.search(r"https?://", text)
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}
    assert "@import" not in text and "url(" not in text


def test_report_holds_config_and_metrics(make_run):
    run, dataset, _, _ = make_run()
    text = write_report(run, dataset=dataset).read_text(encoding="utf-8")
    assert "recallk run: tiny-run" in text
    assert re.search(r"<details>\s*<summary>[^<]*config\.yaml</summary>\s*<pre>", text)
    assert "no-such-dataset" in text and "ks:" in text  # config body, as YAML
    evals = [r for r in metrics_lines() if r["kind"] == "eval"]
    before, after = evals[0], evals[-1]
    assert "before (epoch 0)" in text and "last epoch (3)" in text
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "positive_recall@1", "map@r", "r_precision"):
        row = re.search(rf"<tr><td>{re.escape(key)}</td>(.*?)</tr>", text)
        assert row, key
        cells = re.findall(r"<td[^>]*>([^<]*)</td>", row.group(1))  # percent, as the CLI prints them
        assert cells == [f"{100 * before[key]:.2f}", f"{100 * after[key]:.2f}",
                         f"{100 * (after[key] - before[key]):+.2f}"]
    assert re.search(r"<tr><td>num_queries</td><td>30</td><td>30</td>", text)


def test_examples_are_framed_by_correctness(make_run):
    run, dataset, emb, labels = make_run()
    page = Page(write_report(run, dataset=dataset, num_queries=6, top=5).read_text(encoding="utf-8"))
    assert len(page.rows) == 6
    for row in page.rows:
        q = row["query"]
        kinds = [k for k, _, _ in row["thumbs"]]
        expected = brute_neighbours(emb, q, 5)
        assert kinds == ["query"] + ["hit" if labels[j] == labels[q] else "miss" for j in expected]
        ranks = [int(re.search(r"#(\d+)", alt).group(1)) for _, alt, _ in row["thumbs"]]
        assert ranks == [q, *expected]
        for kind, _, uri in row["thumbs"]:
            image = decode_png(uri)
            assert image.size == (106, 106)
            assert image.getpixel((0, 0)) == {"query": QUERY_RGB, "hit": HIT_RGB, "miss": MISS_RGB}[kind]
        # the query thumbnail shows the dataset's image of that item (its class colour at the centre)
        query_image = decode_png(row["thumbs"][0][2])
        source = dataset[q][0].convert("RGB").resize((96, 96))
        assert np.abs(np.subtract(query_image.getpixel((53, 53)), source.getpixel((48, 48)))).max() < 30


def test_missing_embeddings_is_a_visible_note(make_run):
    run, dataset, _, _ = make_run(embeddings=False)
    text = write_report(run, dataset=dataset).read_text(encoding="utf-8")
    assert re.search(r'<p class="note">Retrieval examples omitted: embeddings/test\.npz does not exist', text)
    assert "data-query" not in text


def test_unbuildable_dataset_is_a_visible_note(make_run):
    run, _, _, _ = make_run()  # the config names a dataset that does not exist
    text = write_report(run).read_text(encoding="utf-8")
    assert re.search(r'<p class="note">Retrieval examples omitted: could not build the .*test.* dataset', text)
    assert "data-query" not in text
    assert "<tr><td>map@r</td>" in text  # the rest of the report is still there


def test_missing_run_dir_or_metrics_raise(make_run, tmp_path):
    with pytest.raises(ValueError, match="run folder not found"):
        write_report(tmp_path / "nope")
    run, _, _, _ = make_run(metrics=False)
    with pytest.raises(ValueError, match=r"metrics\.jsonl"):
        write_report(run)


def test_mismatched_dataset_raises(make_run):
    run, dataset, _, labels = make_run()
    dataset.labels = dataset.labels[:-1]
    with pytest.raises(ValueError, match="items but"):
        write_report(run, dataset=dataset)
    dataset.labels = np.roll(labels, 1)
    with pytest.raises(ValueError, match="labels differ"):
        write_report(run, dataset=dataset)


def test_out_path_and_no_config(make_run, tmp_path):
    run, dataset, _, _ = make_run(config=False)
    out = write_report(run, dataset=dataset, out_path=tmp_path / "elsewhere" / "r.html")
    text = out.read_text(encoding="utf-8")
    assert out.is_file() and not (run / "report.html").exists()
    assert "config.yaml not found" in text and "recallk run: tiny-run" in text
    assert "data-query" in text  # split defaults to "test" without a config


def test_sampled_hard_failures_are_announced(make_run, monkeypatch):
    from recallk.report import examples

    run, dataset, _, _ = make_run()
    assert "random sample" not in write_report(run, dataset=dataset).read_text(encoding="utf-8")
    monkeypatch.setattr(examples, "MAX_CANDIDATE_QUERIES", 10)
    text = write_report(run, dataset=dataset).read_text(encoding="utf-8")
    assert "random sample (seed 0) of 10 of the 30 answerable queries" in text
