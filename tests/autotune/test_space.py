"""The search space: derived from the planner's top plans, and trial parameters <-> Plan round-trip."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
from optuna.trial import FixedTrial

from hpi.autotune.space import DiscretePlan, Space, derive_space, grid, params_of, run_key, suggest_plan
from hpi.planner.catalog import load_model
from hpi.planner.profiles import load_profile
from hpi.planner.specs.plan import Plan
from hpi.planner.specs.workload import Workload


@pytest.fixture(scope="module")
def target():
    return load_model("mixtral-8x7b"), load_profile("dgx-h100"), Workload()


def test_space_is_the_planners_top_feasible_plans(target):
    model, hw, wl = target
    space = derive_space(model, hw, wl, "throughput", top=4)
    assert len(space.configs) == 4 and len(set(space.configs)) == 4
    assert space.batch is None and space.batches()[-1] == 256
    assert space.prefetch_bucket_elems.low <= 50_000_000 <= space.prefetch_bucket_elems.high  # DeepSpeed's default
    assert 2 * model.hidden_size**2 in space.prefetch_bucket_elems.points  # DeepSpeedExamples'
    assert Space.from_dict(space.to_dict()) == space  # stored with the study, read back on resume


def test_restrictions_and_latency(target):
    model, hw, wl = target
    space = derive_space(model, hw, wl, "latency", restrict={"offloads": "cpu", "weight_bits": 16}, batch=4)
    assert {c.offload for c in space.configs} == {"cpu"} and {c.weight_bits for c in space.configs} == {16}
    assert space.batches() == (4,)
    with pytest.raises(ValueError, match="no feasible plan"):
        derive_space(load_model("llama-3.1-405b"), load_profile("rtx4090-wsl2"), wl, "throughput",
                     restrict={"offloads": "none", "weight_bits": 16})


def test_every_lattice_plan_round_trips_through_trial_parameters(target):
    model, hw, wl = target
    space = derive_space(model, hw, wl, "throughput", top=6, restrict={"offloads": ("none", "cpu", "nvme")})
    lattice = grid(space, model)
    rng = np.random.default_rng(0)
    rows = [(g, r) for g, k in enumerate(lattice.knobs) for r in rng.choice(k.n, size=min(k.n, 40), replace=False)]
    for g, r in rows:
        plan = lattice.plan(g, int(r))
        params = params_of(plan, space)
        assert run_key(suggest_plan(FixedTrial(params), space)) == run_key(plan), params
    with pytest.raises(ValueError, match="not in this study's space"):
        params_of(Plan(offload="none", tp=8), replace(space, configs=(DiscretePlan("cpu", 1, 1, 1, 4),)))


def test_a_discrete_plan_is_the_plans_build_knobs():
    from dataclasses import fields

    from hpi.planner.specs.knob import knob_fields

    assert [f.name for f in fields(DiscretePlan)] == [k.name for k in knob_fields(Plan) if k.spec.group == "build"]
    plan = Plan(offload="nvme", tp=2, pp=2, dp=2, weight_bits=8, batch_size=4, micro_batches=2)
    assert DiscretePlan.of(plan) == DiscretePlan("nvme", 2, 2, 2, 8) and DiscretePlan.of(plan).gathers
    assert DiscretePlan("none", 1, 1, 2, 16).gathers and not DiscretePlan("none", 4, 1, 1, 4).gathers


def _former_key(plan: Plan) -> tuple:
    """The key autotune grouped plans by before Plan.canonical: every knob that applies, by hand."""
    config = DiscretePlan.of(plan)
    key = [config, plan.batch_size, plan.kv_offload, plan.micro_batches]
    key.append(plan.pin_memory if plan.copies_from_host_memory else None)
    if config.gathers:
        key += [plan.prefetch_bucket_elems, plan.max_live_elems, plan.persistence_threshold_elems]
    if config.offload == "nvme":
        key += [plan.nvme_buffer_count, plan.nvme_buffer_elems, plan.aio_block_size_bytes, plan.aio_queue_depth]
    return tuple(key)


def test_run_key_groups_plans_as_the_hand_written_key_did(target):
    model, hw, wl = target
    space = derive_space(model, hw, wl, "throughput", top=6, restrict={"offloads": ("none", "cpu", "nvme")})
    lattice = grid(space, model)
    plans = [lattice.plan(g, r) for g, k in enumerate(lattice.knobs) for r in range(0, k.n, 7)]
    # the same plans with every knob that changes nothing moved off its value
    idle = [p.with_(pin_memory=not p.pin_memory) if not p.copies_from_host_memory else p for p in plans]
    idle = [p.with_(prefetch_bucket_elems=1, max_live_elems=2) if not p.gathers else p for p in idle]
    idle = [p.with_(nvme_buffer_count=3) if p.offload != "nvme" else p for p in idle]
    both = plans + idle
    for a, b in itertools.combinations(both[::5], 2):
        assert (run_key(a) == run_key(b)) == (_former_key(a) == _former_key(b)), (a, b)
    assert all(run_key(p) == run_key(q) for p, q in zip(plans, idle))


def test_nvme_configs_search_the_aio_block_size_queue_depth_and_threads(target):
    model, hw, wl = target
    space = derive_space(model, hw, wl, "throughput", top=2, restrict={"offloads": "nvme"})
    other = DiscretePlan("cpu", 1, 1, 1, 16)
    space, nvme = replace(space, configs=(*space.configs, other)), space.configs[0]
    plan = Plan(offload="nvme", tp=nvme.tp, pp=nvme.pp, dp=nvme.dp, weight_bits=nvme.weight_bits,
                batch_size=max(nvme.dp, 1), micro_batches=1, nvme_buffer_elems=space.nvme_buffer_elems.high,
                aio_block_size_bytes=8 << 20, aio_queue_depth=32, aio_threads=1)
    params = params_of(plan, space)
    assert (params["aio_block_size_bytes"], params["aio_queue_depth"], params["aio_threads"]) == (8 << 20, 32, 1)
    back = suggest_plan(FixedTrial(params), space)
    assert (back.aio_block_size_bytes, back.aio_queue_depth, back.aio_threads) == (8 << 20, 32, 1)
    with pytest.raises(ValueError, match="aio_queue_depth 3 is not one of"):
        params_of(plan.with_(aio_queue_depth=3), space)
    with pytest.raises(ValueError, match=r"aio_threads 4 is not one of this study's \(1, 8\)"):
        params_of(plan.with_(aio_threads=4), space)
    flat = Plan(offload=other.offload, tp=other.tp, pp=other.pp, dp=other.dp, weight_bits=other.weight_bits,
                batch_size=max(other.dp, 1))
    assert not any(name.startswith("aio_") for name in params_of(flat, space))
    # the lattice the planner ranks: the defaults alone without the probe's read grid (every choice predicts the
    # same), every choice for NVMe configs where the profile has one
    def settings(space):
        lattice = grid(space, model)
        plans = [lattice.plan(g, r) for g, k in enumerate(lattice.knobs) for r in range(0, k.n, 5)]
        return {(p.offload, p.aio_block_size_bytes, p.aio_queue_depth, p.aio_threads) for p in plans}

    assert {s[1:] for s in settings(space)} == {(1 << 20, 64, 8)}
    from hpi.autotune.space import aio_lattice_for
    from hpi.planner.specs.hardware import AioReadPoint

    gridded = replace(hw, nvme=replace(hw.nvme, read_grid=(AioReadPoint(1 << 20, 1, 1e9),)))
    space = replace(space, aio_lattice=aio_lattice_for(gridded))
    assert Space.from_dict(space.to_dict()) == space
    assert {s[1:] for s in settings(space) if s[0] != "nvme"} == {(1 << 20, 64, 8)}
    assert {s[1:] for s in settings(space) if s[0] == "nvme"} == set(itertools.product(
        (1 << 20, 4 << 20, 8 << 20, 16 << 20), (8, 32, 64, 128), (1, 8)))
    # a study stored before the lattice held the thread count: its (block, depth) points at the default 8 threads
    stored = space.to_dict() | {"aio_lattice": [[1 << 20, 64], [4 << 20, 8]]}
    assert Space.from_dict(stored).aio_lattice == ((1 << 20, 64, 8), (4 << 20, 8, 8))


def test_zero3_leaves_are_tuned_where_zero3_gathers_and_not_from_nvme(target):
    model, hw, wl = target
    space = derive_space(model, hw, wl, "throughput", top=2, restrict={"offloads": "cpu"})
    assert space.zero3_leaves == ("module", "layer") and all(c.tunes_leaf for c in space.configs)
    cpu = space.configs[0]
    plan = Plan(offload="cpu", tp=cpu.tp, pp=cpu.pp, dp=cpu.dp, weight_bits=cpu.weight_bits, batch_size=cpu.dp,
                zero3_leaf="layer")
    params = params_of(plan, space)
    assert params["zero3_leaf"] == "layer" and suggest_plan(FixedTrial(params), space).zero3_leaf == "layer"
    lattice = grid(space, model)
    leaves = {lattice.plan(g, r).zero3_leaf for g, k in enumerate(lattice.knobs) for r in range(k.n)}
    assert leaves == {"module", "layer"}
    # a resident plan without dp gathers nothing, an NVMe one swaps a leaf's parameters in together: no choice
    assert not DiscretePlan("none", 1, 1, 1, 16).tunes_leaf and not DiscretePlan("nvme", 1, 1, 1, 16).tunes_leaf
    nvme = derive_space(model, hw, wl, "throughput", top=1, restrict={"offloads": "nvme"})
    nplan = Plan(offload="nvme", tp=nvme.configs[0].tp, pp=nvme.configs[0].pp, dp=nvme.configs[0].dp,
                 weight_bits=nvme.configs[0].weight_bits, batch_size=nvme.configs[0].dp,
                 nvme_buffer_elems=nvme.nvme_buffer_elems.high)
    assert "zero3_leaf" not in params_of(nplan, nvme)
    assert suggest_plan(FixedTrial(params_of(nplan, nvme)), nvme).zero3_leaf == "module"
    # restricted by the flag; a study stored before the knob resumes with DeepSpeed's per-module leaves
    only = derive_space(model, hw, wl, "throughput", top=1, restrict={"offloads": "cpu", "zero3_leaves": "layer"})
    assert only.zero3_leaves == ("layer",) and suggest_plan(
        FixedTrial(params_of(plan, only)), only).zero3_leaf == "layer"
    stored = {k: v for k, v in space.to_dict().items() if k != "zero3_leaves"}
    assert Space.from_dict(stored).zero3_leaves == ("module",)
    with pytest.raises(ValueError, match=r"zero3_leaf layer is not one of this study's \('module',\)"):
        params_of(plan, Space.from_dict(stored))
