"""Pretrained weights named portably in a config or on the command line: ``model.pretrained`` /
``recallk eval --pretrained`` take, besides ``true``, ``false`` and a file path, the name of a pip package that
ships weights (its file is found where the package is installed, so a config stays the same on every machine)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recallk.models.weights import LITE0_MODEL, LITE0_PACKAGE, lite0_weights

#: package name -> (the timm model its weights fit, the function returning the file's path)
PRETRAINED_PACKAGES: dict[str, tuple[str, Callable[[], Path]]] = {
    LITE0_PACKAGE: (LITE0_MODEL, lite0_weights),
}


def resolve_pretrained(value: Any, model_name: str | None = None) -> Any:
    """``value`` of ``model.pretrained`` / ``--pretrained`` as ``build_model`` takes it: a package name of
    :data:`PRETRAINED_PACKAGES` becomes the path of its weight file; ``True``, ``False``, ``None`` and file paths
    are returned unchanged (a path is checked by ``build_model``).

    Raises:
        ValueError: a package name given with a model its weights do not fit (``model_name``, compared without
            its weights tag), or the package is not installed (:class:`recallk.models.WeightsError`, saying how
            to install it).
    """
    if not isinstance(value, str | os.PathLike) or os.fspath(value) not in PRETRAINED_PACKAGES:
        return value
    fits, path = PRETRAINED_PACKAGES[os.fspath(value)]
    if model_name is not None and model_name.split(".")[0] != fits:
        raise ValueError(f"pretrained weights {value!r} are {fits}'s, not {model_name}'s: use model name {fits}, "
                         "or give a weight file saved from this model")
    return path()


__all__ = ["PRETRAINED_PACKAGES", "resolve_pretrained"]
