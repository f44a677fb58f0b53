"""GalleryIndex.search tells a query array of the wrong rank (a plain ValueError: pass (Q, d)) apart from one of
the wrong width (IndexMismatchError: embeddings of another model)."""

from __future__ import annotations

import numpy as np
import pytest

from recallk.retrieval import GalleryIndex, IndexMismatchError
from recallk.retrieval.embed import EmbeddingFile


def gallery(n: int = 40, d: int = 32) -> tuple[np.ndarray, EmbeddingFile]:
    rng = np.random.default_rng(0)
    e = rng.standard_normal((n, d)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    labels = np.arange(n, dtype=np.int64) % 4
    return e, EmbeddingFile(e, labels, np.array([f"x{i}.png" for i in range(n)]), ["a", "b", "c", "d"], {})


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_single_query_vector_is_a_shape_error_not_a_model_mismatch(kind):
    e, emb = gallery()
    index = GalleryIndex.build(emb, kind)
    for bad in (e[0], e[None]):  # (d,) and (1, 1, d)
        with pytest.raises(ValueError, match=r"2-D \(Q, d\).*e\[None\]") as err:
            index.search(bad, k=2)
        assert not isinstance(err.value, IndexMismatchError) and "another model" not in str(err.value)
    scores, indices = index.search(e[0][None], k=2)  # the fix the message gives works
    assert indices.shape == (1, 2) and indices[0, 0] == 0 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_a_query_of_another_width_is_still_a_model_mismatch():
    e, emb = gallery()
    index = GalleryIndex.build(emb)
    with pytest.raises(IndexMismatchError, match="another model"):
        index.search(e[:3, :16], k=2)
