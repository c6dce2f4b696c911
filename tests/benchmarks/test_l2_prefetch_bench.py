"""benchmarks/l2_prefetch_bench.py: its two prefetch kernels as sm_90 compiles them (``tests/executor/sm90.py``: one
bulk prefetch, or eight line prefetches, a thread, and no load or store), the launch grid covering the weight, and one
line with exit 2 where there is no GPU. Its timings come from the device (benchmarks/results/2026-12-07-l2-prefetch)."""

from __future__ import annotations

import pytest

from tests.benchmarks.scripts import load

torch = pytest.importorskip("torch")
O_PROJ_8B = 4096 * 4096 * 2  # Llama-3-8B's o_proj, bf16


def test_the_grid_asks_for_every_byte_once_per_unit():
    bench = load("l2_prefetch_bench")
    assert bench.launch_grid(O_PROJ_8B, "bulk", 65536) == (16, 32)  # 512 chunks of 64 KiB
    assert bench.launch_grid(O_PROJ_8B, "lines", 16) == (256, 1024)  # 262,144 lines of 128 bytes
    for nbytes in (16, 65536 * 32 + 16, O_PROJ_8B - 16):
        programs, per = bench.launch_grid(nbytes, "bulk", 65536)
        assert (programs - 1) * per * 65536 < nbytes <= programs * per * 65536


def test_both_kernels_compile_for_sm90_to_prefetches_alone(monkeypatch):
    pytest.importorskip("triton")
    from tests.executor.sm90 import Launches, compile_for_sm90, opcodes

    bench = load("l2_prefetch_bench")
    bulk, lines = bench._kernels()
    launches = {"bulk": Launches(), "lines": Launches()}
    monkeypatch.setattr(bench, "_kernels", lambda: (launches["bulk"], launches["lines"]))
    weight = torch.zeros(4096, 4096, dtype=torch.bfloat16)
    for kind in launches:
        bench.prefetcher(weight, kind, 65536)()
    ptx = {kind: compile_for_sm90(kernel, launches[kind])[0] for kind, kernel in (("bulk", bulk), ("lines", lines))}
    assert ptx["bulk"].count("cp.async.bulk.prefetch.L2.global [") == 1  # 32 threads, a chunk each
    assert ptx["lines"].count("prefetch.global.L2 [") == 8  # 1,024 lines over 128 threads
    for text in ptx.values():
        assert not [op for op in opcodes(text) if op.startswith(("ld.global", "st.global"))]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU refusal")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_2(capsys, tmp_path):
    assert load("l2_prefetch_bench").main(["--out", str(tmp_path / "l2.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0] and not (tmp_path / "l2.json").exists()
