"""GPU check of the fused RS@k kernels: correctness against the torch path, then time and peak memory.

Usage (on a CUDA machine, about 5 minutes on an H100 at most; needs only torch and triton there, recallk is
taken from this repository's src/ when it is not installed):

    python benchmarks/gpu_check.py                 # prints a markdown table; writes $OUT/gpu_check.json if $OUT
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --smoke   # tiny sizes on the CPU: checks the script only

Cases (float32 embeddings, d = 512, ks = (1, 2, 4, 8, 16), tau_rank = 0.01, tau_k = 1, query excluded):
B = 4000 with 4 per class, B = 10,000 with 10 per class, B = 65,536 with 4 per class (naive and torch path
skipped there). Methods, each timed from the embeddings (sim = E E^T included where a method needs it) through
loss.backward() to dL/dE:

* naive        - vectorised (B, |P|, B) sigmoid tensor, autograd through it;
* torch        - recallk.kernels.rsk_loss_from_similarity(..., backend="torch") (blocked autograd Function);
* torch-recompute - rsk_loss_from_embeddings(..., backend="torch") (blocks of similarity rows from the
                 embeddings, nothing B x B);
* triton-sim   - rsk_loss_from_similarity(..., backend="triton") on the (B, B) similarity;
* triton-emb   - rsk_loss_from_embeddings(..., backend=TritonBackend(precision=...)) (tiles recomputed, nothing
                 B x B), with tl.dot input precision "ieee" and "tf32x3".

Time: median of a few repetitions after a warm-up (Triton compiles then), torch.cuda.Event. Memory: peak of
torch.cuda.max_memory_allocated during one forward+backward minus what was allocated before it (the embeddings),
i.e. the extra memory the loss needs. Every case runs in try/except, so an out-of-memory is reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
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
DEADLINE_S = 270.0  # stop starting new measurements after this (the whole script must stay near 5 min)


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
    from recallk.kernels import RSkParams, rsk_loss_from_embeddings, rsk_loss_from_similarity
    from recallk.kernels.triton import TritonBackend

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
        "triton-emb ieee": emb(TritonBackend(precision="ieee")),
        "triton-emb tf32x3": emb(TritonBackend(precision="tf32x3")),
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
    fn: Callable[[torch.Tensor], torch.Tensor], base: torch.Tensor, clock: Clock, reps: int
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Returns ({ms, peak_mb, ...}, loss, dL/dE) after one warm-up (compilation) run."""
    e = base.clone().requires_grad_()
    out: dict = {}

    def step() -> None:
        e.grad = None
        out["loss"] = fn(e)
        out["loss"].backward()

    step()  # warm-up: Triton compiles here
    loss, grad = out["loss"].detach().clone(), e.grad.detach().clone()
    e.grad = None
    if clock.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times = [clock.time_ms(step)]
    peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20 if clock.cuda else None
    for _ in range(reps - 1):
        times.append(clock.time_ms(step))
    del out["loss"]
    return {"ms": statistics.median(times), "ms_all": times, "peak_extra_mb": peak_mb}, loss, grad


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (needs TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("no CUDA device: run on a GPU machine, or with --smoke under TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    if args.smoke:
        cases, d, reps = [(48, 4, ()), (60, 10, ()), (64, 4, ("naive", "torch"))], 16, 2
    else:
        cases, d, reps = [(4000, 4, ()), (10_000, 10, ()), (65_536, 4, ("naive", "torch"))], 512, 5
    card = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter, smoke test only)"
    clock = Clock(cuda)
    t_start = time.perf_counter()
    results = []
    for b, per_class, skip in cases:
        g = torch.Generator(device="cpu").manual_seed(0)
        base = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1).to(device)
        labels = (torch.randperm(b, generator=g) % (b // per_class)).to(device)
        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, fn in methods(labels).items():
            row = {"card": card, "B": b, "per_class": per_class, "d": d, "method": name}
            if name in skip:
                row["status"] = "skipped (too large for this method)"
            elif time.perf_counter() - t_start > DEADLINE_S:
                row["status"] = "skipped (time budget of the script spent)"
            else:
                try:
                    stats, loss, grad = run_one(fn, base, clock, 2 if b > 20_000 else reps)
                    row.update(stats, status="ok", loss=float(loss))
                    found[name] = (loss, grad)
                except torch.cuda.OutOfMemoryError:
                    row["status"] = "out of memory"
                except Exception as err:  # report and go on: one failing method must not hide the others
                    row["status"] = f"error: {type(err).__name__}: {str(err)[:200]}"
                if cuda:
                    torch.cuda.empty_cache()
            results.append(row)
            print(json.dumps(row), flush=True)
        reference = "torch" if "torch" in found else "triton-sim"
        if reference in found:
            ref_loss, ref_grad = found[reference]
            for row in results:
                if row["B"] == b and row["method"] in found and row["method"] != reference:
                    loss, grad = found[row["method"]]
                    row["check_against"] = reference
                    row["loss_rel_err"] = rel_err(loss, ref_loss)
                    row["grad_rel_err"] = rel_err(grad, ref_grad)

    print(f"\n### RS@k forward+backward, {card}, float32 inputs, d = {d}\n")
    print("| B | per class | method | time (ms) | extra peak memory (MB) | loss rel. err | grad rel. err | status |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        ms = f"{r['ms']:.3f}" if "ms" in r else "-"
        mb = f"{r['peak_extra_mb']:.0f}" if r.get("peak_extra_mb") is not None else "-"
        le = f"{r['loss_rel_err']:.1e}" if "loss_rel_err" in r else "-"
        ge = f"{r['grad_rel_err']:.1e}" if "grad_rel_err" in r else "-"
        vs = f" (vs {r['check_against']})" if "check_against" in r else ""
        print(f"| {r['B']} | {r['per_class']} | {r['method']} | {ms} | {mb} | {le}{vs} | {ge} | {r['status']} |")
    print(f"\ntotal wall time {time.perf_counter() - t_start:.1f} s")
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "gpu_check.json")
        with open(path, "w") as fh:
            json.dump({"card": card, "torch": torch.__version__, "results": results}, fh, indent=1)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
