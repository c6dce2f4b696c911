"""benchmarks/dequant_bench.py: a CPU run on its small shapes prints one case per shape and bit width, then the
summary, with every fused output bit-identical to DeepSpeed's."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.scripts import load


def _module():
    return load("dequant_bench")


def test_small_cpu_run_prints_every_case_and_the_summary(capsys):
    pytest.importorskip("torch")
    pytest.importorskip("deepspeed")
    mod = _module()
    assert mod.main(["--device", "cpu", "--small", "--reps", "2", "--warmup", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    cases, summary = lines[:-1], lines[-1]
    assert [(tuple(c["shape"]), c["bits"]) for c in cases] == [(s, b) for b in (4, 8) for s in mod.SHAPES_SMALL]
    assert all(c["identical"] == 1.0 and c["deepspeed_s"] > 0 and c["fused_s"] > 0 for c in cases)
    # GB/s is the bf16 output (2 bytes an element) over the median time
    c = cases[0]
    assert c["fused_out_gb_s"] == pytest.approx(c["shape"][0] * c["shape"][1] * 2 / c["fused_s"] / 1e9)
    assert summary["kind"] == "hpi.DequantBench" and summary["cases"] == 8 and summary["all_identical"] is True
    assert summary["fused_total_s"] == pytest.approx(sum(c["fused_s"] for c in cases))


def test_identical_fraction_compares_bits():
    torch = pytest.importorskip("torch")
    a = torch.tensor([0.0, 1.0, float("nan"), 2.0], dtype=torch.bfloat16)
    b = torch.tensor([-0.0, 1.0, float("nan"), 3.0], dtype=torch.bfloat16)
    assert _module().identical_fraction(a, b) == 0.5  # -0 is not +0; the same NaN is the same
