"""``hpi run`` refuses what cannot work before it starts any process: one line, exit code 2."""

from __future__ import annotations

import pytest

from hpi.cli import main

REFUSED = [
    (["--model", "tiny-llama", "--device", "cpu", "--prompt", "hello"], "text prompts need a tokenizer"),
    (["--model", "tiny-llama", "--device", "cpu", "--quant-bits", "4", "--offload", "cpu"], "quantization group(64)"),
    (["--model", "tiny-llama", "--device", "cpu", "--tp", "3"], "n_heads(4) % tp(3)"),
    (["--model", "llama-3-70b", "--hardware", "a6000-workstation"], "is infeasible on a6000-workstation"),
]


@pytest.mark.parametrize("argv,needle", REFUSED, ids=[a[-1] for a, _ in REFUSED])
def test_run_refuses_before_launch(capsys, tmp_path, argv, needle):
    code = main(["run", *argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "logs").exists()  # nothing was started
