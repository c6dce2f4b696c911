"""The hidden machine of --simulate: seeded, off the nominal profile, and its records are RunRecords."""

from __future__ import annotations

import numpy as np
import pytest

from hpi.autotune.simulate import HiddenMachine, SimulatedOutOfMemory, SimulatedRunner
from hpi.planner.catalog import load_model
from hpi.planner.predict import predict
from hpi.planner.profiles import load_profile
from hpi.planner.specs.plan import Plan
from hpi.planner.specs.workload import Workload
from hpi.records import RunRecord

MODEL, HW, WL = load_model("llama-3-8b"), load_profile("h100-sxm-1gpu"), Workload(512, 16)
PLAN = Plan(offload="cpu", batch_size=16)


def test_hidden_machine_is_seeded_and_spread_zero_is_the_planner():
    a, b, c = HiddenMachine(HW, 3), HiddenMachine(HW, 3), HiddenMachine(HW, 4)
    assert a.profile == b.profile and a.structural == b.structural
    assert a.profile.efficiency != c.profile.efficiency
    assert a.profile.efficiency != HW.efficiency
    flat = HiddenMachine(HW, 3, spread=0.0)
    assert flat.profile.efficiency == HW.efficiency
    est = predict(MODEL, flat.profile, WL, PLAN)
    assert flat.times(est) == pytest.approx((est.prefill_s, est.decode_step_s))


def test_late_factors_perturb_the_graphed_terms_and_leave_the_earlier_draws_alone(monkeypatch):
    import hpi.autotune.simulate as simulate

    m = HiddenMachine(HW, 3)
    eff, nominal = m.profile.efficiency, HW.efficiency
    for name, (lo, hi) in simulate.LATE_FACTOR_RANGES.items():
        assert lo <= getattr(eff, name) / getattr(nominal, name) <= hi, name
    assert set(simulate.LATE_FACTOR_RANGES) <= set(m.describe()["efficiency"])
    monkeypatch.setattr(simulate, "LATE_FACTOR_RANGES", {})  # as before they were added
    before = HiddenMachine(HW, 3)
    assert before.structural == m.structural
    assert all(before.factors[n] == m.factors[n] for n in simulate.FACTOR_RANGES)


def test_simulated_record_has_what_calibration_reads():
    runner = SimulatedRunner(MODEL, HiddenMachine(HW, 1), WL, "llama-3-8b")
    typed = runner.run(PLAN, None, None, {"trial": 0}, noise_key=0)
    assert RunRecord.from_json(typed.to_json()) == typed
    record = typed.to_json()  # the document a trial file keeps
    assert record["kind"] == "hpi.RunRecord" and record["simulated"] and record["device"] == "cuda"
    assert record["plan"] == PLAN.to_dict() and record["model"]["name"] == "llama-3-8b"
    assert record["spec"]["workload"] == {"prompt_len_tokens": 512, "gen_len_tokens": 16}
    assert set(record["decode_step_s"]) >= {"median", "p90"} and len(record["decode_step_s"]["all"]) == 15
    assert record["throughput_tok_s"] == pytest.approx(16 * 16 / record["total_s"])
    assert record["ranks"][0]["peak_allocated_bytes"] > 0 and record["predicted"]["plan"] == PLAN.to_dict()
    again = runner.run(PLAN, None, None, {"trial": 0}, noise_key=0)
    assert again.timings.decode_step_s.median_s == typed.timings.decode_step_s.median_s  # seeded noise
    calibrate = pytest.importorskip("hpi.planner.calibrate")
    m = calibrate.measurement(typed)
    assert m.decode_step_s == record["decode_step_s"]["median"] and m.peak_gpu_bytes > 0


def test_a_plan_the_hidden_machine_cannot_hold_runs_out_of_memory():
    runner = SimulatedRunner(MODEL, HiddenMachine(HW, 1), WL, "llama-3-8b")
    with pytest.raises(SimulatedOutOfMemory, match="out of memory") as info:
        runner.run(Plan(batch_size=4096), None, None, {})
    assert info.value.where == "gpu"


def test_inverted_u_throughput_against_batch_near_full_memory():
    """The effects the planner lacks bend throughput down near full GPU memory on some hidden machines."""
    from hpi.autotune.simulate import true_plan_values

    bent = 0
    for seed in range(6):
        machine = HiddenMachine(HW, seed)
        batches = [2**k for k in range(0, 12)]
        values = true_plan_values(machine, MODEL, WL, [Plan(batch_size=b) for b in batches], "throughput")
        fits = [v for v in values if v > 0]
        bent += int(np.argmax(fits) < len(fits) - 1)
    assert bent >= 1
