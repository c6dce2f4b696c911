"""hpi.executor.spec.RunSpec: the run conditions its Workload carries are the spec's own."""

from __future__ import annotations

import pytest

from hpi.executor.spec import RunSpec
from hpi.planner.specs.plan import Plan
from hpi.planner.specs.workload import Workload


def test_the_workload_prices_the_runs_own_dtype_and_fetch_wait():
    spec = RunSpec(plan=Plan(offload="cpu", batch_size=2), model="tiny-llama", workload=Workload(8, 3),
                   dtype="fp16", fetch_wait="host", variants=({"batch_size": 4},))
    assert (spec.workload.compute_dtype, spec.workload.fetch_wait) == ("fp16", "host")
    assert (spec.workload.prompt_len_tokens, spec.workload.gen_len_tokens) == (8, 3)
    back = RunSpec.from_dict(spec.to_dict())
    assert back == spec
    for measured in spec.measurements():  # every variant predicted under the same conditions
        assert (measured.workload.compute_dtype, measured.workload.fetch_wait) == ("fp16", "host")


def test_a_workload_that_disagrees_is_overruled_by_the_spec():
    spec = RunSpec(plan=Plan(), model="tiny-llama", workload=Workload(8, 3, compute_dtype="bf16", fetch_wait="host"),
                   dtype="fp32")
    assert (spec.workload.compute_dtype, spec.workload.fetch_wait) == ("fp32", "event")


def test_unknown_dtype_and_fetch_wait_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="dtype 'int8' is not one of bf16, fp16, fp32"):
        RunSpec(plan=Plan(), model="tiny-llama", dtype="int8")
    with pytest.raises(ValueError, match="fetch_wait 'sync' is not one of stream, host"):
        RunSpec(plan=Plan(), model="tiny-llama", fetch_wait="sync")


def test_stage_layer_counts_are_the_specs_own_or_the_planners_balanced_split():
    from hpi.planner.catalog import load_model
    from hpi.planner.cost.pipeline import stage_layer_sizes

    model = load_model("llama-3-8b")  # 32 layers
    balanced = RunSpec(plan=Plan(pp=3), model="llama-3-8b").stage_layer_counts(model)
    assert balanced == stage_layer_sizes(model, 3) and sum(balanced) == 32
    assert RunSpec(plan=Plan(pp=2), model="llama-3-8b", stage_layers=(20, 12)).stage_layer_counts(model) == (20, 12)
    with pytest.raises(ValueError, match=r"sum\(stage_layers \[20, 10\]\) = 30 != n_layers \(32\)"):
        RunSpec(plan=Plan(pp=2), model="llama-3-8b", stage_layers=(20, 10)).stage_layer_counts(model)


@pytest.mark.parametrize("gen_len,warmup_gen_len,tokens", [(32, 2, 2), (32, 0, 32), (1, 2, 1), (3, 8, 3)])
def test_a_warm_up_generates_its_own_length_clipped_to_the_workloads(gen_len, warmup_gen_len, tokens):
    spec = RunSpec(plan=Plan(), model="tiny-llama", workload=Workload(8, gen_len), warmup_steps=1,
                   warmup_gen_len=warmup_gen_len)
    assert spec.warmup_tokens == tokens
