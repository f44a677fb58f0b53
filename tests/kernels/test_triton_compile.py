"""The Triton kernels compile for an H100 (sm_90) without a GPU, with no register spills at the default tiles
(the tensor-core kernels of ``rsk_fused`` included, with their default tf32x3 tile products).

The interpreter tests check the maths but compile nothing; this runs benchmarks/compile_check.py, which compiles
every kernel with the tiles the wrappers pick for issue 7's cases and reads registers and spills from ptxas. It
runs in a subprocess because this test session imports Triton in interpreter mode (tests/conftest.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "compile_check.py"
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build ships no ptxas")
def test_every_kernel_compiles_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| B=")]
    kernels = {"similarity forward", "similarity backward", "embeddings forward", "embeddings dq", "embeddings dref",
               "fused forward", "fused dq", "fused dref"}
    assert len(rows) == 3 * len(kernels) and {r.split(" | ")[1] for r in rows} == kernels
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        registers, spills = int(cells[5]), cells[6]
        assert registers <= 255 and re.fullmatch(r"0 / 0", spills), row
