"""benchmarks/gpu_matrix.py end to end on the CPU: the smoke matrix, variants unpacked into the bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[2]


def test_smoke_matrix_on_cpu_bundles_every_record(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_matrix.py"), "--matrix", "smoke", "--device", "cpu",
         "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--prompt-len", "8", "--gen-len", "3"],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["errors"] == 0
    bundle = json.loads((tmp_path / "out" / "records.json").read_text())
    assert sorted(bundle) == ["tiny-cpu-offload", "tiny-cpu-offload@b4", "tiny-resident"]
    assert bundle["tiny-cpu-offload@b4"]["plan"]["batch_size"] == 4
    assert bundle["tiny-cpu-offload"]["plan"]["batch_size"] == 2
    for doc in bundle.values():
        assert doc["generated_tokens_per_sequence"] == 3
        assert doc["predicted"]["decode_step_s"] > 0  # predicted on the entry's profile
    assert bundle["tiny-cpu-offload"]["h2d"]["bytes_per_step"] > 0
