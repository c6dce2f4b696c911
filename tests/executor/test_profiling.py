"""hpi.executor.profiling: the interval arithmetic, the trace summary on a trace with known copies and kernels, self
time and what ran in the copy gaps on a trace with nested calls on two threads, and a real torch.profiler run on the
CPU written beside a record."""

import json

import pytest
import torch

from hpi.executor.profiling import (
    PROFILE_ENV,
    gaps_us,
    overlap_us,
    profiled,
    summarize_trace,
    summary_text,
    union_us,
)


def test_union_overlap_and_gaps_of_intervals():
    spans = [(0.0, 10.0), (5.0, 12.0), (20.0, 25.0), (21.0, 22.0)]
    assert union_us(spans) == 17.0
    assert gaps_us(spans) == [8.0]
    assert overlap_us([(0.0, 10.0)], [(5.0, 30.0)]) == 5.0
    assert union_us([]) == 0.0 and gaps_us([(1.0, 2.0)]) == []


def _x(cat, name, ts, dur, tid=7, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid, "args": args}


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
    fetch = {"name": "deepspeed/fetch", "count": 2, "total_us": 800.0, "mean_us": 400.0}
    # the two calls overlap without one holding the other: neither is nested, so self time is their whole time
    assert s["python"] == {"span_us": 600.0, "calls": 2, "top": [fetch], "self_top": [fetch]}
    # the gap 200-500: fetch 100-500 spends 300 us in it, fetch 300-700 200 us; aten::linear (0-1000) is idle host
    # op time there, the gemv at 100-250 covers 50 us of it
    gap = h["copy_gap_attribution"]
    assert gap["gap_us"] == 300.0
    assert gap["covered_fraction"] == {"host_ops": 1.0, "python": 1.0, "kernels": round(50 / 300, 4),
                                       "nothing_recorded": 0.0}
    assert gap["python_self"] == [{"name": "deepspeed/fetch", "count": 2, "in_gaps_us": 500.0,
                                   "fraction_of_gaps": round(500 / 300, 4)}]
    assert gap["host_ops_self"] == [{"name": "aten::linear", "count": 1, "in_gaps_us": 300.0, "fraction_of_gaps": 1.0}]


def _nested_calls_on_two_threads():
    """Copies leave the copy engine idle 30-200 (170 us, counted) and 300-350 (50 us, under the floor). Thread 1: outer
    0-100 holds inner 20-60, fetch 120-185, and the host op aten::copy_ 40-50 holds cudaMemcpyAsync 42-48 (inside inner
    in time, but ops and Python frames nest apart). Thread 2: spin 125-135 (inside fetch in time, but on another
    thread), prefetch 150-250 holding wait 160-175, short 310-340 (in the uncounted gap), cudaStreamSynchronize
    190-230. A kernel runs 190-210. Nothing runs on the host 100-120."""
    return [
        _x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 0.0, 30.0, bytes=1000),
        _x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 200.0, 100.0, bytes=1000),
        _x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 350.0, 50.0, bytes=1000),
        _x("kernel", "gemv", 190.0, 20.0),
        _x("python_function", "outer", 0.0, 100.0, tid=1), _x("python_function", "inner", 20.0, 40.0, tid=1),
        _x("python_function", "fetch", 120.0, 65.0, tid=1),
        _x("cpu_op", "aten::copy_", 40.0, 10.0, tid=1), _x("cuda_runtime", "cudaMemcpyAsync", 42.0, 6.0, tid=1),
        _x("python_function", "spin", 125.0, 10.0, tid=2), _x("python_function", "prefetch", 150.0, 100.0, tid=2),
        _x("python_function", "wait", 160.0, 15.0, tid=2), _x("python_function", "short", 310.0, 30.0, tid=2),
        _x("cuda_runtime", "cudaStreamSynchronize", 190.0, 40.0, tid=2),
    ]


def _rows(rows, amount):
    return [(row["name"], row["count"], row[amount]) for row in rows]


def test_self_time_subtracts_direct_children_on_the_same_thread_only():
    s = summarize_trace(_nested_calls_on_two_threads())
    # outer 100 - inner 40; prefetch 100 - wait 15; fetch keeps its 65 (spin is on thread 2); inner keeps its 40
    # (aten::copy_ is an op, not a Python frame)
    assert _rows(s["python"]["self_top"], "total_us") == [
        ("prefetch", 1, 85.0), ("fetch", 1, 65.0), ("outer", 1, 60.0), ("inner", 1, 40.0), ("short", 1, 30.0),
        ("wait", 1, 15.0), ("spin", 1, 10.0)]
    assert s["python"]["span_us"] == 100.0 + 130.0 + 30.0  # 0-100, 120-250, 310-340
    # aten::copy_ 10 - cudaMemcpyAsync 6
    assert _rows(s["host"]["self_top"], "total_us") == [
        ("cudaStreamSynchronize", 1, 40.0), ("cudaMemcpyAsync", 1, 6.0), ("aten::copy_", 1, 4.0)]


def test_copy_gap_attribution_clips_self_time_to_the_gaps_over_the_floor():
    s = summarize_trace(_nested_calls_on_two_threads())
    assert s["h2d"]["gaps_over_floor"]["total_us"] == 170.0
    gap = s["h2d"]["copy_gap_attribution"]
    assert gap["gap_us"] == 170.0
    # python covers 30-100 and 120-200 (150 us); ops 40-50 and 190-200; the kernel 190-200; nothing 100-120
    assert gap["covered_fraction"] == {"host_ops": round(20 / 170, 4), "python": round(150 / 170, 4),
                                       "kernels": round(10 / 170, 4), "nothing_recorded": round(20 / 170, 4)}
    # outer is in the gap 30-100 (70) less inner's 30-60 (30); prefetch 150-200 (50) less wait's 15; short ran only
    # in the gap under the floor, so it is not listed
    assert _rows(gap["python_self"], "in_gaps_us") == [
        ("fetch", 1, 65.0), ("outer", 1, 40.0), ("prefetch", 1, 35.0), ("inner", 1, 30.0), ("wait", 1, 15.0),
        ("spin", 1, 10.0)]
    assert gap["python_self"][0]["fraction_of_gaps"] == round(65 / 170, 4)
    assert _rows(gap["host_ops_self"], "in_gaps_us") == [
        ("cudaStreamSynchronize", 1, 10.0), ("cudaMemcpyAsync", 1, 6.0), ("aten::copy_", 1, 4.0)]


def test_summary_text_prints_the_gap_shares_and_who_ran_in_the_gaps():
    text = summary_text(summarize_trace(_nested_calls_on_two_threads()))
    lines = text.splitlines()
    assert lines[0].endswith("; 1 copy gaps >= 100 us idle 170.0 us")
    assert lines[1] == ("share of the copy gaps covered by: host_ops 11.8%, python 88.2%, kernels 5.9%, "
                        "nothing_recorded 11.8%")
    assert lines[2] == "python in the copy gaps, by self time (top 10):"
    assert lines[3].split() == ["65.0", "us", "38.2%", "1", "calls", "fetch"]
    host_table = lines.index("host ops in the copy gaps, by self time (top 10):")
    assert lines[host_table + 1].split() == ["10.0", "us", "5.9%", "1", "calls", "cudaStreamSynchronize"]
    run_table = lines.index("python over the run, by self time (top 10):")
    assert lines[run_table + 1].split() == ["85.0", "us", "1", "calls", "prefetch"]


def test_a_trace_without_copies_attributes_no_gaps():
    gap = summarize_trace([_x("python_function", "f", 0.0, 10.0)])["h2d"]["copy_gap_attribution"]
    assert gap == {"gap_us": 0.0, "covered_fraction": None, "python_self": [], "host_ops_self": []}


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
    # one thread: the ops' self times add up to the time under the outermost ops, never more
    self_us = {row["name"]: row["total_us"] for row in summary["host"]["self_top"]}
    inclusive_us = {row["name"]: row["total_us"] for row in summary["host"]["top"]}
    assert 0 < self_us["aten::linear"] < inclusive_us["aten::linear"]  # its addmm is its child
    assert 0 < sum(self_us.values()) <= summary["host"]["span_us"] + 0.1 * len(self_us)  # rounding of each row
    tables = (tmp_path / "profile-rank3.txt").read_text()
    assert "by host time" in tables and "aten::linear" in tables
    assert "python over the run, by self time" in tables


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
    assert any(row["name"].endswith("a_python_function") for row in summary["python"]["self_top"])
