"""README.md's Python examples run as pasted.

Each ```python block of the README is run unchanged in a fresh interpreter, in an empty temporary working directory
prepared with exactly what the README says exists before it: nothing for the "Python API" example; for the "Use
the model" example, what follows `make demo` (a trained run in ``runs/demo/``, here a tiny one made by the real
``recallk train`` on the demo's config) and the README's own shell lines that come before it (``recallk embed``,
``recallk index``), plus the query images it names (``one.png``, ``queries/``). A block under a heading that has no
preparation here fails the test: a new example needs one. The kanji data needs the Debian fonts of ``make setup``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from tests.helpers.runs import tiny_overrides

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # the venv's bin/: python and the `recallk` entry point

# `make demo`'s run, shrunk: the demo's config with fewer classes, one epoch, a smaller batch and no report extras.
# the demo's config, shrunk (the README's command names the config file itself)
TINY_DEMO = tiny_overrides("kanji", "train.batch_size=32", "train.chunk_size=32",
                           drop=("-c", "train.max_steps_per_epoch", "train.tensorboard"))


def fenced_blocks(text: str, language: str) -> list[tuple[str, str]]:
    """``(heading, code)`` of every fenced block of ``language`` in Markdown ``text``, in order; ``heading`` is
    the text of the last ``#`` heading above the block ('' before the first)."""
    blocks, heading = [], ""
    for match in re.finditer(r"^(#{1,6}) ([^\n]*)$|^```(\w*)\n(.*?)^```$", text, re.M | re.S):
        if match.group(1):
            heading = match.group(2).strip()
        elif match.group(3) == language:
            blocks.append((heading, match.group(4)))
    return blocks


def _env(cwd: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": "",
            "OMP_NUM_THREADS": "1", "PWD": str(cwd)}


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=timeout,
                            check=False)
    assert result.returncode == 0, f"{args[:3]} failed (exit {result.returncode}):\n{result.stdout[-3000:]}" \
                                   f"\n{result.stderr[-3000:]}"
    return result


def _prepare_nothing(cwd: Path, readme: str) -> None:
    """The "Python API" example needs nothing but recallk and the kanji fonts."""


def _prepare_after_demo(cwd: Path, readme: str) -> None:
    """A trained ``runs/demo/`` (what `make demo` leaves, shrunk), then the README's shell lines of the same
    section that the Python example relies on (``C=...``, ``recallk embed``, ``recallk index``), then the query
    images it names."""
    _run([str(BIN / "recallk"), "train", "-c", str(ROOT / "configs" / "kanji.yaml"), "--name", "demo",
          "--overwrite", "--no-progress", *TINY_DEMO], cwd)
    shell = [code for heading, code in fenced_blocks(readme, "bash") if heading == "Use the model"]
    assert shell, "README: the 'Use the model' section lost its shell block"
    lines = [line for line in shell[0].splitlines() if line.startswith(("C=", "recallk embed", "recallk index"))]
    assert len(lines) == 3, f"README: expected C=..., recallk embed and recallk index lines, got {lines}"
    _run(["bash", "-euc", "\n".join(lines)], cwd)
    (cwd / "queries").mkdir()
    for path, text in ((cwd / "one.png", "A"), (cwd / "queries" / "a.png", "B"), (cwd / "queries" / "b.png", "C")):
        image = Image.new("RGB", (40, 40), "white")
        ImageDraw.Draw(image).text((12, 12), text, fill="black")
        image.save(path)


PREPARE: dict[str, Callable[[Path, str], None]] = {
    "Python API": _prepare_nothing,
    "Use the model": _prepare_after_demo,
}
# What each example prints last (a sign that it ran to its end and printed what the README says).
EXPECT = {"Python API": "'recall@1'", "Use the model": "one.png ["}


def test_readme_python_blocks_are_found_and_each_has_a_preparation():
    blocks = fenced_blocks(README.read_text(), "python")
    assert blocks, "README.md has no ```python block"
    unknown = [heading for heading, _ in blocks if heading not in PREPARE]
    assert not unknown, f"README python block(s) under {unknown}: add a preparation in tests/test_readme.py"


def test_fenced_blocks_keep_headings_and_languages():
    text = "# A\n```python\nx = 1\n```\n## B\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert fenced_blocks(text, "python") == [("A", "x = 1\n"), ("B", "y = 2\n")]
    assert fenced_blocks(text, "bash") == [("B", "ls\n")]


@pytest.mark.parametrize("heading", list(PREPARE))
def test_readme_python_example_runs_as_pasted(heading, tmp_path):
    readme = README.read_text()
    codes = [code for h, code in fenced_blocks(readme, "python") if h == heading]
    assert codes, f"README: no python block under the heading {heading!r}"
    for i, code in enumerate(codes):
        cwd = tmp_path / f"block{i}"
        cwd.mkdir()
        PREPARE[heading](cwd, readme)
        (cwd / "example.py").write_text(code)
        result = _run([sys.executable, "example.py"], cwd)
        assert EXPECT[heading] in result.stdout, result.stdout[-2000:]
