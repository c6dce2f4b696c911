"""The cost model against the world: published ZeRO-Inference results and our own H100 measurements.

Uncalibrated predictions (profile ceilings, default efficiencies). Tolerances are stated per class and
are what the model earns today, not targets (calibration is issue 4):
- our H100 runs (docs/measured-facts.md): decode step within 10%. The bs 1 row set the profile's 0.62 streaming
  efficiency, so it checks consistency; the bs 16 row is held out.
- DeepSpeedExamples, weights from pinned CPU memory: throughput within 0.5x-1.5x, median error <= 40%.
  We under-predict (0.65-0.76x): its tuned knobs stream faster than DeepSpeed's defaults, whose 62%
  efficiency is our default.
- DeepSpeedExamples, pageable weights: 0.25x-1x. The workstation's pageable bandwidth is assumed (8 GB/s);
  the published numbers imply about twice that.
- DeepSpeedExamples with KV offload computes attention on the CPU; hpi models OffloadedCache (KV copied
  back to the GPU). Only the direction is asserted for multi-head models: more bytes over PCIe, slower.
"""

from __future__ import annotations

import statistics

import pytest

from hpi.planner.published import compare_all, load_runs, plan_for, run_class

COMPARISONS = compare_all()


def _rows(cls: str, source_prefix: str = "", metric: str | None = None):
    return [c for c in COMPARISONS if c.run_class == cls and c.run_id.startswith(source_prefix)
            and (metric is None or c.metric == metric)]


def test_every_deepspeed_run_on_a_shipped_profile_is_compared():
    ids = {c.run_id for c in COMPARISONS}
    expected = {r["id"] for r in load_runs() if r["system"].startswith("deepspeed") and r["hardware"].get("profile")
                and r["plan"].get("batch_size")}
    assert ids == expected
    assert len(ids) == 17


@pytest.mark.parametrize("c", _rows("pcie-pinned", "hpi-", "decode_step"), ids=lambda c: c.run_id)
def test_our_h100_decode_steps_within_10_percent(c):
    assert abs(c.error) <= 0.10, f"{c.run_id}: predicted {c.predicted:.3f} s vs measured {c.published:.3f} s"


@pytest.mark.parametrize("c", _rows("pcie-pinned", "dsx-"), ids=lambda c: c.run_id)
def test_zero_inference_pinned_throughput_within_half_to_one_and_a_half(c):
    assert 0.5 <= c.ratio <= 1.5, f"{c.run_id}: {c.predicted:.2f} vs {c.published:.2f} tok/s"


def test_zero_inference_pinned_median_error():
    errors = [abs(c.error) for c in _rows("pcie-pinned", "dsx-")]
    assert statistics.median(errors) <= 0.40


@pytest.mark.parametrize("c", _rows("pcie-pageable", "dsx-"), ids=lambda c: c.run_id)
def test_zero_inference_pageable_throughput_is_underpredicted_within_4x(c):
    assert 0.25 <= c.ratio <= 1.0, f"{c.run_id}: {c.predicted:.2f} vs {c.published:.2f} tok/s"


@pytest.mark.parametrize(
    "c", [c for c in _rows("kv-cpu-attention", "dsx-") if "llama" not in c.model], ids=lambda c: c.run_id
)
def test_kv_offload_by_copying_is_slower_than_cpu_attention_for_multi_head_models(c):
    assert c.ratio < 1.0


def test_plans_use_the_sources_knobs():
    run = next(r for r in load_runs() if r["id"] == "dsx-a6000-zinf-opt30b-w4")
    plan, workload = plan_for(run)
    assert (plan.offload, plan.weight_bits, plan.batch_size, plan.pin_memory) == ("cpu", 4, 24, True)
    assert plan.prefetch_bucket_elems == plan.max_live_elems == 2 * 7168**2
    assert plan.persistence_threshold_elems == 7168
    assert (workload.prompt_len_tokens, workload.gen_len_tokens) == (512, 32)
    assert run_class(run) == "pcie-pinned"
