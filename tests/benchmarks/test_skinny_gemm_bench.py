"""benchmarks/skinny_gemm_bench.py on the CPU: the kernel in Triton's interpreter beside F.linear on tiny shapes, the
model's products counted per step, and its bad input answered with one line."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.benchmarks.scripts import load, run_triton_script

pytest.importorskip("torch")
pytest.importorskip("triton", reason="the kernel's CPU run is Triton's interpreter")


def _run(*args: str, interpret: bool = True) -> subprocess.CompletedProcess:
    return run_triton_script("skinny_gemm_bench", *args, interpret=interpret)


def test_every_candidate_is_timed_beside_f_linear_and_matches_float64(tmp_path):
    out = tmp_path / "skinny.json"
    proc = _run("--device", "cpu", "--dtype", "fp32", "--shapes", "64x128,40x300", "--rows", "2,16",
                "--replays", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    rows = summary["rows"]
    assert [(r["rows"], r["n"], r["k"]) for r in rows] == [(2, 64, 128), (2, 40, 300), (16, 64, 128), (16, 40, 300)]
    for r in rows:
        assert len(r["configs"]) == 6  # the interpreter's 8 "SMs": 3 column tiles x 2 K tiles, no split needed
        assert r["best"] in r["configs"] and r["best"]["us"] == min(c["us"] for c in r["configs"])
        assert max(c["max_abs_err"] for c in r["configs"]) < 1e-5 and r["cublas"]["max_abs_err"] < 1e-5
        assert r["cublas"]["timer"] == "perf_counter" and r["weight_bytes"] == r["n"] * r["k"] * 4
        assert r["best_over_cublas"] == pytest.approx(r["cublas"]["us"] / r["best"]["us"])
    # each shape counted once a step: the step's cuBLAS ms is the sum of its products' µs
    step = summary["step_products"]["16"]
    assert step["cublas_ms"] == pytest.approx(sum(r["cublas"]["us"] for r in rows if r["rows"] == 16) / 1e3)
    assert step["weight_gb"] == pytest.approx((64 * 128 + 40 * 300) * 4 / 1e9)


def test_a_model_s_products_are_its_linears_per_layer_and_the_head():
    bench = load("skinny_gemm_bench")
    shapes = bench.model_products("llama-3-8b")
    assert shapes == {(4096, 4096): {"names": ["q_proj", "o_proj"], "per_step": 64},
                      (1024, 4096): {"names": ["k_proj", "v_proj"], "per_step": 64},
                      (14336, 4096): {"names": ["gate_proj", "up_proj"], "per_step": 64},
                      (4096, 14336): {"names": ["down_proj"], "per_step": 32},
                      (128256, 4096): {"names": ["lm_head"], "per_step": 1}}
    stacked = bench.model_products("llama-3-8b", stacked=True)
    assert stacked[(6144, 4096)] == {"names": ["q_proj+k_proj+v_proj"], "per_step": 32}
    assert stacked[(28672, 4096)] == {"names": ["gate_proj+up_proj"], "per_step": 32}
    assert stacked[(4096, 4096)]["per_step"] == 32 and stacked[(4096, 14336)]["per_step"] == 32
    # the same weight bytes a step either way
    size = {k: v["per_step"] * k[0] * k[1] for k, v in shapes.items()}
    assert sum(size.values()) == sum(v["per_step"] * k[0] * k[1] for k, v in stacked.items())


def test_bad_arguments_get_one_line_and_exit_2():
    proc = _run("--device", "cpu", "--rows", "32")
    assert proc.returncode == 2 and "--rows 32 > MAX_ROWS(16)" in proc.stderr
    proc = _run("--device", "cpu", "--shapes", "64x")
    assert proc.returncode == 2 and "NxK" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run("--device", "cpu", interpret=False)
    assert proc.returncode == 2 and "TRITON_INTERPRET=1" in proc.stderr
