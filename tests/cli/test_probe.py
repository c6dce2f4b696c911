"""``hpi probe`` on this machine (CPU-only in CI: it must still write a profile the planner loads), and its
bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpi.cli import main
from hpi.planner.profiles import load_profile

SRC = Path(__file__).resolve().parents[2] / "src"


def test_real_probe_quick_writes_a_profile_the_planner_loads(tmp_path):
    out = tmp_path / "profiles" / "here.yaml"
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "hpi.cli", "probe", "--quick", "--json", "--out", str(out),
                           "--nvme-path", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["quick"] and doc["host"]["cpu_cores"] >= 1
    assert json.loads((out.parent / "here.probe.json").read_text())["date"] == doc["date"]
    profile = load_profile(str(out))
    assert profile.name == "here" and profile.gpus_per_node == len(doc["gpus"])
    assert profile.provenance["host.dram_bytes"].source == "probed"
    if profile.gpus_per_node == 0:  # this CPU-only machine: planning says so in one line, exit 2
        plan = subprocess.run([sys.executable, "-m", "hpi.cli", "plan", "--model", "llama-3-8b",
                               "--hardware", str(out)], capture_output=True, text=True, env=env)
        assert plan.returncode == 2 and "no GPU" in plan.stderr and len(plan.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["--out", "x.txt"], "must end in .yaml"),
    (["--out", "a/b.yaml", "--name", "c"], "file name"),
    (["--name", "bad name!"], "letters, digits"),
    (["--nvme-path", "/no/such/dir"], "no such directory"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    assert main(["probe", "--quick", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
