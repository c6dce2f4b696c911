"""benchmarks/dequant_bench.py: a CPU run on its small shapes prints one case per shape and bit width, then the
summary, with every fused output bit-identical to DeepSpeed's."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.scripts import load


def _module():
    return load("dequant_bench")


def run_small(capsys, *args: str) -> tuple[list[dict], dict]:
    assert _module().main(["--device", "cpu", "--small", "--reps", "2", "--warmup", "1", *args]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return lines[:-1], lines[-1]


def test_small_cpu_run_prints_every_case_and_the_summary(capsys):
    pytest.importorskip("torch")
    pytest.importorskip("deepspeed")
    mod = _module()
    cases, summary = run_small(capsys)
    assert [(tuple(c["shape"]), c["bits"]) for c in cases] == [(s, b) for b in (4, 8) for s in mod.SHAPES_SMALL]
    assert summary["paths"] == ["deepspeed", "inductor"]  # the CPU default: no interpreter timings
    assert all(c["inductor_identical"] == 1.0 and c["deepspeed_s"] > 0 and c["inductor_s"] > 0 for c in cases)
    assert not any(k.startswith("triton") for c in cases for k in c)
    # GB/s is the bf16 output (2 bytes an element) over the median time
    c = cases[0]
    assert c["inductor_out_gb_s"] == pytest.approx(c["shape"][0] * c["shape"][1] * 2 / c["inductor_s"] / 1e9)
    assert c["inductor_speedup"] == pytest.approx(c["deepspeed_s"] / c["inductor_s"])
    assert summary["kind"] == "hpi.DequantBench" and summary["cases"] == 8 and summary["all_identical"] is True
    assert summary["inductor_total_s"] == pytest.approx(sum(c["inductor_s"] for c in cases))
    hosts = sorted(c["deepspeed_host_us"] for c in cases)
    assert summary["deepspeed_host_us_max"] == hosts[-1] and hosts[0] <= summary["deepspeed_host_us_median"]


def test_the_triton_path_runs_beside_the_others(capsys, monkeypatch):
    """On the CPU the Triton kernel runs in Triton's interpreter: its numbers are DeepSpeed's; the block is the
    one asked for (and put back by monkeypatch)."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("triton")
    from hpi.executor import dequant_triton

    monkeypatch.setattr(dequant_triton, "BLOCK_ELEMS", dequant_triton.BLOCK_ELEMS)
    cases, summary = run_small(capsys, "--paths", "deepspeed,triton", "--bits", "4", "--block-elems", "4096",
                               "--reps", "1", "--warmup", "0")  # the interpreter is slow: few calls
    assert summary["paths"] == ["deepspeed", "triton"] and summary["triton_block_elems"] == 4096
    assert len(cases) == 4 and all(c["triton_identical"] == 1.0 and c["triton_host_us"] > 0 for c in cases)
    assert summary["triton_identical_min"] == 1.0 and summary["all_identical"] is True


@pytest.mark.parametrize("args", [["--paths", "triton,deepspeed"], ["--paths", "deepspeed,deepspeed"],
                                  ["--paths", "deepspeed,fused"], ["--block-elems", "1000"]])
def test_bad_paths_and_blocks_are_refused(args):
    with pytest.raises(SystemExit):
        _module().parse(args)


def test_identical_fraction_compares_bits():
    torch = pytest.importorskip("torch")
    a = torch.tensor([0.0, 1.0, float("nan"), 2.0], dtype=torch.bfloat16)
    b = torch.tensor([-0.0, 1.0, float("nan"), 3.0], dtype=torch.bfloat16)
    assert _module().identical_fraction(a, b) == 0.5  # -0 is not +0; the same NaN is the same
