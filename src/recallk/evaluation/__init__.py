"""Evaluation: exact kNN, retrieval metrics, embedding a dataset and the benchmarks' protocols."""

from recallk.evaluation.baselines import pixel_embeddings
from recallk.evaluation.embed import embed_dataset
from recallk.evaluation.knn import exact_knn
from recallk.evaluation.metrics import retrieval_metrics
from recallk.evaluation.pretrained import evaluate_pretrained, pretrained_embedding_model
from recallk.evaluation.protocols import evaluate_protocol, format_metrics_table, query_gallery_metrics
from recallk.evaluation.revisited import revisited_map, revisited_metrics

__all__ = [
    "embed_dataset",
    "evaluate_pretrained",
    "evaluate_protocol",
    "exact_knn",
    "format_metrics_table",
    "pixel_embeddings",
    "pretrained_embedding_model",
    "query_gallery_metrics",
    "retrieval_metrics",
    "revisited_map",
    "revisited_metrics",
]
