"""hpi.executor.profiling: the interval arithmetic, the trace summary on a trace with known copies and kernels, and
a real torch.profiler run on the CPU written beside a record."""

import json

import pytest
import torch

from hpi.executor.profiling import PROFILE_ENV, gaps_us, overlap_us, profiled, summarize_trace, union_us


def test_union_overlap_and_gaps_of_intervals():
    spans = [(0.0, 10.0), (5.0, 12.0), (20.0, 25.0), (21.0, 22.0)]
    assert union_us(spans) == 17.0
    assert gaps_us(spans) == [8.0]
    assert overlap_us([(0.0, 10.0)], [(5.0, 30.0)]) == 5.0
    assert union_us([]) == 0.0 and gaps_us([(1.0, 2.0)]) == []


def _x(cat, name, ts, dur, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": 7, "args": args}


def test_summary_of_a_trace_with_two_copies_a_gap_and_a_wait():
    events = [
        _x("cpu_op", "aten::linear", 0.0, 1000.0),
        _x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 0.0, 200.0, bytes=4_000_000),
        _x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 500.0, 200.0, bytes=4_000_000),  # a 300 us gap
        _x("gpu_memcpy", "Memcpy DtoD (Device -> Device)", 900.0, 10.0, bytes=64),
        _x("kernel", "gemv", 100.0, 150.0), _x("kernel", "gemv", 600.0, 150.0), _x("kernel", "add", 800.0, 20.0),
        _x("cuda_runtime", "cudaStreamSynchronize", 700.0, 120.0),
        _x("cuda_runtime", "cudaLaunchKernel", 50.0, 5.0),
        {"ph": "i", "cat": "cpu_op", "name": "instant", "ts": 5000.0},  # not a complete event: ignored
        _x("python_function", "deepspeed/fetch", 100.0, 400.0), _x("python_function", "deepspeed/fetch", 300.0, 400.0),
    ]
    s = summarize_trace(events)
    assert s["wall_us"] == 1000.0
    h = s["h2d"]
    assert (h["count"], h["bytes"], h["busy_us"], h["busy_fraction"]) == (2, 8_000_000, 400.0, 0.4)
    assert h["bytes_s_while_busy"] == pytest.approx(8e6 / 400e-6)  # 20 GB/s while copying
    assert h["bytes_s_over_wall"] == pytest.approx(8e6 / 1000e-6)
    assert h["gaps_over_floor"] == {"floor_us": 100.0, "count": 1, "total_us": 300.0, "longest_us": [300.0]}
    k = s["kernels"]
    assert (k["count"], k["busy_us"], k["overlap_with_h2d_us"]) == (3, 320.0, 200.0)
    assert k["top"][0] == {"name": "gemv", "count": 2, "total_us": 300.0, "mean_us": 150.0}
    assert s["other_copies"][0]["name"].startswith("Memcpy DtoD")
    assert s["host"]["waits_on_device_us"] == 120.0
    assert s["host"]["span_us"] == 1000.0
    assert s["python"] == {"span_us": 600.0, "calls": 2,
                           "top": [{"name": "deepspeed/fetch", "count": 2, "total_us": 800.0, "mean_us": 400.0}]}


def test_profiled_writes_nothing_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    with profiled(str(tmp_path), 0):
        torch.ones(4).sum()
    assert list(tmp_path.iterdir()) == []


def test_profiled_writes_a_summary_and_tables_of_a_real_cpu_run(tmp_path, monkeypatch):
    monkeypatch.setenv(PROFILE_ENV, "1")
    a = torch.randn(64, 64)
    with profiled(str(tmp_path), 3):
        for _ in range(5):
            a = torch.nn.functional.linear(a, a).tanh()
    summary = json.loads((tmp_path / "profile-rank3.json").read_text())
    names = {row["name"] for row in summary["host"]["top"]}
    assert {"aten::linear", "aten::tanh"} <= names
    assert summary["host"]["ops"] >= 10 and summary["wall_us"] > 0
    assert summary["h2d"]["count"] == 0 and summary["kernels"]["count"] == 0  # no CUDA here
    tables = (tmp_path / "profile-rank3.txt").read_text()
    assert "by host time" in tables and "aten::linear" in tables


def test_python_mode_records_pythons_calls(tmp_path):
    """Run in a fresh interpreter: under pytest the test's own enclosing frames would fill the top list."""
    import os
    import subprocess
    import sys

    code = ("import torch\nfrom hpi.executor.profiling import profiled\n"
            "def a_python_function(x):\n    return torch.nn.functional.linear(x, x)\n"
            f"with profiled({str(tmp_path)!r}, 0):\n    a_python_function(torch.randn(8, 8))\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                   env={**os.environ, PROFILE_ENV: "python"})
    summary = json.loads((tmp_path / "profile-rank0.json").read_text())
    assert summary["python"]["calls"] > 0
    assert any(row["name"].endswith("a_python_function") for row in summary["python"]["top"])
