"""``hpi run`` refuses what cannot work before it starts any process: one line, exit code 2."""

from __future__ import annotations

import pytest

from hpi.cli import main

REFUSED = [
    (["--model", "tiny-llama", "--device", "cpu", "--prompt", "hello"], "text prompts need a tokenizer"),
    (["--model", "tiny-llama", "--device", "cpu", "--quant-bits", "4", "--offload", "cpu"], "quantization group(64)"),
    (["--model", "tiny-llama", "--device", "cpu", "--tp", "3"], "n_heads(4) % tp(3)"),
    (["--model", "llama-3-70b", "--hardware", "a6000-workstation"], "is infeasible on a6000-workstation"),
    (["--model", "tiny-llama", "--device", "cpu", "--skinny-gemm"], "--skinny-gemm changes the graphed decode step"),
]


@pytest.mark.parametrize("argv,needle", REFUSED, ids=[a[-1] for a, _ in REFUSED])
def test_run_refuses_before_launch(capsys, tmp_path, argv, needle):
    code = main(["run", *argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "logs").exists()  # nothing was started


def test_the_skinny_gemm_flags_read_into_the_workload_the_plan_is_priced_with():
    from hpi.cli.app import build_parser
    from hpi.cli.args import workload_from_args

    parser, _ = build_parser()
    default = parser.parse_args(["run", "--model", "tiny-llama"])
    assert default.skinny_gemm is None and workload_from_args(default).skinny_gemm is True  # where graphed, on a GPU
    off = parser.parse_args(["run", "--model", "tiny-llama", "--no-skinny-gemm"])
    assert off.skinny_gemm is False and workload_from_args(off).skinny_gemm is False
    assert parser.parse_args(["run", "--model", "tiny-llama", "--skinny-gemm"]).skinny_gemm is True
