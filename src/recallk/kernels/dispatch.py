"""What ``backend="auto"`` and ``memory="auto"`` choose: the fastest measured RS@k path within the memory budget.

The figures the rule follows (forward + backward from float32 embeddings, d = 512, 4 per class; 10 per class at
10,000), kept here so that the rule and its evidence stay together; ``tests/kernels/test_dispatch.py`` checks that
the rule picks the fastest path of every measured case. Sources: docs/benchmarks.md ("Kernel (GPU)": one NVIDIA
H200, torch 2.11, triton 3.6, project at 92d5241; "Loss": the project's 2-core CPU).

A path is (backend, memory): "matrix" stores the (rows, cols) similarity and its gradient, "recompute" never
does. Triton's recompute kernels are measured 4-8x slower than the torch recompute path, so "auto" never picks
them; a new backend is picked by "auto" once its figures are added to :data:`MEASURED`.
"""

from __future__ import annotations

import torch

__all__ = ["CUDA_MATRIX_FROM_ELEMENTS", "MATRIX_BUDGET_BYTES", "MEASURED", "choose_path"]

#: "auto" stores the float32 similarity only up to this size: 1 GiB, B = 16,384 for a batch against itself.
MATRIX_BUDGET_BYTES = 1 << 30
#: On CUDA the torch recompute path beats every matrix path at 4,000^2 and Triton's matrix kernel wins from
#: 10,000^2: the crossover, log-interpolated between the two measurements, is about 5,000^2 elements.
CUDA_MATRIX_FROM_ELEMENTS = 5_000 * 5_000

#: (device type, rows = cols) -> {(backend, memory): milliseconds}; a missing path was not run (out of memory).
MEASURED: dict[tuple[str, int], dict[tuple[str, str], float]] = {
    ("cuda", 4_000): {("torch", "matrix"): 5.37, ("torch", "recompute"): 3.83, ("triton", "matrix"): 4.95,
                      ("triton", "recompute"): 16.5},
    ("cuda", 10_000): {("torch", "matrix"): 35.1, ("torch", "recompute"): 30.6, ("triton", "matrix"): 16.8,
                       ("triton", "recompute"): 101.0},
    ("cuda", 59_552): {("torch", "recompute"): 462.0, ("triton", "matrix"): 233.0, ("triton", "recompute"): 3145.0},
    ("cuda", 65_536): {("torch", "recompute"): 573.0, ("triton", "matrix"): 312.0, ("triton", "recompute"): 3746.0},
    ("cpu", 2_000): {("torch", "matrix"): 11.3, ("torch", "recompute"): 15.5},
    ("cpu", 16_384): {("torch", "matrix"): 5800.0, ("torch", "recompute"): 6020.0},
}


def choose_path(
    device: torch.device, rows: int, cols: int, backend: str = "auto", memory: str = "auto",
    triton_usable: bool = False, budget_bytes: int = MATRIX_BUDGET_BYTES,
) -> tuple[str, str]:  # fmt: skip
    """The ``(backend, memory)`` that runs RS@k of ``rows`` queries against ``cols`` references on ``device``.

    ``backend`` and ``memory`` may each be given ("torch"/"triton", "matrix"/"recompute"); "auto" takes the
    fastest measured choice that fits: no matrix above ``budget_bytes`` of float32 similarity, the matrix on the
    CPU below it, and on CUDA the matrix only with the Triton kernel (``triton_usable``) from
    :data:`CUDA_MATRIX_FROM_ELEMENTS`, the torch recompute path otherwise.
    """
    triton = triton_usable and device.type == "cuda" and backend in ("auto", "triton")
    if memory == "auto":
        if rows * cols * 4 > budget_bytes:
            memory = "recompute"
        elif device.type != "cuda" or backend == "triton":
            memory = "matrix"
        else:
            memory = "matrix" if triton and rows * cols >= CUDA_MATRIX_FROM_ELEMENTS else "recompute"
    if backend == "auto":
        backend = "triton" if triton and memory == "matrix" else "torch"
    return backend, memory
