"""The tiny run config of the CLI tests: a few seconds of ``recallk train`` on the CPU (a small ResNet on 32-pixel
images, small batches), as override arguments; each test file states only what its runs do differently."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KANJI_CONFIG = ROOT / "configs" / "kanji.yaml"

_TINY = {
    # an image folder (data.root given by the test): the defaults of DEFAULTS, no config file
    "folder": ("--no-progress", "data.dataset=folder", "data.image_size=32", "model.name=resnet10t",
               "model.embed_dim=16", "train.batch_size=16", "train.chunk_size=8", "train.device=cpu",
               "eval.ks=[1, 2]", "eval.pixel_baseline=false"),
    # the demo's config (configs/kanji.yaml) on 8 training and 4 test classes, one epoch of two steps
    "kanji": ("-c", str(KANJI_CONFIG), "model.name=resnet10t", "data.image_size=32", "data.options.max_classes=8",
              "data.test_options.max_classes=4", "train.epochs=1", "train.batch_size=16", "train.chunk_size=8",
              "train.max_steps_per_epoch=2", "eval.pixel_baseline=false", "train.tensorboard=false"),
}  # fmt: skip


def _key(argument: str) -> str:
    """``train.epochs`` of ``train.epochs=1``; a flag (``--no-progress``, ``-c``) is its own key."""
    return argument.split("=", 1)[0]


def tiny_overrides(dataset: str, *changes: str, drop: Iterable[str] = ()) -> list[str]:
    """The arguments of a tiny ``recallk train`` run on ``dataset`` ("folder" or "kanji"), with ``changes``
    (``key=value`` overrides or flags: one whose key is in the tiny config replaces it in place, the others are
    appended) and without the keys in ``drop`` (dropping ``-c`` drops the config file with it)."""
    base = list(_TINY[dataset])
    dropped = set(drop)
    unknown = dropped - {_key(a) for a in base}
    assert not unknown, f"tiny_overrides: nothing to drop for {sorted(unknown)}"
    if "-c" in dropped:
        at = base.index("-c")
        del base[at : at + 2]
    out = [a for a in base if _key(a) not in dropped]
    for change in changes:
        keys = [_key(a) for a in out]
        if "=" in change and _key(change) in keys:
            out[keys.index(_key(change))] = change
        elif change not in out:
            out.append(change)
    return out
