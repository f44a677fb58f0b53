"""docs/method.md stays the document the tree cites: every "method.md section N" (also "sections N-M", "sections N
and M", "method.md §N") in src/, configs/, docs/ and README.md names a numbered section heading of it, each cited
section states what its citers rely on, and the authors' settings of its section 4 are those of the presets that
cite it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
CITATION = re.compile(r"method\.md,?\s+(?:sections?\s+|§\s*)(\d+(?:\s*(?:-|,|and)\s*\d+)*)")


def cited_places() -> list[tuple[str, int, str]]:
    """(file relative to the root, line, cited section number as text) of every citation of a method.md section."""
    files = [ROOT / "README.md"]
    for folder, pattern in (("src", "*.py"), ("configs", "*.yaml"), ("docs", "*.md")):
        files += sorted((ROOT / folder).rglob(pattern))
    found = []
    for path in files:
        if path == METHOD:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in CITATION.finditer(line):
                for a, dash, b in re.findall(r"(\d+)(?:\s*(-)\s*(\d+))?", match.group(1)):
                    sections = range(int(a), int(b) + 1) if dash else [int(a)]
                    found += [(str(path.relative_to(ROOT)), number, str(s)) for s in sections]
    return found


def sections() -> dict[str, str]:
    """Section number -> its text (heading line included), from the ``## N. Title`` headings of method.md."""
    parts = re.split(r"^(?=## )", METHOD.read_text(encoding="utf-8"), flags=re.M)
    numbered = {}
    for part in parts:
        heading = re.match(r"## (\d+)\. \S", part)
        if heading:
            numbered[heading.group(1)] = part
    return numbered


def test_the_citation_pattern_reads_every_form_the_tree_uses():
    line = "see method.md section 4, method.md sections 1-2, method.md sections 4 and 5 and method.md §3"
    assert [m.group(1) for m in CITATION.finditer(line)] == ["4", "1-2", "4 and 5", "3"]
    assert not CITATION.search('Musgrave et al., ECCV 2020, section 4 ("method.md" is not cited here)')


def test_every_citation_names_a_section_of_method_md():
    numbered = sections()
    assert list(numbered) == [str(n) for n in range(1, len(numbered) + 1)], "sections must be numbered 1, 2, ..."
    places = cited_places()
    # The tree cites the document about 35 times (every preset header among them): an empty scan is a broken scan.
    assert len(places) >= 30 and sum(f.startswith("configs/") for f, _, _ in places) >= 15
    missing = [f"{f}:{line} cites section {s}" for f, line, s in places if s not in numbered]
    assert not missing, f"docs/method.md has no such section: {missing}"


#: What the places citing each section rely on, as words the section must contain.
RELIED_ON = {
    "1": ["tau_rank", "tau_k", "include_query", "clamped to [-50, 50]", "min(k, |P(q)|)", "K = {1, 2, 4, 8, 16}"],
    "2": ["alpha", "M S M^T", "max_pairs_per_class", "not re-normalised"],
    "3": ["Pass 1", "Pass 2", "G = dL/dE", "BatchNorm frozen", "replayed", "augmented once"],
    "4": ["GeM", "RandomResizedCrop", "round(image_size * 256 / 224)", "B / 4 different classes", "MultiStepLR",
          "weight\ndecay 4e-4", "seed 1"],
    "5": ["leave-one-out", "recall@k", "positive_recall@k", "map@r", "r_precision", "DatasetSpec.eval_ks",
          "never seen in training", "Musgrave"],
    "6": ["all-gathered", "summed", "averaged", "rank 0"],
    "7": ["arXiv 2108.11179", "arXiv 2003.08505"],
}


@pytest.mark.parametrize("number", sorted(RELIED_ON))
def test_each_section_states_what_its_citers_rely_on(number):
    text = " ".join(sections()[number].split())  # one line, single spaces
    missing = [w for w in RELIED_ON[number] if " ".join(w.split()) not in text]
    assert not missing, f"method.md section {number} lacks {missing}"


DATASET_PRESET = {"iNaturalist 2018": "inaturalist", "Stanford Online Products": "sop", "PKU VehicleID": "vehicleid",
                  "Cars196": "cars196", "CUB-200-2011": "cub"}
MODEL_KIND = {"resnet50": ("R50", 0), "vit_b32": ("ViT", 1), "vit_b16": ("ViT", 2)}


def _for_model(cell: str, kind: str) -> str:
    """The part of a table cell that applies to ``kind`` ("R50" or "ViT"): cells like "R50: 40, 70; ViT: 10, 40"."""
    parts = dict(p.strip().split(":", 1) for p in cell.split(";")) if ":" in cell else {kind: cell}
    return parts[kind].strip()


def _numbers(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", text)]


def test_the_settings_table_is_that_of_the_presets_citing_it():
    table = [line for line in sections()["4"].splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(table) == len(DATASET_PRESET)
    checked = 0
    for row in table:
        dataset, batch, epochs, milestones, lrs, eval_ks = [c.strip() for c in row.strip("|").split("|")]
        for suffix, (kind, lr_column) in MODEL_KIND.items():
            path = ROOT / "configs" / f"{DATASET_PRESET[dataset]}_{suffix}.yaml"
            assert "method.md section 4" in path.read_text().splitlines()[0]
            config = yaml.safe_load(path.read_text())
            train = config["train"]
            b, chunk = _numbers(batch.split("(")[0])
            if suffix == "vit_b16" and "(" in batch:
                chunk = _numbers(batch.split("(")[1])[0]
            assert (train["batch_size"], train["chunk_size"]) == (b, chunk), path.name
            assert [train["epochs"]] == _numbers(_for_model(epochs, kind)), path.name
            assert train["milestones"] == _numbers(_for_model(milestones, kind)), path.name
            assert float(train["lr"]) == _numbers(lrs)[lr_column], path.name
            assert config["eval"]["ks"] == _numbers(eval_ks), path.name
            assert train["optimizer"] == ("adam" if kind == "R50" else "adamw"), path.name
            assert (train["weight_decay"], train["gamma"], config["seed"]) == (4e-4, 0.3, 1), path.name
            assert config["model"]["freeze_bn"] and config["loss"]["simix"], path.name
            checked += 1
    assert checked == 15
