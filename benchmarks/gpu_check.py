"""GPU check of the RS@k paths: correctness against float64 references, then time and peak extra memory.

Usage (on a CUDA machine; one call stays under 5 minutes: no new measurement starts after --deadline seconds,
default 240; needs only torch and triton there, recallk is taken from this repository's src/ when not installed):

    OUT=/some/folder python benchmarks/gpu_check.py    # markdown tables on stdout; $OUT/gpu_check.json
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --smoke   # tiny sizes on the CPU: checks the script only

Float32 embeddings unless said, d = 512, ks = (1, 2, 4, 8, 16), tau_rank = 0.01, tau_k = 1, query excluded.
Sections, in this order (the most important first, so that the deadline cuts the least important):

1. correctness: every method below on the GPU against float64 references: the loop reference of
   ``recallk.testing`` at B = 32 (8 classes x 4), and the torch path in float64 at B = 2,000 (4 per class);
   relative errors of the loss and of dL/dE (max error over max |reference|). This is the proof of the fused
   kernels' tf32x3 accuracy at tau_rank = 0.01.
2. kernels: forward+backward from the embeddings (sim = E E^T included where a method needs it) through
   loss.backward() to dL/dE, at B = 4,000 (4 per class), 10,000 (10 per class) and 65,536 (4 per class; the
   methods storing (B, |P|, B) or two B x B float32 matrices skipped):
   naive (vectorised (B, |P|, B) sigmoids, autograd), torch (matrix), torch-recompute, triton-sim (matrix),
   triton-tiles (the older embeddings kernels, "ieee"), triton-fused (``TritonBackend(kernel="fused")``, tf32x3,
   default tiles) and triton-fused-d512 (the same with whole-width d chunks, ``FusedConfig(max_block_d=512)``,
   which spills registers: measured to weigh spills against forming H twice).
3. api: ``RecallAtKSurrogate`` (default ks and temperatures) on a whole-SOP-sized batch, 59,552 = 14,888 x 4,
   and on B = 4,000: defaults (float32 and bfloat16 embeddings), each backend x memory setting, with and without
   SiMix (148,880 rows at 59,552). "triton_fused" is the registered name of the fused kernels (nothing picks
   the unmeasured kernel by default).

Time: median of the timed repetitions after one warm-up run (Triton compiles then); one repetition when the
warm-up took over 2 s. torch.cuda.Event timing. Memory: torch.cuda.max_memory_allocated during one timed run
minus what was allocated before it (the inputs): the extra memory the loss needs. Every case is in try/except,
so an out-of-memory or an error is reported, not fatal. The JSON is rewritten (atomically) after every case, so a
run cut short still leaves its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

try:
    import recallk  # noqa: F401
except ImportError:  # a bare GPU machine with a copy of the repository: use its src/ without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src"))

KS = (1, 2, 4, 8, 16)
TAU_RANK = 0.01
TAU_K = 1.0
METHODS = ("naive", "torch", "torch-recompute", "triton-sim", "triton-tiles", "triton-fused", "triton-fused-d512")
#: methods left out at B = 65,536: (B, |P|, B) and B x B float32 tensors with their gradients
TOO_LARGE = {65_536: ("naive", "torch")}
TARGETS = {4_000: "<= 1 ms", 10_000: "<= 4 ms", 65_536: "<= 100 ms, <= 1 GB", "simix": "<= 1 s, <= 2 GB"}


def naive_loss(sim: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """RS@k through the full (B, |P|, B) tensor (query excluded), as a straightforward vectorised version."""
    from recallk.kernels import RSkParams
    from recallk.kernels.triton import loss_from_rank

    b = sim.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=sim.device)
    pos_mask = (labels[:, None] == labels[None, :]) & ~eye
    counts = pos_mask.sum(1)
    pmax = int(counts.max())
    pos_idx = torch.sort(pos_mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :pmax]
    valid = torch.arange(pmax, device=sim.device) < counts[:, None]
    s_p = sim.gather(1, pos_idx)
    sig = torch.sigmoid(((sim[:, None, :] - s_p[:, :, None]) / TAU_RANK).clamp(-50.0, 50.0))
    cols = torch.arange(b, device=sim.device)
    keep = ~eye[:, None, :] & (cols[None, None, :] != pos_idx[:, :, None])
    rank = 1.0 + (sig * keep).sum(-1)
    pos = torch.where(valid, pos_idx, -1)
    return loss_from_rank(rank, pos, counts, RSkParams(KS, TAU_RANK, TAU_K))


def methods(labels: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """name -> loss of embeddings E (B, d) for a batch against itself with ``labels``."""
    from recallk.kernels import RSkParams, rsk_loss_from_embeddings, rsk_loss_from_similarity
    from recallk.kernels.triton import TritonBackend
    from recallk.kernels.triton.rsk_fused import FusedConfig

    params = RSkParams(KS, TAU_RANK, TAU_K, include_query=False)
    self_index = torch.arange(labels.numel(), device=labels.device)

    def sim(backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda e: rsk_loss_from_similarity(e @ e.T, labels, labels, params, self_index=self_index,
                                                  backend=backend)  # fmt: skip

    def emb(backend: object) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda e: rsk_loss_from_embeddings(e, e, labels, labels, params, self_index=self_index,
                                                  backend=backend)  # fmt: skip

    return {
        "naive": lambda e: naive_loss(e @ e.T, labels),
        "torch": sim("torch"),
        "torch-recompute": emb("torch"),
        "triton-sim": sim("triton"),
        "triton-tiles": emb(TritonBackend(precision="ieee", kernel="tiles")),
        "triton-fused": emb(TritonBackend(kernel="fused")),
        "triton-fused-d512": emb(TritonBackend(kernel="fused", fused_config=FusedConfig(max_block_d=512))),
    }


class Clock:
    """CUDA events on a GPU, perf_counter on the CPU (smoke mode)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def time_ms(self, work: Callable[[], None]) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            work()
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        work()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)


def run_one(
    fn: Callable[[torch.Tensor], torch.Tensor], base: torch.Tensor, clock: Clock, reps: int, timed: bool = True
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """({ms, ms_all, peak_extra_mb, warmup_s}, loss, dL/dE) after one warm-up (compilation) run; with ``timed``
    False only the warm-up runs (for the correctness checks)."""
    e = base.clone().requires_grad_()
    out: dict = {}

    def step() -> None:
        e.grad = None
        out["loss"] = fn(e)
        out["loss"].backward()

    t0 = time.perf_counter()
    step()  # warm-up: Triton compiles here
    if clock.cuda:
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    loss, grad = out["loss"].detach().clone(), e.grad.detach().clone()
    e.grad = None
    del out["loss"]
    if not timed:
        return {"warmup_s": warmup_s}, loss, grad
    reps = 1 if warmup_s > 2.0 else reps
    before = 0
    if clock.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times = [clock.time_ms(step)]
    peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20 if clock.cuda else None
    for _ in range(reps - 1):
        times.append(clock.time_ms(step))
    out.clear()
    e.grad = None
    return {"ms": statistics.median(times), "ms_all": times, "peak_extra_mb": peak_mb, "warmup_s": warmup_s}, loss, grad


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def batch(b: int, per_class: int, d: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised float32 embeddings (b, d) and labels with ``per_class`` items per class, shuffled."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1).to(device)
    labels = (torch.randperm(b, generator=g) % (b // per_class)).to(device)
    return emb, labels


class Report:
    """Rows of the three sections, printed as JSON lines as they come and saved atomically to $OUT after each."""

    def __init__(self, card: str, t_start: float, deadline: float) -> None:
        self.data = {"card": card, "torch": torch.__version__, "correctness": [], "kernels": [], "api": []}
        self.t_start, self.deadline = t_start, deadline
        try:
            import triton

            self.data["triton"] = triton.__version__
        except ImportError:
            self.data["triton"] = None

    def late(self) -> bool:
        return time.perf_counter() - self.t_start > self.deadline

    def add(self, section: str, row: dict) -> None:
        self.data[section].append(row)
        print(json.dumps({"section": section, **row}), flush=True)
        self.save()

    def save(self) -> None:
        folder = os.environ.get("OUT")
        if not folder:
            return
        self.data["wall_s"] = time.perf_counter() - self.t_start
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(self.data, fh, indent=1)
        os.replace(tmp, os.path.join(folder, "gpu_check.json"))


def guarded(report: Report, work: Callable[[], dict], cuda: bool) -> dict:
    """Run ``work`` unless the deadline passed; an out-of-memory or another error becomes the row's status."""
    if report.late():
        return {"status": "skipped (time budget of the script spent)"}
    try:
        row = work()
        row.setdefault("status", "ok")
    except torch.cuda.OutOfMemoryError as err:
        row = {"status": f"out of memory: {str(err).splitlines()[0][:160]}"}
    except Exception as err:  # report and go on: one failing case must not hide the others
        row = {"status": f"error: {type(err).__name__}: {str(err)[:200]}"}
    if cuda:
        torch.cuda.empty_cache()
    return row


def correctness(report: Report, device: torch.device, clock: Clock, sizes: tuple[tuple[int, int], ...]) -> None:
    """Every method against the loop reference (first size, float64 on the CPU) and the float64 torch path."""
    from recallk.kernels import RSkParams, rsk_loss_from_embeddings
    from recallk.testing.rsk import rsk_loss_reference

    for i, (b, d) in enumerate(sizes):
        emb, labels = batch(b, 4, d, device, seed=1)
        self_index = torch.arange(b, device=device)
        if i == 0:  # recallk.testing's loops, float64, on the CPU
            e64 = emb.double().cpu().requires_grad_()
            ref_loss = rsk_loss_reference(e64 @ e64.T, labels.cpu(), labels.cpu(), self_index.cpu(), KS, TAU_RANK,
                                          TAU_K, False)  # fmt: skip
            (ref_grad,) = torch.autograd.grad(ref_loss, e64)
            reference = "recallk.testing loop reference, float64"
        else:  # the torch path in float64 (itself checked against the loop reference by the test suite)
            e64 = emb.double().requires_grad_()
            ref_loss = rsk_loss_from_embeddings(e64, e64, labels, labels, RSkParams(KS, TAU_RANK, TAU_K),
                                                self_index=self_index, backend="torch")  # fmt: skip
            (ref_grad,) = torch.autograd.grad(ref_loss, e64)
            reference = "torch path, float64"
        for name, fn in methods(labels).items():
            def work(fn=fn, emb=emb, ref_loss=ref_loss, ref_grad=ref_grad) -> dict:
                _, loss, grad = run_one(fn, emb, clock, 1, timed=False)
                le, ge = rel_err(loss, ref_loss.detach()), rel_err(grad, ref_grad.to(grad.device))
                return {"loss_rel_err": le, "grad_rel_err": ge, "within_1e-5": bool(le <= 1e-5 and ge <= 1e-5)}

            report.add("correctness", {"B": b, "d": d, "method": name, "reference": reference,
                                       **guarded(report, work, clock.cuda)})  # fmt: skip


def kernel_cases(report: Report, device: torch.device, clock: Clock, cases: list[tuple[int, int]], d: int,
                 order: tuple[str, ...], reps: int) -> None:  # fmt: skip
    """Each method at each size, methods in ``order`` first for every size, then the others."""
    first = [(b, pc, m) for b, pc in cases for m in order]
    rest = [(b, pc, m) for b, pc in cases for m in METHODS if m not in order]
    data: dict[int, tuple[torch.Tensor, torch.Tensor, dict]] = {}
    for b, per_class, name in first + rest:
        if b not in data:
            emb, labels = batch(b, per_class, d, device)
            data[b] = (emb, labels, methods(labels))
        emb, labels, fns = data[b]
        row = {"B": b, "per_class": per_class, "d": d, "method": name}
        if name in TOO_LARGE.get(b, ()):
            row["status"] = "skipped (too large for this method)"
        else:
            def work(fn=fns[name], b=b, emb=emb) -> dict:
                stats, loss, _ = run_one(fn, emb, clock, 2 if b > 20_000 else reps)
                return {**stats, "loss": float(loss)}

            row.update(guarded(report, work, clock.cuda))
        report.add("kernels", row)


def api_cases(report: Report, device: torch.device, clock: Clock, sizes: tuple[int, ...], d: int, reps: int,
              slow_at: int) -> None:  # fmt: skip
    """RecallAtKSurrogate at each size (4 per class): defaults, bf16, each backend x memory, with/without SiMix.
    The older Triton embeddings kernels are left out at ``slow_at`` rows and above with SiMix (measured: 19.9 s)."""
    from recallk.losses import RecallAtKSurrogate

    settings = [
        ("defaults", {}, torch.float32),
        ("defaults, bf16 embeddings", {}, torch.bfloat16),
        ("torch, matrix", {"backend": "torch", "memory": "matrix"}, torch.float32),
        ("torch, recompute", {"backend": "torch", "memory": "recompute"}, torch.float32),
        ("triton, matrix", {"backend": "triton", "memory": "matrix"}, torch.float32),
        ("triton_fused, recompute", {"backend": "triton_fused", "memory": "recompute"}, torch.float32),
        ("triton_fused, recompute, bf16", {"backend": "triton_fused", "memory": "recompute"}, torch.bfloat16),
        ("triton (tiles kernel), recompute", {"backend": "triton", "memory": "recompute"}, torch.float32),
    ]
    jobs = [(b, simix, s) for b in sizes for simix in (False, True) for s in settings]
    jobs.sort(key=lambda j: (j[0] != sizes[-1], j[1] is False))  # the whole-dataset batch with SiMix first
    data = {b: batch(b, 4, d, device, seed=2) for b in sizes}
    for b, simix, (label, kwargs, dtype) in jobs:
        emb, labels = data[b]
        rows = b + (6 * (b // 4) if simix else 0)
        row = {"B": b, "rows": rows, "simix": simix, "setting": label, "dtype": str(dtype).removeprefix("torch.")}
        if label.startswith("triton (tiles") and simix and b >= slow_at:
            row["status"] = "skipped (measured before: 19.9 s)"
            report.add("api", row)
            continue

        def work(kwargs=kwargs, dtype=dtype, simix=simix, b=b, emb=emb, labels=labels) -> dict:
            loss_fn = RecallAtKSurrogate(simix=simix, generator=torch.Generator().manual_seed(0), **kwargs)
            path = loss_fn._path(device, emb.shape[1], loss_fn._augmented_size(labels))
            stats, loss, _ = run_one(lambda e: loss_fn(e, labels), emb.to(dtype), clock, 2 if b > 20_000 else reps)
            return {**stats, "loss": float(loss), "path": list(path)}

        row.update(guarded(report, work, clock.cuda))
        report.add("api", row)


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if "ms" not in row:
        return row["status"].split(":")[0].split(" (")[0]
    mb = f", {row['peak_extra_mb']:.0f} MB" if row.get("peak_extra_mb") is not None else ""
    return f"{row['ms']:.1f} ms{mb}"


def print_tables(report: Report, default_method: Callable[[int], str]) -> None:
    data = report.data
    print(f"\n### Correctness on {data['card']} (float32 inputs; errors relative to max |reference|)\n")
    print("| B | d | method | reference | loss rel. err | grad rel. err | status |")
    print("|---|---|---|---|---|---|---|")
    for r in data["correctness"]:
        le = f"{r['loss_rel_err']:.1e}" if "loss_rel_err" in r else "-"
        ge = f"{r['grad_rel_err']:.1e}" if "grad_rel_err" in r else "-"
        print(f"| {r['B']} | {r['d']} | {r['method']} | {r['reference']} | {le} | {ge} | {r['status']} |")

    kernels = {(r["B"], r["method"]): r for r in data["kernels"]}
    sizes = sorted({r["B"] for r in data["kernels"]})
    print(f"\n### Forward+backward from float32 embeddings, {data['card']} (time, extra peak memory)\n")
    print("| B | " + " | ".join(METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))
    for b in sizes:
        print(f"| {b:,} | " + " | ".join(_cell(kernels.get((b, m))) for m in METHODS) + " |")

    print("\n### Issue 14 targets (H200 or H100, float32 embeddings, d = 512)\n")
    print("| case | torch-recompute | triton matrix | triton fused | fused, d chunk 512 | default (auto) | target |")
    print("|---|---|---|---|---|---|---|")
    for b, key in zip(sizes, (4_000, 10_000, 65_536), strict=False):
        cells = [_cell(kernels.get((b, m))) for m in ("torch-recompute", "triton-sim", "triton-fused",
                                                        "triton-fused-d512")]  # fmt: skip
        default = default_method(b)
        cells.append(f"{default}: {_cell(kernels.get((b, default)))}")
        print(f"| B = {b:,} | " + " | ".join(cells) + f" | {TARGETS.get(key, '-')} |")
    api = {(r["B"], r["simix"], r["setting"]): r for r in data["api"]}
    big = max((r["B"] for r in data["api"]), default=None)
    if big is not None:
        cells = [_cell(api.get((big, True, s))) for s in ("torch, recompute", "triton, matrix",
                                                           "triton_fused, recompute")]  # fmt: skip
        cells.insert(3, "-")
        cells.append(_cell(api.get((big, True, "defaults"))))
        print(f"| {big:,} + SiMix, RecallAtKSurrogate | " + " | ".join(cells) + f" | {TARGETS['simix']} |")

    print(f"\n### RecallAtKSurrogate (default ks and temperatures), {data['card']}, d = 512\n")
    print("| B | SiMix (rows) | setting | path (backend, memory) | time, extra peak memory | status |")
    print("|---|---|---|---|---|---|")
    for r in data["api"]:
        simix = f"yes ({r['rows']:,})" if r["simix"] else "no"
        path = ", ".join(r.get("path", [])) or "-"
        print(f"| {r['B']:,} | {simix} | {r['setting']} | {path} | {_cell(r)} | {r['status'][:80]} |")
    print(f"\ntotal wall time {time.perf_counter() - report.t_start:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (needs TRITON_INTERPRET=1)")
    parser.add_argument("--deadline", type=float, default=240.0,
                        help="seconds after which no new measurement starts (default 240)")  # fmt: skip
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("no CUDA device: run on a GPU machine, or with --smoke under TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("--smoke runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    card = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter, smoke test only)"
    clock = Clock(cuda)
    report = Report(card, time.perf_counter(), args.deadline)
    priority = ("triton-fused", "torch-recompute", "triton-sim", "triton-fused-d512")
    if args.smoke:
        TOO_LARGE[64] = TOO_LARGE.pop(65_536)
        correctness(report, device, clock, ((32, 16), (48, 16)))
        kernel_cases(report, device, clock, [(48, 4), (60, 10), (64, 4)], 16, priority, 2)
        api_cases(report, device, clock, (32,), 16, 1, slow_at=32)
        sizes_map = {48: 4_000, 60: 10_000, 64: 65_536}
    else:
        correctness(report, device, clock, ((32, 512), (2_000, 512)))
        kernel_cases(report, device, clock, [(4_000, 4), (10_000, 10), (65_536, 4)], 512, priority, 5)
        api_cases(report, device, clock, (4_000, 59_552), 512, 5, slow_at=59_552)
        sizes_map = {4_000: 4_000, 10_000: 10_000, 65_536: 65_536}

    from recallk.kernels import auto_path

    def default_method(b: int) -> str:  # what backend="auto", memory="auto" picks, as a METHODS name
        backend, memory = auto_path(torch.device("cuda"), sizes_map.get(b, b), sizes_map.get(b, b))
        return {("torch", "matrix"): "torch", ("torch", "recompute"): "torch-recompute",
                ("triton", "matrix"): "triton-sim", ("triton", "recompute"): "triton-tiles"}[(backend, memory)]

    report.save()
    print_tables(report, default_method)
    if os.environ.get("OUT"):
        print(f"wrote {os.path.join(os.environ['OUT'], 'gpu_check.json')}")
    failed = [r for r in report.data["correctness"] if r.get("within_1e-5") is False or r["status"] != "ok"]
    if failed:
        print(f"{len(failed)} correctness rows not within 1e-5 or not run: see above", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
