"""specs.knob: each plan knob is declared once, and the cost model's arrays, the search grid, JSON and
validation derive from that declaration (the command line: tests/cli/test_args.py)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pytest

from hpi.planner.catalog import load_model
from hpi.planner.cost.inputs import Knobs
from hpi.planner.predict import arrangement_for
from hpi.planner.profiles import load_profile
from hpi.planner.search import SearchSpace, _grid
from hpi.planner.specs.knob import Knob, degree_names, display_order, knob, knob_fields
from hpi.planner.specs.plan import Plan
from hpi.planner.specs.workload import Workload


@dataclass(frozen=True)
class PlanWithSpill(Plan):
    """A plan with one more knob, declared the one way a knob is declared."""

    spill_elems: int = knob(7, group="runtime", unit="elements", minimum=0, flag="--spill", metavar="ELEMS",
                            help="elements spilled (default 7)", applies="gathers")


def _arrangement():
    return arrangement_for(load_model("llama-3-8b"), load_profile("h100-sxm-1gpu"), Workload(), 1, 1, 1)


def test_every_plan_field_is_a_knobs_column_or_an_arrangement_degree() -> None:
    knobs = Knobs.from_plans([Plan()])
    declared = [c for k in knob_fields(Plan) for c in k.columns]
    assert list(knobs.columns) == declared  # nothing else, in field order
    assert degree_names(Plan) == ("tp", "pp", "dp")
    for f in fields(Plan):
        k = next(k for k in knob_fields(Plan) if k.name == f.name)
        assert k.columns or f.name in ("tp", "pp", "dp"), f.name
    assert list(knobs.columns) == ["offload_cpu", "offload_nvme", "weight_bits", "pin_memory", "kv_offload",
                                   "batch_size", "micro_batches", "prefetch_bucket_elems", "max_live_elems",
                                   "persistence_threshold_elems", "zero3_leaf_layer", "nvme_buffer_count",
                                   "nvme_buffer_elems",
                                   "aio_block_size_bytes", "aio_queue_depth", "aio_threads"]


def test_knobs_hold_plans_as_arrays_and_give_them_back() -> None:
    plans = [Plan(offload="cpu", weight_bits=4, pin_memory=False, batch_size=8, prefetch_bucket_elems=123),
             Plan(offload="nvme", kv_offload=True, nvme_buffer_count=9, nvme_buffer_elems=2_000_000_000), Plan()]
    k = Knobs.from_plans(plans)
    assert k.n == 3
    np.testing.assert_array_equal(k.offload_cpu, [True, False, False])
    np.testing.assert_array_equal(k.offload_nvme, [False, True, False])
    np.testing.assert_array_equal(k.offloaded, [True, True, False])
    np.testing.assert_array_equal(k.weight_bits, [4.0, 16.0, 16.0])
    assert k.weight_bits.dtype == np.float64 and k.pin_memory.dtype == bool
    assert [k.plan(i, {"tp": 1, "pp": 1, "dp": 1}) for i in range(3)] == plans
    assert k.take(np.array([2, 0])).plan(1, {"tp": 1, "pp": 1, "dp": 1}) == plans[0]
    with pytest.raises(AttributeError, match="no column 'offload'"):
        _ = k.offload
    with pytest.raises(ValueError, match="tp"):
        Knobs.from_fields({"tp": [2]}, 1)
    assert Knobs.from_plans([]).n == 0


def test_knobs_product_enumerates_in_itertools_order() -> None:
    k = Knobs.product({"offload": ["none", "cpu"], "batch_size": [1, 2, 4]}, fixed={"max_live_elems": 5})
    plans = [k.plan(i, {"tp": 1, "pp": 1, "dp": 1}) for i in range(k.n)]
    assert [(p.offload, p.batch_size) for p in plans] == [(o, b) for o in ("none", "cpu") for b in (1, 2, 4)]
    assert {p.max_live_elems for p in plans} == {5} and {p.weight_bits for p in plans} == {16}


def test_a_new_knob_is_a_column_a_grid_column_and_json() -> None:
    plan = PlanWithSpill(offload="cpu", spill_elems=9)
    assert PlanWithSpill.from_dict(plan.to_dict()) == plan and plan.to_dict()["spill_elems"] == 9
    k = Knobs.from_plans([plan], plan_type=PlanWithSpill)
    np.testing.assert_array_equal(k.spill_elems, [9.0])
    assert k.plan(0, {"tp": 1, "pp": 1, "dp": 1}) == plan
    grid = _grid(_arrangement(), SearchSpace(batch_sizes=(1, 2)), False, 100_000_000, plan_type=PlanWithSpill)
    assert grid.n > 0 and set(grid.spill_elems) == {7.0}
    assert list(grid.columns)[-1] == "spill_elems"
    with pytest.raises(ValueError, match="spill_elems = -1 must be >= 0"):
        PlanWithSpill(spill_elems=-1)
    assert PlanWithSpill(spill_elems=9).canonical().spill_elems == 7  # it changes nothing where nothing gathers
    assert plan.canonical() == plan
    assert plan.label == Plan(offload="cpu").label  # no label token declared


def test_a_field_without_a_knob_declaration_is_refused() -> None:
    @dataclass(frozen=True)
    class Bare(Plan):
        extra: int = 0

    with pytest.raises(TypeError, match="Bare.extra has no knob metadata"):
        knob_fields(Bare)


def test_knob_declarations_are_coherent() -> None:
    space_axes = {f.name for f in fields(SearchSpace)}
    for k in knob_fields(Plan):
        assert k.spec.flag and k.spec.flag.startswith("--"), k.name
        if k.spec.search_axis:
            assert k.spec.search_axis in space_axes, k.name
        if k.spec.applies:
            assert isinstance(getattr(Plan, k.spec.applies), property), k.name
        if k.spec.vector == "number":
            assert k.spec.unit, f"{k.name} needs a unit"
        if k.spec.choices:
            assert k.default in k.spec.choices, k.name
    with pytest.raises(ValueError, match="vector 'matrix'"):
        Knob(group="runtime", vector="matrix")
    with pytest.raises(ValueError, match="needs its choices"):
        Knob(group="build", vector="one_hot")


def test_validation_comes_from_the_declared_choices_and_minimums() -> None:
    with pytest.raises(ValueError, match="offload 'disk' is not one of none, cpu, nvme"):
        Plan(offload="disk")
    with pytest.raises(ValueError, match="weight bits 3 is not one of 16, 8, 4"):
        Plan(weight_bits=3)
    with pytest.raises(ValueError, match="tp = 0 must be >= 1"):
        Plan(tp=0)
    with pytest.raises(ValueError, match="max_live_elems = -1 must be >= 0"):
        Plan(max_live_elems=-1)


def test_labels_list_knob_tokens_in_display_order() -> None:
    assert [k.spec.group for k in display_order(Plan)] == sorted(
        (k.spec.group for k in knob_fields(Plan)), key=("build", "target", "runtime").index)
    assert Plan(offload="cpu", tp=2, weight_bits=4, kv_offload=True, batch_size=16).label == \
        "cpu+kv pinned tp2 pp1 dp1 w4 b16"
    assert Plan(pp=2, micro_batches=2, batch_size=4, pin_memory=False).label == "none tp1 pp2 dp1 w16 b4 mb2"
    assert Plan(kv_offload=True, pin_memory=False).label == "none+kv pageable tp1 pp1 dp1 w16 b1"
    # ZeRO-3 layer leaves are named where ZeRO-3 gathers; DeepSpeed's per-module default adds nothing
    assert Plan(offload="cpu", zero3_leaf="layer").label == "cpu pinned tp1 pp1 dp1 w16 b1 layer-leaves"
    assert Plan(dp=2, batch_size=2, zero3_leaf="layer").label == "none tp1 pp1 dp2 w16 b2 layer-leaves"
    assert Plan(zero3_leaf="layer").label == "none tp1 pp1 dp1 w16 b1"  # nothing gathered: the knob does nothing
