"""The search space: derived from the planner's top plans, and trial parameters <-> Plan round-trip."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from optuna.trial import FixedTrial

from hpi.autotune.space import Config, Space, derive_space, grid, params_of, plan_key, suggest_plan
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
        assert plan_key(suggest_plan(FixedTrial(params), space)) == plan_key(plan), params
    with pytest.raises(ValueError, match="not in this study's space"):
        params_of(Plan(offload="none", tp=8), replace(space, configs=(Config("cpu", 1, 1, 1, 4),)))
