"""``recallk eval --checkpoint``: a trained checkpoint evaluated on a dataset's test protocol or on query/gallery
folders (the evaluation side of the CLI's wiring; training is in :mod:`recallk.cli.wiring`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from recallk.cli.retrieval import progress_option, run_data_options
from recallk.config import upgrade_config
from recallk.data import build_dataset, dataset_spec, validation_split
from recallk.data.transforms import transforms_for_model
from recallk.evaluation import embed_dataset, evaluate_protocol, retrieval_metrics
from recallk.evaluation.protocols import labels_by_class_name
from recallk.retrieval import load_trained_model
from recallk.retrieval.embed import EmbeddingFile
from recallk.retrieval.evaluate import evaluate_query_gallery
from recallk.utils import resolve_device

__all__ = ["VALIDATION_SPLIT", "evaluate_checkpoint"]
#: ``--split validation``: the validation classes a run held out of its training split (``data.val_classes``)
VALIDATION_SPLIT = "validation"


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
        tf = transforms_for_model(model, "test", dataset="folder", image_size=image_size)
        sets = [build_dataset("folder", folder, None, tf) for folder in (query, gallery)]
        (q_emb, _), (g_emb, _) = (embed_dataset(model, ds, num_workers=num_workers, **embed_options)
                                  for ds in sets)
        folder_ks = ks or run_ks or dataset_spec("folder").eval_ks
        labels = labels_by_class_name(sets[0], sets[1])  # query_gallery_metrics's classes matched by name
        q, g = (EmbeddingFile(emb, lab, np.array([str(Path(p).resolve()) for p in ds.paths], dtype=str), [], {})
                for emb, lab, ds in zip((q_emb, g_emb), labels, sets))
        return {"query": evaluate_query_gallery(
            q, g, folder_ks, notice=lambda line: print(f"recallk eval: note: {line}", file=sys.stderr, flush=True),
            device=embed_options["device"])}  # a query image also in the gallery leaves its own copy out
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
