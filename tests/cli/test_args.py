"""cli.args: the plan flags are the knobs' declarations (``hpi.planner.specs.knob``), read back into a Plan and
written out again by ``plan_flags``."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, fields

import pytest

from hpi.cli.args import (
    DERIVED_KNOBS,
    Parser,
    add_plan_flags,
    add_target,
    plan_flags,
    plan_from_args,
    search_restrictions,
)
from hpi.planner.catalog import load_model
from hpi.planner.search import SearchSpace
from hpi.planner.specs.knob import knob, knob_fields
from hpi.planner.specs.plan import Plan

TARGET = ["--model", "llama-3-8b", "--hardware", "h100-sxm-1gpu"]


@dataclass(frozen=True)
class PlanWithSpill(Plan):
    spill_elems: int = knob(7, group="runtime", unit="elements", minimum=0, flag="--spill", metavar="ELEMS",
                            help="elements spilled (default 7)", applies="gathers")


def _parser(for_search: bool, plan_type: type = Plan) -> Parser:
    p = Parser(prog="hpi test")
    add_target(p)
    add_plan_flags(p, for_search=for_search, plan_type=plan_type)
    return p


def _options(p: Parser) -> dict:
    return {a.option_strings[0]: a for a in p._actions if a.option_strings}


def test_fixed_value_flags_are_the_declared_knobs() -> None:
    opts = _options(_parser(for_search=False))
    for k in knob_fields(Plan):
        action = opts[k.spec.flag]
        assert action.dest == k.dest == (k.name if k.spec.vector == "switch" else action.dest)
        if k.spec.vector == "switch":
            assert action.default is None and f"--no-{k.spec.flag[2:]}" in opts
        else:
            assert action.default == (None if k.spec.flag_derived else k.default), k.name
            assert action.help == k.spec.help and action.metavar == k.spec.metavar
            assert tuple(action.choices or ()) == k.spec.choices
    assert opts["--quant-bits"].type is int and opts["--offload"].type is None
    assert opts["--plan"].dest == "plan_file"
    assert {k.name for k in knob_fields(Plan) if k.spec.flag_derived} == set(DERIVED_KNOBS)


def test_search_flags_are_the_knobs_with_a_search_axis() -> None:
    opts = _options(_parser(for_search=True))
    restricted = {k.spec.flag for k in knob_fields(Plan) if k.spec.search_axis}
    plan_flags_given = {f for f in opts if f not in ("-h", "--model", "--hardware", "--batch", "--prompt-len",
                                                      "--gen-len", "--json") and not f.startswith("--no-")}
    assert plan_flags_given == restricted
    args = _parser(for_search=True).parse_args(TARGET + ["--tp", "2", "--offload", "cpu", "--no-pin-memory"])
    restrict = search_restrictions(args)
    assert set(restrict) <= {f.name for f in fields(SearchSpace)}
    assert restrict == {"offloads": "cpu", "tp": 2, "pp": None, "dp": None, "weight_bits": None,
                        "pin_memory": False, "kv_offload": None, "zero3_leaves": None}
    layer = search_restrictions(_parser(for_search=True).parse_args(TARGET + ["--zero3-leaf", "layer"]))
    assert layer["zero3_leaves"] == "layer" and SearchSpace().restrict(zero3_leaves="layer").zero3_leaves == ("layer",)
    assert SearchSpace().restrict(**restrict).offloads == ("cpu",)


@pytest.mark.parametrize("plan", [
    Plan(),
    Plan(offload="cpu", weight_bits=4, pin_memory=False, kv_offload=True, batch_size=16),
    Plan(offload="cpu", tp=2, pp=2, dp=2, batch_size=8, micro_batches=4, prefetch_bucket_elems=33_554_432,
         max_live_elems=33_554_432, persistence_threshold_elems=4096),
    Plan(offload="nvme", nvme_buffer_count=8, nvme_buffer_elems=525_336_576),
])
def test_plan_flags_name_the_plan_that_plan_from_args_reads_back(plan) -> None:
    model = load_model("llama-3-8b")
    args = _parser(for_search=False).parse_args(TARGET + shlex.split(plan_flags(plan)))
    # up to knobs that change nothing: the NVMe buffer is sized for the model whether or not it is used
    assert plan_from_args(args, model).canonical() == plan.canonical()


def test_plan_flags_read_as_before() -> None:
    assert plan_flags(Plan(offload="cpu", weight_bits=4, kv_offload=True, batch_size=16)) == (
        "--offload cpu --tp 1 --pp 1 --dp 1 --quant-bits 4 --batch 16 --pin-memory --kv-offload")
    assert plan_flags(Plan(pp=2, micro_batches=2, batch_size=2, pin_memory=False, prefetch_bucket_elems=9)) == (
        "--offload none --tp 1 --pp 2 --dp 1 --quant-bits 16 --batch 2 --no-pin-memory --micro-batches 2 "
        "--prefetch-bucket 9")


def test_unnamed_flags_take_the_derived_values() -> None:
    model = load_model("llama-3-8b")
    args = _parser(for_search=False).parse_args(TARGET + ["--pp", "4", "--batch", "8", "--offload", "nvme"])
    plan = plan_from_args(args, model)
    assert plan.micro_batches == 4 and plan.nvme_buffer_elems == 128256 * 4096 and plan.pin_memory
    assert not plan.kv_offload


def test_a_new_knob_gets_its_flag_and_reads_back() -> None:
    model = load_model("llama-3-8b")
    opts = _options(_parser(for_search=False, plan_type=PlanWithSpill))
    assert opts["--spill"].default == 7 and opts["--spill"].help == "elements spilled (default 7)"
    assert "--spill" not in _options(_parser(for_search=True, plan_type=PlanWithSpill))  # no search axis
    args = _parser(False, PlanWithSpill).parse_args(TARGET + ["--offload", "cpu", "--spill", "11"])
    plan = plan_from_args(args, model, plan_type=PlanWithSpill)
    assert plan == PlanWithSpill(offload="cpu", spill_elems=11, nvme_buffer_elems=128256 * 4096)
    assert plan_flags(plan).endswith("--pin-memory --spill 11")
    assert "--spill" not in plan_flags(plan.with_(spill_elems=7))
