"""The report's lead section: trained vs raw pixels vs untrained, and the queries that changed."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import numpy as np
import pytest

from recallk.evaluation import retrieval_metrics
from recallk.report import write_report
from recallk.report.examples import changed_examples, compare_first_neighbours
from tests.helpers.report_runs import clustered_embeddings


def brute_first_hit(emb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """float64 leave-one-out nearest neighbour of every item: is it of the item's class?"""
    x = emb.astype(np.float64)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return labels[np.argmax(sim, axis=1)] == labels


def test_compare_first_neighbours_matches_brute_force_and_recall_at_1():
    model, labels = clustered_embeddings(seed=1, noise=0.6)
    base, _ = clustered_embeddings(seed=2, noise=1.5)
    comparison = compare_first_neighbours(model, base, labels)
    assert not comparison.sampled and np.array_equal(comparison.queries, np.arange(labels.size))
    model_hit, base_hit = brute_first_hit(model, labels), brute_first_hit(base, labels)
    assert np.array_equal(comparison.model_hit, model_hit)
    assert np.array_equal(comparison.baseline_hit, base_hit)
    assert np.array_equal(comparison.fixed, np.flatnonzero(model_hit & ~base_hit))
    assert np.array_equal(comparison.broken, np.flatnonzero(~model_hit & base_hit))
    counts = comparison.counts()
    assert counts["queries"] == labels.size == sum(v for k, v in counts.items() if k != "queries")
    assert counts["fixed"] > 0 and counts["broken"] > 0  # the fixture exercises both directions
    assert comparison.model_hit.mean() == pytest.approx(retrieval_metrics(model, labels, (1,))["recall@1"])


def test_compare_first_neighbours_samples_and_checks_shapes():
    model, labels = clustered_embeddings(seed=1)
    sampled = compare_first_neighbours(model, model, labels, seed=3, max_queries=7)
    assert sampled.sampled and sampled.queries.size == 7 and np.all(np.diff(sampled.queries) > 0)
    assert sampled.fixed.size == sampled.broken.size == 0  # same embeddings: nothing changes
    with pytest.raises(ValueError, match="same N"):
        compare_first_neighbours(model, model[:-1], labels)
    with pytest.raises(ValueError, match="max_queries"):
        compare_first_neighbours(model, model, labels, max_queries=0)


def test_changed_examples_show_both_neighbour_lists():
    model, labels = clustered_embeddings(seed=1, noise=0.6)
    base, _ = clustered_embeddings(seed=2, noise=1.5)
    comparison = compare_first_neighbours(model, base, labels)
    pairs = changed_examples(model, base, labels, comparison.fixed, num=3, top=4, seed=0)
    assert 0 < len(pairs) <= 3
    for m, b in pairs:
        assert m.query == b.query and m.query in set(comparison.fixed.tolist())
        assert m.hits[0] and not b.hits[0] and len(m.neighbours) == len(b.neighbours) == 4
        assert m.query not in m.neighbours and b.query not in b.neighbours
    assert changed_examples(model, base, labels, np.empty(0, dtype=np.int64), num=3, top=4) == []


class Rows(HTMLParser):
    """The example rows (data-query) in page order, each with its thumbnails' hit/miss classes."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.rows: list[tuple[int, list[str]]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and "data-query" in attrs:
            self.rows.append((int(attrs["data-query"]), []))
        if tag == "figure" and self.rows and attrs.get("class", "").split()[-1] in ("hit", "miss"):
            self.rows[-1][1].append(attrs["class"].split()[-1])


def test_report_leads_with_the_raw_pixel_comparison(make_run):
    run, dataset, emb, labels = make_run()
    pixels, _ = clustered_embeddings(seed=2, noise=1.5)
    (run / "embeddings" / "raw_pixels").mkdir()
    np.savez(run / "embeddings" / "raw_pixels" / "test.npz", embeddings=pixels, labels=labels)
    text = write_report(run, dataset=dataset, num_queries=8, top=4).read_text()

    lead = text.index("Trained model vs raw pixels vs untrained")
    assert lead < text.index("<h2>Configuration") < text.index("<h2>Retrieval examples")
    section = text[lead:text.index("<h2>Configuration")]
    pix = retrieval_metrics(pixels, labels, (1, 2, 4, 8))
    table = section[section.index("<table"):section.index("</table>")]
    heads = re.findall(r"<th>([^<]*)</th>", table)
    assert heads == ["metric (%)", "trained (epoch 3)", "raw pixels", "trained (epoch 3) − raw pixels (points)",
                     "untrained (epoch 0)"]
    trained_r1 = 0.1234 + 0.2 * 3  # report_runs.metrics_lines, last epoch
    assert f"<td>{100 * pix['map@r']:.2f}</td>" in table
    assert f"{100 * (trained_r1 - pix['recall@1']):+.2f}</td>" in table

    comparison = compare_first_neighbours(emb, pixels, labels)
    counts = comparison.counts()
    assert f"raw pixels wrong and the model right in {counts['fixed']}" in section
    assert f"model wrong in {counts['broken']}" in section
    rows = Rows(section).rows
    fixed_part = Rows(section[:section.index("Raw pixels right, the model wrong")]).rows
    assert len(fixed_part) == 2 * min(2, counts["fixed"]) and len(rows) > len(fixed_part)
    for i in range(0, len(rows), 2):  # each query twice: the model's row, then raw pixels'
        (q_model, model_marks), (q_pix, pix_marks) = rows[i], rows[i + 1]
        assert q_model == q_pix
        fixed = i < len(fixed_part)
        assert (model_marks[0], pix_marks[0]) == (("hit", "miss") if fixed else ("miss", "hit"))
        assert q_model in set((comparison.fixed if fixed else comparison.broken).tolist())


def test_report_without_raw_pixels_says_so(make_run):
    run, dataset, _, _ = make_run()
    text = write_report(run, dataset=dataset).read_text()
    section = text[text.index("Trained model vs raw pixels"):text.index("<h2>Configuration")]
    assert "No raw-pixel baseline" in section and "untrained (epoch 0)" in section
    assert not re.search(r"data-query", section)


def test_report_rejects_raw_pixels_of_other_items(make_run):
    run, dataset, emb, labels = make_run()
    (run / "embeddings" / "raw_pixels").mkdir()
    np.savez(run / "embeddings" / "raw_pixels" / "test.npz", embeddings=emb, labels=labels[::-1].copy())
    with pytest.raises(ValueError, match="does not match"):
        write_report(run, dataset=dataset)
