"""Shared checks of the kernel tests: relative closeness to a reference, and the rerun of a Triton test file under
the interpreter (``TRITON_INTERPRET=1`` must be set before triton is first imported; when another test imported
triton compiled first, each Triton file reruns itself in a fresh process)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch


def rerun_under_interpreter(test_file: str) -> None:
    """Run ``pytest test_file`` in a fresh interpreter with ``TRITON_INTERPRET=1``; assert that it passed."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """|a - e| <= rtol * max|e| element-wise (relative to the tensor's scale, as gradients have zeros); ``actual``
    may be on another device than ``expected`` (it is compared on the CPU)."""
    expected = expected.detach().to("cpu", torch.float64)
    actual = actual.detach().to("cpu")
    scale = expected.abs().max().clamp(min=1e-30)
    err = (actual.to(torch.float64) - expected).abs().max()
    assert torch.isfinite(actual).all()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol} * {scale:.3g}"
