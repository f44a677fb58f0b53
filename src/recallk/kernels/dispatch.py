"""What ``backend="auto"`` and ``memory="auto"`` choose: the fastest measured RS@k path within the memory budget.

The figures the rule follows (forward + backward from float32 embeddings of dimension d, 4 per class; 10 per
class at 10,000 on CUDA), kept here so that the rule and its evidence stay together;
``tests/kernels/test_dispatch.py`` checks that the rule picks the fastest path of every measured case. Sources:
docs/benchmarks.md ("Kernel (GPU)": one NVIDIA H200, torch 2.11, triton 3.6, project at 92d5241; "Loss" and "The
CPU rule by embedding dimension": the project's 2-core CPU).

A path is (backend, memory): "matrix" stores the (rows, cols) similarity and its gradient, "recompute" never
does. Triton's recompute kernels are measured 4-8x slower than the torch recompute path, so "auto" never picks
them; a new backend is picked by "auto" once its figures are added to :data:`MEASURED`.
"""

from __future__ import annotations

import torch

__all__ = ["CPU_RECOMPUTE_FROM_ELEMENTS", "CPU_RECOMPUTE_MAX_DIM", "CUDA_MATRIX_FROM_ELEMENTS", "MATRIX_BUDGET_BYTES",
           "MEASURED", "choose_path"]

#: "auto" stores the float32 similarity only up to this size: 1 GiB, B = 16,384 for a batch against itself.
MATRIX_BUDGET_BYTES = 1 << 30
#: On CUDA the torch recompute path beats every matrix path at 4,000^2 and Triton's matrix kernel wins from
#: 10,000^2: the crossover, log-interpolated between the two measurements, is about 5,000^2 elements.
CUDA_MATRIX_FROM_ELEMENTS = 5_000 * 5_000

#: On the CPU the recompute path (several passes of matrix products over the embeddings, cost growing with d)
#: beats storing the similarity (memory-bound once it leaves the caches) for d <= 256 from 4,000^2 elements; at
#: d = 512 and at 2,000^2 the matrix wins at every measured size; d = 384 at 4,000^2 was a tie (within 0.2%).
CPU_RECOMPUTE_FROM_ELEMENTS = 4_000 * 4_000
CPU_RECOMPUTE_MAX_DIM = 256

#: (device type, rows = cols, d) -> {(backend, memory): milliseconds}; a missing path was not run (out of memory).
#: The CPU rows at d = 64-512 are the end-to-end medians of one ``recallk bench loss`` run each (1 thread; today
#: ``python benchmarks/bench.py loss``).
MEASURED: dict[tuple[str, int, int], dict[tuple[str, str], float]] = {
    ("cuda", 4_000, 512): {("torch", "matrix"): 5.37, ("torch", "recompute"): 3.83, ("triton", "matrix"): 4.95,
                           ("triton", "recompute"): 16.5},
    ("cuda", 10_000, 512): {("torch", "matrix"): 35.1, ("torch", "recompute"): 30.6, ("triton", "matrix"): 16.8,
                            ("triton", "recompute"): 101.0},
    ("cuda", 59_552, 512): {("torch", "recompute"): 462.0, ("triton", "matrix"): 233.0,
                            ("triton", "recompute"): 3145.0},
    ("cuda", 65_536, 512): {("torch", "recompute"): 573.0, ("triton", "matrix"): 312.0,
                            ("triton", "recompute"): 3746.0},
    ("cpu", 16_384, 512): {("torch", "matrix"): 5800.0, ("torch", "recompute"): 6020.0},
    ("cpu", 2_000, 64): {("torch", "matrix"): 35.1, ("torch", "recompute"): 39.1},
    ("cpu", 4_000, 64): {("torch", "matrix"): 315.7, ("torch", "recompute"): 151.2},
    ("cpu", 10_000, 64): {("torch", "matrix"): 3094.0, ("torch", "recompute"): 1894.3},
    ("cpu", 2_000, 128): {("torch", "matrix"): 44.6, ("torch", "recompute"): 53.6},
    ("cpu", 4_000, 128): {("torch", "matrix"): 353.5, ("torch", "recompute"): 218.0},
    ("cpu", 10_000, 128): {("torch", "matrix"): 3388.5, ("torch", "recompute"): 2371.0},
    ("cpu", 2_000, 256): {("torch", "matrix"): 61.4, ("torch", "recompute"): 87.0},
    ("cpu", 4_000, 256): {("torch", "matrix"): 425.7, ("torch", "recompute"): 343.9},
    ("cpu", 10_000, 256): {("torch", "matrix"): 3345.7, ("torch", "recompute"): 3227.4},
    ("cpu", 4_000, 384): {("torch", "matrix"): 503.7, ("torch", "recompute"): 503.0},
    ("cpu", 2_000, 512): {("torch", "matrix"): 98.9, ("torch", "recompute"): 178.8},
    ("cpu", 4_000, 512): {("torch", "matrix"): 587.2, ("torch", "recompute"): 641.7},
    ("cpu", 10_000, 512): {("torch", "matrix"): 3553.6, ("torch", "recompute"): 5104.3},
}


def choose_path(
    device: torch.device, rows: int, cols: int, backend: str = "auto", memory: str = "auto",
    triton_usable: bool = False, budget_bytes: int = MATRIX_BUDGET_BYTES, dim: int | None = None,
) -> tuple[str, str]:  # fmt: skip
    """The ``(backend, memory)`` that runs RS@k of ``rows`` queries against ``cols`` references of dimension
    ``dim`` (None: unknown, as for a similarity given whole) on ``device``.

    ``backend`` and ``memory`` may each be given ("torch"/"triton", "matrix"/"recompute"); "auto" takes the
    fastest measured choice that fits: no matrix above ``budget_bytes`` of float32 similarity; below it on the
    CPU the matrix, except the recompute path from :data:`CPU_RECOMPUTE_FROM_ELEMENTS` when ``dim`` is at most
    :data:`CPU_RECOMPUTE_MAX_DIM`; on CUDA the matrix only with the Triton kernel (``triton_usable``) from
    :data:`CUDA_MATRIX_FROM_ELEMENTS`, the torch recompute path otherwise.
    """
    triton = triton_usable and device.type == "cuda" and backend in ("auto", "triton")
    if memory == "auto":
        if rows * cols * 4 > budget_bytes:
            memory = "recompute"
        elif device.type != "cuda":
            small_dim = dim is not None and dim <= CPU_RECOMPUTE_MAX_DIM
            memory = "recompute" if small_dim and rows * cols >= CPU_RECOMPUTE_FROM_ELEMENTS else "matrix"
        elif backend == "triton":
            memory = "matrix"
        else:
            memory = "matrix" if triton and rows * cols >= CUDA_MATRIX_FROM_ELEMENTS else "recompute"
    if backend == "auto":
        backend = "triton" if triton and memory == "matrix" else "torch"
    return backend, memory
