"""One import name, and data flowing one way between the parts.

- The installed distribution exposes ``hpi`` and nothing else at the top level (``planner``, ``executor``
  and ``autotune`` are taken on PyPI).
- Every package folder under src/ is listed in pyproject (package-dir maps src/ to hpi).
- Imports go one way: the planner imports no other part (nor torch, DeepSpeed or transformers); the executor
  imports neither the CLI nor autotune; autotune does not import the CLI. Checked on the source of every
  module, function-level imports included, so a lazy import cannot hide a wrong direction.
"""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
DIST = "hybrid-parallel-inference"

# part -> what it must never import (prefixes of module names)
FORBIDDEN = {
    "planner": ("hpi.executor", "hpi.autotune", "hpi.cli", "hpi.deployment", "hpi.serve", "hpi.evaluation",
                "torch", "deepspeed", "transformers", "optuna"),
    "executor": ("hpi.cli", "hpi.autotune", "hpi.serve", "hpi.evaluation"),
    "autotune": ("hpi.cli", "hpi.serve", "hpi.evaluation"),
}


def test_the_distribution_exposes_only_hpi():
    names = sorted(name for name, dists in importlib.metadata.packages_distributions().items() if DIST in dists)
    assert names == ["hpi"]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {"hpi": "src"}
    folders = {"hpi" + "".join(f".{part}" for part in init.parent.relative_to(SRC).parts)
               for init in SRC.rglob("__init__.py") if "egg-info" not in str(init)}
    assert set(config["packages"]) == folders


def _imports(path: Path) -> set[str]:
    """Absolute module names a source file imports, anywhere in it."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_imports_flow_one_way(part):
    wrong = {}
    for path in sorted((SRC / part).rglob("*.py")):
        bad = sorted(m for m in _imports(path) if any(m == f or m.startswith(f + ".") for f in FORBIDDEN[part]))
        if bad:
            wrong[str(path.relative_to(REPO))] = bad
    assert not wrong, f"{part} imports what it must not: {wrong}"


def test_the_walk_sees_function_level_imports(tmp_path):
    probe = tmp_path / "m.py"
    probe.write_text("def f():\n    from hpi.executor.launch import launch\n    import torch\n")
    assert {"hpi.executor.launch", "torch"} <= _imports(probe)


def test_version_flag_prints_the_installed_version():
    proc = subprocess.run([sys.executable, "-m", "hpi.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"hpi {importlib.metadata.version(DIST)}"
