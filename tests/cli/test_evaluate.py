"""hpi eval's deployment flags reach the hpi serve it starts as they were given (hpi.cli.serve.deployment_argv)."""

from __future__ import annotations

import argparse

import pytest

from hpi.cli.evaluate import register as register_eval
from hpi.cli.evaluate import serve_argv
from hpi.cli.serve import deployment_argv
from hpi.cli.serve import register as register_serve


def parser(register) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command"))
    return p


EVAL, SERVE = parser(register_eval), parser(register_serve)
BASE = ["--checkpoint", "ckpt", "--tasks", "t"]


@pytest.mark.parametrize("flags", [
    [],
    ["--tp", "2", "--pp", "2", "--offload", "cpu"],
    ["--offload", "nvme", "--nvme-path", "/mnt/nvme", "--quant-bits", "4", "--no-pin-memory"],
    ["--tp", "1", "--pin-memory"],  # given at their defaults: still given (--pin-memory given is refused, not dropped)
    ["--preset", "latency", "--hardware", "h200-2gpu"],
    ["--plan", "plan.json", "--max-batch", "4"],
    ["--device", "cpu", "--dtype", "fp32", "--no-cuda-graphs", "--fetch-wait", "host", "--force"],
    ["--model", "llama-3-8b", "--cuda-graphs"],
])
def test_deployment_flags_reach_hpi_serve_as_given(flags):
    args = EVAL.parse_args(["eval", *BASE, *flags])
    argv = serve_argv(args)
    served = SERVE.parse_args(["serve", *argv])
    for action in args.deployment_flags:  # every deployment value hpi serve parses is eval's (the KV slots below)
        if action.dest != "max_batch":
            assert getattr(served, action.dest) == getattr(args, action.dest), action.dest
    assert sorted(getattr(served, "given_plan_flags", ())) == sorted(getattr(args, "given_plan_flags", ()))
    assert (served.checkpoint, served.max_model_len) == ("ckpt", 2048)
    assert served.max_batch == (4 if "--max-batch" in flags else 16)  # eval's --batch-size by default


def test_nothing_is_forwarded_when_nothing_is_given():
    args = EVAL.parse_args(["eval", *BASE])
    assert deployment_argv(args.deployment_flags, args) == []
    assert serve_argv(args) == ["--checkpoint", "ckpt", "--max-model-len", "2048", "--max-batch", "16"]
