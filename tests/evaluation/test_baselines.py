import numpy as np
import pytest
from PIL import Image

from recallk.evaluation import pixel_embeddings


class _Images:
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def test_pixel_embeddings_are_normalised_grey_pixels():
    flat = Image.new("RGB", (10, 10), (40, 40, 40))
    half = Image.new("L", (4, 4), 0)  # already at the target size: no resampling
    half.paste(255, (0, 0, 4, 2))  # top half white
    emb, labels = pixel_embeddings(_Images([flat, half.convert("RGB")], [3, 5]), size=4)
    assert emb.shape == (2, 16) and emb.dtype == np.float32 and labels.tolist() == [3, 5]
    assert emb[0] == pytest.approx(np.full(16, 1 / 4))  # 16 equal entries of unit norm
    assert emb[1] == pytest.approx(np.r_[np.full(8, 1 / np.sqrt(8)), np.zeros(8)], abs=1e-6)
