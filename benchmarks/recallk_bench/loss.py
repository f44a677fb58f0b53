"""Benchmark of the RS@k loss: the naive vectorised (B, |P|, B) version against our implementations.

Methods (``METHODS``): ``naive``; ``torch`` (the blocked torch path on the (B, B) matrix); ``torch-recompute``
(the blocked torch path from the embeddings, no (B, B) matrix); ``triton`` (the fused kernels on the matrix) and
``triton-recompute`` (kernels that recompute similarity tiles from the embeddings). The Triton methods need
CUDA (or TRITON_INTERPRET=1 at tiny sizes); by default they run when the device is a GPU and triton imports.

Each case times forward + backward from random L2-normalised embeddings (float32, ``dim``-D, ``per_class`` items
per class) twice: from the similarity matrix (the loss alone; not for the recompute methods, which never have
one) and end to end (similarity, loss, gradient back to the embeddings). Peak memory is measured
- on CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the step;
- on CPU: the process's peak resident set size (``VmHWM`` in ``/proc/self/status``, reset by writing 5 to
  ``/proc/self/clear_refs``) minus the resident size before the step: the bytes the step really touched.
  For that run only, glibc's mmap threshold is set to 64 KiB so that every tensor is mapped when allocated
  and unmapped when freed; timed runs use a fixed 32 MiB threshold (heap reuse, as in a warmed-up process).
  Where the kernel does not allow the reset, the figure is left out (``None``).
The naive version is skipped, with a note, when its estimated memory exceeds ``naive_max_gib``.

Run ``python benchmarks/bench.py loss --sizes 1000 2000 4000 --simix-size 10000``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from recallk.kernels.triton import triton_available
from recallk.losses import RecallAtKSurrogate, simix
from recallk.testing.rsk import naive_rsk_loss
from recallk_bench.arguments import HelpFormatter, positive_float, positive_int, prog

__all__ = ["METHODS", "default_methods", "main", "naive_rsk_loss", "run_loss_benchmark"]

KS = (1, 2, 4, 8, 16)
#: method name -> the label of its rows
METHODS = {
    "naive": "naive (B x P x B)",
    "torch": "ours (torch blocked)",
    "torch-recompute": "ours (torch, recompute)",
    "triton": "ours (triton)",
    "triton-recompute": "ours (triton, recompute)",
}


def default_methods(device: str | torch.device) -> list[str]:
    """Every method that can run on ``device``: the Triton ones only on CUDA with triton installed."""
    names = ["naive", "torch", "torch-recompute"]
    if torch.device(device).type == "cuda" and triton_available():
        names += ["triton", "triton-recompute"]
    return names


class _PeakMemory:
    """Peak memory of a block of code, in bytes above the level at its start (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM) increase"

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise OSError(field)

    def __enter__(self) -> _PeakMemory:
        self.peak: int | None = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        _set_mmap_threshold(_MEMORY_MMAP_THRESHOLD, trim=True)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = self._status_kib("VmRSS") * 1024
        except OSError:
            self.start = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            if self.start is not None:
                self.peak = self._status_kib("VmHWM") * 1024 - self.start
            _set_mmap_threshold(_TIMING_MMAP_THRESHOLD)


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_TIMING_MMAP_THRESHOLD = 32 * 2**20  # what glibc's dynamic threshold reaches once large blocks were freed
_MEMORY_MMAP_THRESHOLD = 64 * 2**10


def _set_mmap_threshold(n_bytes: int, trim: bool = False) -> None:
    """Fix glibc's mmap threshold (process-wide; benchmark only; no-op without glibc). Below it, freed blocks
    stay in the heap for reuse (fast, as in a warmed-up process); above it, each block is mapped on allocation
    and returned to the OS when freed, so the resident size follows the live tensors."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, n_bytes)
        # glibc's own dynamic rule keeps up to twice the mmap threshold of free heap before trimming it; setting
        # the threshold by hand turns that rule off, so restore it (else every large tensor is faulted in again).
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * n_bytes)
        if trim:
            libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _time_step(
    step: Callable[[], None], device: torch.device, repeats: int
) -> tuple[float, float, int | None, str]:
    """Median and minimum wall time (ms) of ``step`` over ``repeats`` runs after one warm-up, and the peak
    memory of one more run."""
    step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    with _PeakMemory(device) as mem:
        step()
    return statistics.median(times), min(times), mem.peak, mem.method


def _naive_bytes(n: int, positives: int) -> int:
    # terms, the keep mask, their product, the scaled difference and autograd's saved copies: ~6 float32 buffers
    return 6 * 4 * n * positives * n


def run_loss_benchmark(
    sizes: Sequence[int],
    per_class: int,
    dim: int,
    device: str | torch.device,
    include_naive: bool = True,
    simix_sizes: Sequence[int] = (),
    repeats: int = 5,
    naive_max_gib: float = 6.0,
    seed: int = 0,
    methods: Sequence[str] | None = None,
) -> list[dict]:
    """Time and peak memory of forward + backward, naive vs ours, at each batch size.

    Args:
        sizes: batch sizes B (plain RS@k, ``per_class`` items per class).
        per_class: items per class in the real batch.
        dim: embedding dimension.
        device: where to run.
        include_naive: also run the naive (B, |P|, B) version (skipped above ``naive_max_gib``).
        methods: names from ``METHODS`` (default: :func:`default_methods`); ``include_naive=False`` drops
            "naive" from them.
        simix_sizes: augmented batch sizes for SiMix cases: the real batch is the largest multiple of
            ``per_class`` whose SiMix-augmented size (per_class + pairs per class, per class) is at most it.
        repeats: timed repetitions (median reported) after one warm-up.

    Returns:
        One dict per (case, method): ``case``, ``method``, ``B`` (items ranked, after SiMix), ``real_B``,
        ``positives``, ``dim``, ``loss_ms`` / ``loss_min_ms`` / ``loss_peak_mib`` (from the similarity),
        ``e2e_ms`` / ``e2e_min_ms`` / ``e2e_peak_mib`` (from the embeddings), ``memory`` (how peaks were
        measured), ``threads``, ``device``, ``note``. Times are medians (``*_min_ms``: minima) in ms; the
        ``loss_*`` fields of the recompute methods are None.

    Raises:
        ValueError: unknown methods; ``repeats`` or ``dim`` < 1, ``per_class`` < 2, a size below ``per_class``,
            a SiMix size below ``per_class`` + its pairs (no whole class fits).
    """
    pairs_per_class = per_class * (per_class - 1) // 2
    if repeats < 1 or dim < 1 or per_class < 2:
        raise ValueError(f"repeats and dim must be >= 1 and per_class >= 2, got {repeats}, {dim}, {per_class}")
    if any(b < per_class for b in sizes) or any(s < per_class + pairs_per_class for s in simix_sizes):
        raise ValueError(f"every size must be >= per_class ({per_class}) and every SiMix size >= "
                         f"{per_class + pairs_per_class}, got sizes {list(sizes)}, SiMix sizes {list(simix_sizes)}")
    dev = torch.device(device)
    methods = list(default_methods(dev) if methods is None else methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}: choose from {list(METHODS)}")
    if not include_naive:
        methods = [m for m in methods if m != "naive"]
    if dev.type == "cpu":
        _set_mmap_threshold(_TIMING_MMAP_THRESHOLD)
    gen = torch.Generator().manual_seed(seed)
    cases = [("rsk", b, b) for b in sizes]
    for s in simix_sizes:
        real = (s // (per_class + pairs_per_class)) * per_class
        cases.append(("rsk+simix", real, real // per_class * (per_class + pairs_per_class)))
    rows: list[dict] = []
    for case, real_b, ranked_b in cases:
        rows += _bench_case(case, real_b, ranked_b, per_class, dim, dev, gen, methods, naive_max_gib, repeats, seed)
    return rows


def _bench_case(
    case: str, real_b: int, ranked_b: int, per_class: int, dim: int, dev: torch.device, gen: torch.Generator,
    methods: Sequence[str], naive_max_gib: float, repeats: int, seed: int,
) -> list[dict]:
    emb0 = torch.nn.functional.normalize(torch.randn(real_b, dim, generator=gen), dim=1).to(dev)
    labels = (torch.arange(real_b) // per_class).to(dev)
    with_simix = case == "rsk+simix"
    positives = ranked_b // (real_b // per_class) - 1
    alphas_gen = torch.Generator().manual_seed(seed + 1)
    base = {"case": case, "B": ranked_b, "real_B": real_b, "positives": positives, "dim": dim,
            "threads": torch.get_num_threads(), "device": str(dev)}

    def naive_from_sim(sim: torch.Tensor) -> torch.Tensor:
        lab = labels
        if with_simix:
            sim, lab = simix(sim, labels, generator=alphas_gen)
        return naive_rsk_loss(sim, lab)

    def module(backend: str, memory: str) -> RecallAtKSurrogate:
        return RecallAtKSurrogate(ks=KS, simix=with_simix, backend=backend, memory=memory)

    # name -> (from the similarity or None, from the embeddings)
    steps: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor] | None, Callable[[torch.Tensor], torch.Tensor]]]
    steps = {}
    for name in methods:
        if name == "naive":
            steps[name] = (naive_from_sim, lambda e: naive_from_sim(e @ e.T))
        else:
            loss_fn = module(name.split("-")[0], "recompute" if name.endswith("recompute") else "matrix")
            from_sim = None if name.endswith("recompute") else (lambda s, f=loss_fn: f.from_similarity(s, labels))
            steps[name] = (from_sim, lambda e, f=loss_fn: f(e, labels))
    rows = []
    sim0 = (emb0 @ emb0.T).detach()
    for name, (from_sim, from_emb) in steps.items():
        row = {**base, "method": METHODS[name], "loss_ms": None, "loss_min_ms": None, "loss_peak_mib": None,
               "e2e_ms": None, "e2e_min_ms": None, "e2e_peak_mib": None, "memory": "", "note": ""}
        need = _naive_bytes(ranked_b, positives)
        if name == "naive" and need > naive_max_gib * 2**30:
            rows.append({**row, "note": f"naive skipped: needs about {need / 2**30:.0f} GiB "
                                        f"(> {naive_max_gib} GiB allowed)"})
            continue

        def loss_step(from_sim=from_sim) -> None:
            s = sim0.clone().requires_grad_()
            from_sim(s).backward()

        def e2e_step(from_emb=from_emb) -> None:
            e = emb0.clone().requires_grad_()
            from_emb(e).backward()

        if from_sim is not None:
            loss_ms, loss_min, loss_peak, _ = _time_step(loss_step, dev, repeats)
            row.update(loss_ms=round(loss_ms, 2), loss_min_ms=round(loss_min, 2), loss_peak_mib=_mib(loss_peak))
        e2e_ms, e2e_min, e2e_peak, how = _time_step(e2e_step, dev, repeats)
        row.update(e2e_ms=round(e2e_ms, 2), e2e_min_ms=round(e2e_min, 2), e2e_peak_mib=_mib(e2e_peak), memory=how)
        rows.append(row)
    # The skipped naive row goes last, as in earlier reports.
    return sorted(rows, key=lambda r: r["e2e_ms"] is None)


def _mib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table of :func:`run_loss_benchmark` rows, with naive/ours ratios of the medians ("-": not run)."""
    lines = [
        "| case | B ranked (real) | \\|P\\| | method | loss ms: median (min) | loss peak MiB "
        "| end-to-end ms: median (min) | e2e peak MiB | speed-up loss / e2e |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    naive = {(r["case"], r["B"]): r for r in rows if r["method"] == METHODS["naive"] and r["e2e_ms"] is not None}

    def ms(median: float | None, minimum: float | None) -> str:
        return "-" if median is None else f"{median:.1f} ({minimum:.1f})"

    def peak(x: float | None, ran: bool) -> str:
        return "-" if not ran else ("n/a" if x is None else f"{x:.0f}")

    def ratio(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None else f"{a / b:.1f}x"

    for r in rows:
        head = f"| {r['case']} | {r['B']} ({r['real_B']}) | {r['positives']} | {r['method']} | "
        if r["e2e_ms"] is None:
            lines.append(head + f"- | - | - | - | {r['note']} |")
            continue
        speed = ""
        base = naive.get((r["case"], r["B"]))
        if base is not None and r["method"] != METHODS["naive"]:
            speed = f"{ratio(base['loss_ms'], r['loss_ms'])} / {ratio(base['e2e_ms'], r['e2e_ms'])}"
        loss_peak = peak(r["loss_peak_mib"], r["loss_ms"] is not None)
        lines.append(head + f"{ms(r['loss_ms'], r['loss_min_ms'])} | {loss_peak} | "
                     f"{ms(r['e2e_ms'], r['e2e_min_ms'])} | {peak(r['e2e_peak_mib'], True)} | {speed} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``bench.py loss`` (numbers checked: a bad value is a one-line usage error, exit 2;
    ``--help`` shows each default). Sizes are checked against ``--per-class`` by :func:`parse_args`."""
    parser = argparse.ArgumentParser(prog=prog("loss"), description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--sizes", type=positive_int, nargs="*", default=[1000, 2000, 4000],
                        help="batch sizes B, each at least --per-class")
    parser.add_argument("--simix-size", type=positive_int, nargs="*", default=[],
                        help="augmented sizes of SiMix cases, each at least P + P(P-1)/2 for P = --per-class")
    parser.add_argument("--per-class", type=positive_int, default=4, help="items per class, at least 2")
    parser.add_argument("--dim", type=positive_int, default=512, help="embedding dimension")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed repeats after one warm-up")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS),
                        help="what to run (default: all that can run on the device; triton ones need CUDA)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive (B, |P|, B) version")
    parser.add_argument("--naive-max-gib", type=positive_float, default=6.0, help="skip naive above this estimate")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check ``bench.py loss`` arguments; a bad value exits 2 with one line saying what to pass."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.per_class < 2:
        parser.error("--per-class must be at least 2 (a query needs a positive)")
    small = [b for b in args.sizes if b < args.per_class]
    if small:
        parser.error(f"--sizes {' '.join(map(str, small))}: each batch size must be at least --per-class "
                     f"({args.per_class}), or the batch holds no whole class")
    least = args.per_class + args.per_class * (args.per_class - 1) // 2
    small = [s for s in args.simix_size if s < least]
    if small:
        parser.error(f"--simix-size {' '.join(map(str, small))}: each size must be at least {least} (one class of "
                     f"{args.per_class} items and its {least - args.per_class} mixed pairs)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python benchmarks/bench.py loss``. Prints a markdown table."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = run_loss_benchmark(
        args.sizes, args.per_class, args.dim, args.device, include_naive=not args.no_naive,
        simix_sizes=args.simix_size, repeats=args.repeats, naive_max_gib=args.naive_max_gib, methods=args.methods,
    )
    dev = torch.device(args.device)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"RS@k forward+backward, float32, d={args.dim}, {args.per_class} per class, {where}, "
          f"torch {torch.__version__}; memory: {rows[0]['memory'] if rows else ''}")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0

