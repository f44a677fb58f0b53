"""Compile the Triton RS@k kernels for a GPU architecture without a GPU, and report registers and spills.

Triton compiles to PTX and ptxas assembles it on any machine; only running needs the device. This checks that
every kernel compiles for the target (the interpreter used by the tests does not compile anything) and shows the
register pressure of the tile sizes the wrappers pick for issue 7's cases, read from ``ptxas -v``; the fused
tensor-core kernels of ``rsk_fused`` (issue 14) with their default tiles and tf32x3 tile products included:

    python benchmarks/compile_check.py                 # sm_90 (H100/H200), the issue's three cases
    python benchmarks/compile_check.py --arch 80       # A100

Prints a markdown table: kernel, case, tile sizes, warps, registers per thread, spill stores/loads (bytes).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

try:
    import recallk  # noqa: F401
except ImportError:  # a bare checkout: use its src/ without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src"))

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from recallk.kernels.triton import rsk_embeddings as emb_mod
from recallk.kernels.triton import rsk_fused as fused_mod
from recallk.kernels.triton import rsk_similarity as sim_mod

#: (name, B, positives per query, d): issue 7's cases
CASES = [
    ("B=4000, 4/class", 4000, 3, 512),
    ("B=10,000, 10/class", 10_000, 9, 512),
    ("B=65,536, 4/class", 65_536, 3, 512),
]

_SIM_ARGS = {"sim_ptr": "*fp32", "stride_sq": "i64", "stride_sn": "i64", "pos_ptr": "*i32", "self_ptr": "*i64",
             "N": "i32", "P": "i32", "inv_tau": "fp32"}
_EMB_ARGS = {"qe_ptr": "*fp32", "re_ptr": "*fp32", "sp_ptr": "*fp32", "pos_ptr": "*i32", "self_ptr": "*i64",
             "Q": "i32", "N": "i32", "D": "i32", "P": "i32", "stride_qe": "i64", "stride_re": "i64",
             "stride_out": "i64", "inv_tau": "fp32", "scale": "fp32", "SPLITS": "i32"}


def _signature(fn: triton.JITFunction, known: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in known:
            sig[name] = known[name]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name.startswith("stride"):
            sig[name] = "i64"
        else:
            raise KeyError(f"no type for argument {name} of {fn.__name__}")
    return sig


def kernels_for(b: int, pmax: int, d: int) -> list[tuple[str, triton.JITFunction, dict[str, object], int, int]]:
    """(label, kernel, constexprs, num_warps, num_stages) as the wrappers launch them for b, Pmax, width d."""
    bp, bn = sim_mod._blocks(pmax, b, None, None)
    sim_meta = {"INCLUDE_QUERY": False, "BLOCK_P": bp, "BLOCK_N": bn}
    bq, ebn, ebp = emb_mod._blocks(pmax, None, None, None)
    bd = max(16, triton.next_power_of_2(d))
    fwd_meta = {"INCLUDE_QUERY": False, "BLOCK_Q": bq, "BLOCK_P": ebp, "BLOCK_N": ebn, "BLOCK_K": emb_mod._BLOCK_K,
                "PRECISION": "ieee"}
    bwd_q, bwd_n = emb_mod._BACKWARD_TILES
    bwd_meta = {"INCLUDE_QUERY": False, "BLOCK_Q": bwd_q, "BLOCK_N": bwd_n, "BLOCK_K": emb_mod._BLOCK_K,
                "BLOCK_D": bd, "PRECISION": "ieee"}
    bwd_warps = 8 if bd >= 256 else 4
    stages = emb_mod._NUM_STAGES
    return [
        ("similarity forward", sim_mod._rank_fwd_kernel, sim_meta, 4, 3),
        ("similarity backward", sim_mod._rank_bwd_kernel, sim_meta, 4, 3),
        ("embeddings forward", emb_mod._emb_fwd_kernel, fwd_meta, 4, stages),
        ("embeddings dq", emb_mod._emb_dq_kernel, bwd_meta, bwd_warps, stages),
        ("embeddings dref", emb_mod._emb_dref_kernel, bwd_meta, bwd_warps, stages),
        *fused_kernels(pmax, d, fused_mod.DEFAULT_CONFIG),
    ]


def fused_kernels(
    pmax: int, d: int, config: fused_mod.FusedConfig, precision: str = "tf32x3"
) -> list[tuple[str, triton.JITFunction, dict[str, object], int, int]]:
    """The tensor-core kernels of ``rsk_fused`` as ``rank_from_embeddings_fused`` launches them (float32 input)."""
    bq, bn, bk, warps, stages = config.fwd
    fwd = {"INCLUDE_QUERY": False, "WANT_DSUM": True, "BLOCK_Q": bq, "BLOCK_N": bn, "BLOCK_K": bk,
           "BLOCK_P": config.block_p(pmax), "PRECISION": precision, "HALF": False}
    rows = [("fused forward", fused_mod._fwd_kernel, fwd, warps, stages)]
    for name, fn, tiles in (("fused dq", fused_mod._dq_kernel, config.dq),
                            ("fused dref", fused_mod._dref_kernel, config.dref)):  # fmt: skip
        bq, bn, bk, bwarps, bstages = tiles
        meta = {"INCLUDE_QUERY": False, "BLOCK_Q": bq, "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": config.block_d(d),
                "PRECISION": precision, "HALF": False}
        rows.append((name, fn, meta, bwarps, bstages))
    return rows


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` on the PTX."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    suffix = "a" if arch == 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", path, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True)
    text = out.stderr + out.stdout
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    stores = int(re.search(r"(\d+) bytes spill stores", text).group(1))
    loads = int(re.search(r"(\d+) bytes spill loads", text).group(1))
    return regs, stores, loads


def compile_kernel(
    fn: triton.JITFunction, constexprs: dict[str, object], num_warps: int, num_stages: int, arch: int
) -> str:
    """PTX of ``fn`` compiled for sm_<arch> with these constexprs (raises on a compile error)."""
    known = _EMB_ARGS if "qe_ptr" in fn.arg_names else _SIM_ARGS
    src = ASTSource(fn, signature=_signature(fn, known, constexprs), constexprs=constexprs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return kernel.asm["ptx"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    args = parser.parse_args(argv)
    print(f"Triton {triton.__version__}, target sm_{args.arch}\n")
    print("| case | kernel | tiles | warps | stages | registers | spill stores / loads (bytes) |")
    print("|---|---|---|---|---|---|---|")
    seen: dict[tuple, tuple[int, int, int]] = {}
    for label, b, pmax, d in CASES:
        for name, fn, meta, warps, stages in kernels_for(b, pmax, d):
            key = (fn.__name__, tuple(sorted(meta.items())), warps, stages)
            if key not in seen:
                seen[key] = ptxas_usage(compile_kernel(fn, meta, warps, stages, args.arch), args.arch)
            regs, st, ld = seen[key]
            tiles = ", ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in meta.items() if k.startswith("BLOCK"))
            print(f"| {label} | {name} | {tiles} | {warps} | {stages} | {regs} | {st} / {ld} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
