"""benchmarks/bad_inputs.py: its classes, and a few cases of the table run as subprocesses of this hpi."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bad_inputs.py"


def _driver():
    spec = importlib.util.spec_from_file_location("bad_inputs_driver", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_classes_first_match_wins():
    classify = _driver().classify
    assert classify(2, "", "hpi plan: argument --tp: 0 must be >= 1\n", written=False) == "one_line"
    assert classify(2, "", "hpi plan: error\n", written=True) == "unclear"  # a refusal that wrote files
    assert classify(2, "", "usage: hpi ...\nhpi: error: ...\n", written=False) == "unclear"
    trace = "Traceback (most recent call last):\n  ...\nZeroDivisionError\n"
    assert classify(1, "", trace, written=False) == "traceback"
    assert classify(0, "table", "", written=True) == "accepted"
    assert classify(None, "", "", written=True) == "accepted"  # still running at the timeout
    assert classify(1, "", "hpi run: failed\n", written=False) == "unclear"


def test_a_few_cases_against_this_hpi(tmp_path):
    hpi = Path(sys.executable).parent / "hpi"
    if not hpi.is_file():
        pytest.skip("no hpi console script beside this interpreter")
    out = tmp_path / "after.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--hpi", str(hpi), "-k", "--tp 0", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    doc = json.loads(out.read_text())
    assert summary["n_cases"] == len(doc["cases"]) >= 5  # plan, predict, explain, run, check, autotune
    assert summary["counts"]["one_line"] == summary["n_cases"]
    assert {c["argv"][0] for c in doc["cases"]} >= {"plan", "predict", "explain", "run", "check", "autotune"}
