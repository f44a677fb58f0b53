"""benchmarks/study.py: the grid, the commands it runs and the aggregation of finished runs (no training)."""

from __future__ import annotations

import importlib.util
import json
import shlex
import statistics
import sys
from pathlib import Path

import pytest

from recallk.config import load_config

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("study", ROOT / "benchmarks" / "study.py")
study = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("study", study)  # dataclasses look their module up in sys.modules
_spec.loader.exec_module(study)


def _write_run(run_dir: Path, finals: dict[int, dict[str, float]]) -> None:
    run_dir.mkdir(parents=True)
    lines = [{"kind": "train", "epoch": 1, "step": 1, "time": 0.0, "loss": 0.5}]
    lines += [{"kind": "eval", "epoch": e, "step": 1, "time": 0.0, "split": "test", **m} for e, m in finals.items()]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_every_cell_resolves_to_a_valid_config_that_differs_only_in_its_overrides():
    for cell, _ in study.unique_runs(study.GROUPS, [1]):
        base = load_config(ROOT / cell.config)
        config = load_config(ROOT / cell.config, cell.overrides)
        changed = {(section, key) for section, values in config.items() if isinstance(values, dict)
                   for key in values if values[key] != base[section].get(key)}
        named = {tuple(o.split("=")[0].split(".")[:2]) for o in cell.overrides}
        if ("loss", "name") in named:  # another loss: its section holds that loss's own arguments
            changed = {(section, key) for section, key in changed if section != "loss"}
        assert changed <= named, (cell.name, changed - named)


def test_baseline_options_are_accepted_by_pytorch_metric_learning():
    import numpy as np

    from recallk.cli.wiring import criterion_from_config

    for cell in (*study.GROUPS[0].cells, *study.L0_B256):
        config = load_config(ROOT / cell.config, cell.overrides)
        criterion = criterion_from_config(config, np.arange(8))
        assert criterion is not None


def test_grid_is_seed_major_without_duplicates_and_group_filter_works():
    runs = study.unique_runs(study.GROUPS, [1, 2, 3])
    names = [study.run_name(c, s) for c, s in runs]
    assert len(names) == len(set(names))
    cells: dict[str, set[int]] = {}
    for g in study.GROUPS:
        for c in g.cells:
            cells.setdefault(c.name, set()).update(g.run_seeds([1, 2, 3]))
    assert sorted(names) == sorted(f"{c}-s{s}" for c, ss in cells.items() for s in ss)
    seeds = [s for _, s in runs]
    assert seeds == sorted(seeds)
    # A cell shared by a 3-seed group and the 1-seed probes runs at the 3 seeds; one only in the probes at 1.
    assert {s for c, s in runs if c.name == "l0_rsk_simix_b640"} == {1, 2, 3}
    assert {s for c, s in runs if c.name == "l0_rsk_simix_lr3e-3"} == {1}
    assert study.train_args(study.L0_B640[0], 1)[:3] == ["train", "-c", study.LITE0_CONFIG]
    only = study.select_groups(["batch"])
    assert [g.name for g in only] == ["batch"]
    assert [c.overrides for c, _ in study.unique_runs(only, [7])] == [("train.batch_size=64",), (),
                                                                     ("train.batch_size=1024",)]
    with pytest.raises(ValueError, match="unknown group"):
        study.select_groups(["nope"])


def test_shell_command_round_trips_to_the_train_arguments():
    cell = study.Cell("x", "X", ("loss.name=contrastive", "loss={pos_margin: 0.0, neg_margin: 1.0}"))
    text = study.shell_command(cell, 2)
    assert text.startswith("OMP_NUM_THREADS=1 recallk ")
    assert shlex.split(text)[2:] == study.train_args(cell, 2)
    assert "seed=$SEED" in study.shell_command(cell)


def test_finished_runs_are_detected_and_aggregated_with_sample_std(tmp_path):
    cell = study.Cell("c", "C")
    values = {1: 0.30, 2: 0.36, 3: 0.27}
    for seed, v in values.items():
        _write_run(tmp_path / f"c-s{seed}", {0: {"map@r": 0.1, "recall@1": 0.2}, 3: {"map@r": v, "recall@1": v + 0.1}})
    _write_run(tmp_path / "c-s4", {0: {"map@r": 0.1, "recall@1": 0.2}})  # interrupted after the first eval
    assert study.final_eval(tmp_path / "c-s4", 3) is None
    assert study.final_eval(tmp_path / "c-s1", 3)["map@r"] == 0.30
    agg = study.aggregate(cell, [1, 2, 3, 4], tmp_path, epochs=3, metrics=("map@r", "recall@1"))
    expected = [100 * v for v in values.values()]
    assert agg["n"] == 3
    assert agg["stats"]["map@r"][0] == pytest.approx(statistics.mean(expected))
    assert agg["stats"]["map@r"][1] == pytest.approx(statistics.stdev(expected))
    assert agg["before"]["map@r"] == pytest.approx(10.0)
    table = study.format_table([("C", agg)], metrics=("map@r", "recall@1"), before=agg["before"])
    assert f"{statistics.mean(expected):.2f} ± {statistics.stdev(expected):.2f}" in table
    assert "untrained" in table


def test_torn_last_line_is_ignored(tmp_path):
    _write_run(tmp_path / "r", {0: {"map@r": 0.1}})
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "eval", "epoch": 3, "map')
    assert study.final_eval(tmp_path / "r", 3) is None
    assert study.initial_eval(tmp_path / "r")["map@r"] == 0.1


def test_welch_verdicts():
    a = {"values": {"map@r": [30.0, 31.0, 29.0]}}
    b = {"values": {"map@r": [20.0, 21.0, 19.0]}}
    c = {"values": {"map@r": [29.0, 33.0, 27.0]}}
    diff, t = study.compare(a, b)
    assert diff == pytest.approx(10.0)
    assert t == pytest.approx(10.0 / (2 / 3) ** 0.5)
    assert "better" in study.verdict((diff, t), "a", "b")
    assert "worse" in study.verdict(study.compare(b, a), "b", "a")
    assert "no clear difference" in study.verdict(study.compare(a, c), "a", "c")
    assert study.compare(a, {"values": {"map@r": [1.0]}}) is None


def test_discussion_survives_a_rewrite(tmp_path):
    path = tmp_path / "results.md"
    path.write_text(f"# old\n{study.DISCUSSION_BEGIN}\nhand-written\ntext\n{study.DISCUSSION_END}\n")
    assert study.read_discussion(path) == "hand-written\ntext"
    assert study.read_discussion(tmp_path / "missing.md") == ""
    rewritten = tmp_path / "new.md"
    rewritten.write_text(study.render_results(study.GROUPS, {}, [1, 2, 3], "hand-written\ntext", None))
    assert study.read_discussion(rewritten) == "hand-written\ntext"
    assert "configs/study/kanji.yaml" in rewritten.read_text()


def test_demo_recipe_section_survives_a_rewrite(tmp_path):
    path = tmp_path / "results.md"
    path.write_text(f"# old\n{study.DEMO_BEGIN}\n## Demo recipe\nruns\n{study.DEMO_END}\n")
    demo = study.read_discussion(path, study.DEMO_BEGIN, study.DEMO_END)
    assert demo == "## Demo recipe\nruns" and study.read_discussion(path) == ""
    text = study.render_results(study.GROUPS, {}, [1, 2, 3], "", None, demo)
    assert text.index(study.DISCUSSION_END) < text.index("## Demo recipe\nruns")
    rewritten = tmp_path / "new.md"
    rewritten.write_text(text)
    assert study.read_discussion(rewritten, study.DEMO_BEGIN, study.DEMO_END) == demo
    assert study.DEMO_BEGIN not in study.render_results(study.GROUPS, {}, [1, 2, 3], "", None)


def _finished_runs(runs_dir: Path, cells: dict[str, float], seeds=(1, 2)) -> None:
    """Finished runs of ``cells`` ({cell name: MAP@R of seed 1, as a fraction}) at ``seeds``, 3 epochs each."""
    for name, value in cells.items():
        for seed in seeds:
            v = value + 0.01 * seed
            _write_run(runs_dir / f"{name}-s{seed}", {0: {m: 0.05 for m in study.METRICS},
                                                      3: {m: v for m in study.METRICS}})


def test_regenerating_one_group_keeps_every_other_group_and_the_hand_written_sections(tmp_path):
    results = tmp_path / "results.md"
    old = {g.name: f"## {g.title}\n\nold table of {g.name}\n\nVerdicts:\n\n- old verdict of {g.name}"
           for g in study.GROUPS}
    results.write_text(study.render_results(study.GROUPS, {}, [1, 2], "the discussion", None, "## Demo recipe",
                                            kept=old))
    assert study.read_group_sections(results) == old
    # Runs of the batch group only; rsk is shared with the losses and include_query groups, which stay incomplete.
    runs = tmp_path / "runs"
    _finished_runs(runs, {"rsk_b64": 0.40, "rsk": 0.30, "rsk_b1024": 0.15})
    assert study.main(["--aggregate-only", "--only", "batch", "--seeds", "1", "2", "--runs-dir", str(runs),
                       "--results", str(results)]) == 0
    sections = study.read_group_sections(results)
    assert list(sections) == [g.name for g in study.GROUPS]
    for name in ("losses", "batch_steps", "simix_few", "include_query"):
        assert sections[name] == old[name], name
    batch = sections["batch"]
    assert "old table" not in batch
    assert "| RS@k, batch 64 | 2 | 41.50 ± 0.71 |" in batch  # mean of 41 and 42 %, sample std of the two
    assert "batch 1024 (3 epochs) is worse than batch 256 (3 epochs) on map@r (-15.00 points" in batch
    assert study.read_discussion(results) == "the discussion"
    assert study.read_discussion(results, study.DEMO_BEGIN, study.DEMO_END) == "## Demo recipe"
    assert not list(tmp_path.glob("*.tmp"))


def test_a_group_complete_on_disk_is_rewritten_and_one_without_runs_or_section_says_what_is_missing(tmp_path):
    results = tmp_path / "results.md"
    runs = tmp_path / "runs"
    _finished_runs(runs, {"rsk": 0.30, "rsk_iq": 0.31})  # include_query complete, though not the group asked for
    _finished_runs(runs, {"rsk_b64": 0.40}, seeds=(1,))   # batch: one cell at one seed of two
    assert study.main(["--aggregate-only", "--only", "batch", "--seeds", "1", "2", "--runs-dir", str(runs),
                       "--results", str(results)]) == 0
    sections = study.read_group_sections(results)
    assert "| RS@k, include_query=True (authors' code) | 2 | 32.50 ± 0.71 |" in sections["include_query"]
    assert "| RS@k, batch 64 | 1 | 41.00 |" in sections["batch"]
    assert "rsk_b64-s2, rsk-s1" not in sections["batch"] and "rsk_b64-s2, rsk_b1024-s1" in sections["batch"]
    assert "--only simix_few" in sections["simix_few"]


def test_a_group_with_its_own_seeds_is_complete_at_them_and_shows_its_zero_shot_floor(tmp_path):
    cell = study.Cell("a", "A", (), study.LITE0_CONFIG)
    group = study.Group("g", "G", "claim", (cell,), seeds=(1, 2), zero_shot=True)
    runs = tmp_path / "runs"
    _finished_runs(runs, {"a": 0.30}, seeds=(1,))
    agg = {"a": study.aggregate(cell, [1, 2, 3], runs, 3)}
    assert not study.group_complete(group, agg, [1, 2, 3])
    text = study.render_group(group, agg, [1, 2, 3], zero_shot={m: 0.2 for m in study.METRICS})
    assert "| pretrained, zero-shot (own embedding, no head) | | 20.00 | 20.00 |" in text
    assert "| before training (pretrained + random head, epoch 0) | | 5.00 |" in text
    assert "a-s2" in text and "a-s3" not in text  # missing: seed 2 of the group's seeds, not the study's seed 3
    _finished_runs(runs, {"a": 0.30}, seeds=(2,))
    agg = {"a": study.aggregate(cell, [1, 2, 3], runs, 3)}
    assert study.group_complete(group, agg, [1, 2, 3])
    assert "Not finished" not in study.render_group(group, agg, [1, 2, 3])


def test_pretrained_start_findings_come_before_their_groups_and_survive_a_rewrite(tmp_path):
    results = tmp_path / "results.md"
    text = study.render_results(study.GROUPS, {}, [1, 2, 3], "", None, findings="## Pretrained start\n\nwhy")
    assert text.index(study.FINDINGS_BEGIN) < text.index(study.GROUP_BEGIN.format("lite0_b256"))
    assert text.index(study.GROUP_END.format("include_query")) < text.index(study.FINDINGS_BEGIN)
    results.write_text(text)
    assert study.main(["--aggregate-only", "--only", "batch", "--runs-dir", str(tmp_path / "runs"),
                       "--results", str(results)]) == 0
    assert study.read_discussion(results, study.FINDINGS_BEGIN, study.FINDINGS_END) == "## Pretrained start\n\nwhy"
