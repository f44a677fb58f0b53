"""Deprecated alias of :mod:`recallk.testing.retrieval` (the slow float64 retrieval metrics), kept for one release."""

import warnings

from recallk.testing.retrieval import reference_knn, reference_ranking, reference_retrieval_metrics

__all__ = ["reference_knn", "reference_ranking", "reference_retrieval_metrics"]

warnings.warn("recallk.evaluation.reference moved to recallk.testing.retrieval", DeprecationWarning, stacklevel=2)
