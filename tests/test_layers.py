"""The import layering of docs/architecture.md: every module imports only from its own layer or lower ones, and
each module imports on its own (no cycles). The slow references of ``recallk.testing`` import nothing of
recallk: they must stay independent of the code they check."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "recallk"

#: Lowest first; a module may import from its own layer and the ones before it.
LAYERS = [
    {"recallk", "recallk.utils", "recallk.checks", "recallk.testing", "recallk.provenance", "recallk.run_folder"},
    {"recallk.data"},
    {"recallk.models"},
    {"recallk.kernels"},
    {"recallk.losses"},
    {"recallk.engine"},
    {"recallk.evaluation"},
    {"recallk.report"},
    {"recallk.retrieval"},
    {"recallk.config"},
    {"recallk.cli", "recallk.__main__"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    """The layer of ``module``: that of its longest listed prefix."""
    best, layer = -1, -1
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, layer = len(name), index
    assert layer >= 0, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return layer


def _imports(path: Path) -> set[str]:
    """Absolute names of the recallk modules ``path`` imports (relative imports resolved), anywhere in it."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "recallk" or name.startswith("recallk.")}


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_only_from_own_or_lower_layers(path: Path) -> None:
    module = _module_name(path)
    mine = _layer(module)
    above = sorted(name for name in _imports(path) if _layer(name) > mine)
    assert not above, f"{module} (layer {mine}) imports from higher layers: {above}"


def test_references_are_independent() -> None:
    for path in sorted((PACKAGE / "testing").rglob("*.py")):
        assert not _imports(path), f"{_module_name(path)} imports recallk code: {sorted(_imports(path))}"


def test_every_module_imports_alone() -> None:
    names = [_module_name(p) for p in MODULES if p.name != "__main__.py"]
    code = (
        "import importlib, sys\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    for key in [k for k in sys.modules if k == 'recallk' or k.startswith('recallk.')]:\n"
        "        del sys.modules[key]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        failed.append(f'{name}: {type(err).__name__}: {err}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=600,
                            env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_run_config_is_read_from_records_not_rebuilt() -> None:
    """``engine/run_config.py`` writes a run's config from what the dataset, model and loss record of themselves
    (``data_spec``, ``model_section``, ``loss_spec``): it imports nothing of data, models, losses or cli (issue 23)."""
    builders = ("recallk.data", "recallk.models", "recallk.losses", "recallk.cli")
    found = sorted(n for n in _imports(PACKAGE / "engine" / "run_config.py") if n.startswith(builders))
    assert not found, f"engine/run_config.py imports {found}"
