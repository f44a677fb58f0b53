"""The device and the dtypes of the device-aware tests, read here and only here from the environment (as
pytorch-metric-learning's ``TEST_DEVICE`` / ``TEST_DTYPES``):

- ``RECALLK_TEST_DEVICE``: ``cpu`` (default), ``cuda`` or ``cuda:N``. The kernel tests (tests/kernels), the loss
  tests (tests/losses) and the cached-step tests of tests/engine put their inputs and models there (fixture
  ``device``); their references stay float64 on the CPU. Tests that cannot run there skip and say why.
- ``RECALLK_TEST_DTYPES``: comma-separated float dtypes, default ``float32,float64``: the dtypes of the tests that
  loop over dtypes (fixture ``dtype``) and the precision the backend contract tests run in.

On a GPU machine: ``RECALLK_TEST_DEVICE=cuda python -m pytest tests/kernels tests/losses tests/engine``.
"""

from __future__ import annotations

import os

import pytest
import torch

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"RECALLK_TEST_DEVICE={text!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"RECALLK_TEST_DEVICE={text!r}: the tests run on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"RECALLK_TEST_DEVICE={text!r} but torch sees no CUDA device (torch.cuda.is_available())")
    if device.type == "cuda" and device.index is None:  # tensors report cuda:0, and cuda != cuda:0
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _dtypes(text: str) -> tuple[torch.dtype, ...]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in _DTYPES]
    if unknown or not names:
        raise ValueError(f"RECALLK_TEST_DTYPES={text!r}: give a comma-separated list of {', '.join(_DTYPES)}")
    return tuple(dict.fromkeys(_DTYPES[name] for name in names))


#: the device of the device-aware tests
TEST_DEVICE = _device(os.environ.get("RECALLK_TEST_DEVICE", "cpu"))
#: the dtypes of the tests that loop over dtypes
TEST_DTYPES = _dtypes(os.environ.get("RECALLK_TEST_DTYPES", "float32,float64"))
ON_CPU = TEST_DEVICE.type == "cpu"


def dtype_id(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (test ids)."""
    return str(dtype).removeprefix("torch.")


def most_precise(supported: tuple[torch.dtype, ...] | list[torch.dtype]) -> torch.dtype | None:
    """The widest of ``TEST_DTYPES`` in ``supported`` (None when there is none)."""
    usable = [d for d in TEST_DTYPES if d in supported]
    return max(usable, key=lambda d: (torch.finfo(d).bits, torch.finfo(d).eps < 1e-3)) if usable else None


def cpu_only(reason: str) -> pytest.MarkDecorator:
    """Skip the test (or module: ``pytestmark = cpu_only(...)``) unless ``RECALLK_TEST_DEVICE`` is the CPU."""
    return pytest.mark.skipif(not ON_CPU, reason=f"runs on the CPU only (RECALLK_TEST_DEVICE={TEST_DEVICE}): {reason}")
