"""Zero-shot evaluation: a pretrained network as it is (its own embedding, no head of ours, no training) on a
dataset's evaluation protocol. This is the floor every fine-tuned number is compared with (the "pretrained,
zero-shot" column of ``recallk train``'s table; ``recallk eval --model NAME``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from recallk.data.transforms import transforms_for_model
from recallk.evaluation.protocols import evaluate_protocol
from recallk.models import EmbeddingModel, build_model
from recallk.models.backbone import size_options

__all__ = ["evaluate_pretrained", "pretrained_embedding_model"]


def pretrained_embedding_model(
    name: str,
    pretrained: bool | str | os.PathLike = True,
    pooling: str | None = None,
    image_size: int | None = None,
    **model_options: Any,
) -> EmbeddingModel:
    """The pretrained network ``name`` with no head of ours: ``build_model(name, embed_dim=None, ...)``, whose
    output is the backbone's own embedding, L2-normalised, ``(N, C)`` float (C: the backbone's embedding size, as
    ``model.embed_dim`` says); in eval mode.

    Args:
        name: a timm model name, optionally with a weights tag (``"tf_efficientnet_lite0"``,
            ``"vit_base_patch14_dinov2.lvd142m"``).
        pretrained: True (timm's hub, or its local cache), a local weight file (timm, torchvision,
            efficientnet-pytorch, ... layouts: :func:`recallk.models.build_model`), or False (random weights: a
            floor below the floor, for tests).
        pooling: None for the embedding the network was trained to produce (the models layer's default for
            ``embed_dim=None``: its own head's pooling and projection), or ``"cls"``, ``"avg"``, ``"gem"``, ...
        image_size: the side in pixels of the images it will embed: a network that takes one input size only (a
            ViT's patch grid and position embeddings) is built for it (``img_size``, as ``recallk train`` does with
            ``data.image_size``: :func:`recallk.models.backbone.size_options`); CNNs take any size. None: the
            weights' size.
        model_options: other arguments of ``build_model`` (``in_chans``, timm's ``img_size``, ...).

    Raises:
        ValueError: an unknown model or pooling, a missing or mismatched weight file
            (:class:`recallk.models.WeightsError`), hub weights that cannot be fetched, or an image size the
            network cannot run at (:class:`recallk.models.SizeError`, one line).
    """
    model_options = {**size_options(name, image_size), **model_options}
    model = build_model(name, embed_dim=None, pretrained=pretrained, pooling=pooling, **model_options)
    return model.eval()


def evaluate_pretrained(
    model: str | EmbeddingModel,
    dataset: str,
    root: str | os.PathLike | None = None,
    *,
    pretrained: bool | str | os.PathLike = True,
    pooling: str | None = None,
    image_size: int | None = None,
    splits: Sequence[str] | None = None,
    ks: Sequence[int] | None = None,
    dataset_options: Mapping[str, Any] | None = None,
    model_options: Mapping[str, Any] | None = None,
    **embed_options: Any,
) -> dict[str, dict[str, float | int]]:
    """Evaluate a pretrained network zero-shot: its own embedding (no head, no training) on ``dataset``'s test
    protocol (:func:`recallk.evaluation.evaluate_protocol`: leave-one-out, query/gallery or revisited), with the
    preprocessing of its weights' config (mean, std, interpolation: :func:`recallk.data.transforms_for_model`).

    Example: ``evaluate_pretrained("tf_efficientnet_lite0", "kanji", pretrained=recallk.models.lite0_weights(),
    image_size=48, dataset_options={"max_classes": 300})`` -> ``{"test": {"recall@1": ..., "map@r": ...}}``.

    Args:
        model: a timm model name (built by :func:`pretrained_embedding_model` with ``pretrained``, ``pooling`` and
            ``model_options``), or a model already built (``build_model(..., embed_dim=None)``; those three are
            then ignored).
        dataset: a registered dataset name (``recallk.data.DATASET_SPECS``).
        root: its folder (None for kanji, which renders itself).
        image_size: the side in pixels of the test images (a network with a fixed input size is built for it);
            None: the dataset's own size where it has one and the network takes any size (kanji: 64), else the
            weights' input size.
        splits, ks: as :func:`recallk.evaluation.evaluate_protocol` (None: the protocol's splits and ks).
        dataset_options: options of :func:`recallk.data.build_dataset` (``max_classes``, ``skip_bad_images``...).
        embed_options: ``batch_size``, ``device``, ``num_workers``, ``amp``, ``progress`` of
            :func:`recallk.evaluation.embed_dataset`.

    Returns:
        ``{split: metrics}`` with the keys of ``retrieval_metrics`` (fractions in [0, 1] and query counts) or of
        ``revisited_metrics``.

    Raises:
        ValueError: what :func:`pretrained_embedding_model` raises for a name, and what ``evaluate_protocol``
            raises (unknown dataset, missing files, a split without positives, ...).
    """
    if isinstance(model, str):
        model = pretrained_embedding_model(model, pretrained, pooling, image_size, **dict(model_options or {}))
    transform = transforms_for_model(model, "test", dataset=dataset, image_size=image_size)
    return evaluate_protocol(model, dataset, root, transform, ks=ks, splits=splits,
                             dataset_options=dataset_options, **embed_options)
