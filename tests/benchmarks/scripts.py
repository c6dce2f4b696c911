"""The benchmark scripts under ``benchmarks/`` (not a package) loaded as modules, for their tests."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module named ``<name>``, registered in ``sys.modules`` (dataclasses need it),
    with ``benchmarks/`` on ``sys.path`` as when Python runs the script (a script imports its sibling modules)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_triton_script(name: str, *args: str, interpret: bool = True) -> subprocess.CompletedProcess:
    """``python benchmarks/<name>.py ARGS`` in its own process with ``src`` importable as ``hpi``, and with Triton's
    interpreter on (``TRITON_INTERPRET=1``, read when Triton decorates a kernel) unless ``interpret`` is False."""
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent / "src")}
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), *args], capture_output=True, text=True,
                          timeout=600, env=env)
