"""autotune.runners: the DeepSpeedExamples baseline takes the one preset of its knobs."""

from __future__ import annotations

from hpi.autotune.runners import ds_examples_plan
from hpi.planner.specs.plan import Plan, ds_examples_knobs


def test_ds_examples_plan_is_cpu_offload_with_the_preset_knobs():
    plan = ds_examples_plan(8192, batch=4, pin_memory=False)
    assert plan == Plan(offload="cpu", pin_memory=False, batch_size=4, **ds_examples_knobs(8192))
    assert plan.prefetch_bucket_elems == plan.max_live_elems == 2 * 8192**2 and plan.persistence_threshold_elems == 8192
