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


def test_warmup_steps_reads_as_asked_and_is_left_to_the_deployment_unasked(capsys, tmp_path):
    from hpi.cli.app import build_parser

    parser, _ = build_parser()
    assert parser.parse_args(["run", "--model", "tiny-llama"]).warmup_steps is None  # hpi.deployment.warmup_mode
    assert parser.parse_args(["run", "--model", "tiny-llama", "--warmup-steps", "0"]).warmup_steps == 0
    code = main(["run", "--model", "tiny-llama", "--device", "cpu", "--warmup-steps", "-1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--warmup-steps: -1 must be >= 0" in err and len(err.strip().splitlines()) == 1


def _summary_lines(capsys, compile_s, **warmups) -> list[str]:
    """print_summary's lines for the kept CPU record with ``compile_s`` and the spec's warm-ups as given."""
    import dataclasses
    import json

    from hpi.cli.run import print_summary
    from hpi.deployment import Deployment
    from hpi.executor.spec import RunSpec
    from hpi.planner.catalog import load_model
    from hpi.planner.specs.plan import Plan
    from hpi.records import RunRecord
    from tests.cli.test_bad_inputs import CPU_RECORD

    record = RunRecord.from_json(json.loads(CPU_RECORD.read_text()))
    record = dataclasses.replace(record, timings=dataclasses.replace(record.timings, compile_s=compile_s))
    spec = RunSpec(plan=Plan(), model="tiny-llama", device="cpu", out_dir="r", **warmups)
    print_summary(record, Deployment(spec=spec, model=load_model("tiny-llama"), prediction=None))
    return capsys.readouterr().out.splitlines()


def test_the_summary_says_whether_the_compile_fell_in_a_warm_up_or_inside_the_timed_run(capsys):
    warm = _summary_lines(capsys, 65.4, warmup_steps=1, warmup_gen_len=2)
    line = "  before the timers: 1 warm-up(s) of 2 token(s), which compiled and captured the decode step: 65.4 s"
    assert line in warm
    cold = _summary_lines(capsys, 65.4)
    assert any(line.startswith("  compile and capture of the decode step: 65.4 s, inside the timed run")
               and "drop --warmup-steps 0" in line for line in cold)
    full = _summary_lines(capsys, None, warmup_steps=2)  # no compile; warm-ups of the workload's own length
    assert any(line.startswith("  before the timers: 2 warm-up(s) of ") and line.endswith("token(s)") for line in full)
    assert not any("warm-up" in line or "compile" in line for line in _summary_lines(capsys, None))
