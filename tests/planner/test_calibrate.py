"""hpi.planner.calibrate: records in, coefficients out; the profile's calibrated: section round-trips.

The fit is checked on synthetic records (the cost model's own predictions with known coefficients,
tests/conftest.py): it must recover them, leave what no record moves at its prior, and report
errors that match its own predictions.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from hpi.planner.calibrate import (
    CANDIDATES,
    CalibrationError,
    apply,
    calibrate,
    fit,
    measurement,
    plan_key,
    predict_measurements,
    prior_weight,
    render_section,
    replace_section,
    split_by_plan,
    summarize,
    write_section,
)
from hpi.planner.profiles import ProfileError, clear_cache, load_profile
from hpi.planner.specs.hardware import is_fraction
from hpi.record_files import load_records
from hpi.records import RecordError, RunRecord

PROFILE_FILE = Path(__file__).resolve().parents[2] / "src" / "planner" / "hardware_profiles" / "h200-2gpu.yaml"


@pytest.fixture(scope="module")
def recovered(synth):
    """One fit of the synthetic records (module-scoped: a fit takes a second or two)."""
    records = list(synth.records().values())
    return synth, records, fit(load_profile(synth.PROFILE, calibrated=False), records)


# ---- the fit -----------------------------------------------------------------------------------------


def test_fit_recovers_the_coefficients_the_records_were_made_with(recovered) -> None:
    synth, records, cal = recovered
    for name, true in synth.TRUE.items():
        assert name in cal.values, f"{name} not fitted"
        assert cal.values[name] == pytest.approx(true, rel=0.02), name
    assert cal.error_after.max_ape < 0.01
    assert cal.error_before.median_ape > 0.05  # the priors were off
    assert cal.record_ids == tuple(synth.PLANS)


def test_coefficients_no_record_moves_stay_exactly_at_their_prior(recovered) -> None:
    synth, _, cal = recovered
    prior = load_profile(synth.PROFILE, calibrated=False).efficiency
    # No NVMe run, no compute-bound decode, no pipeline send that matters (even at 1000x its prior), and
    # allocated bytes never include the CUDA context.
    for name in ("nvme_read", "matmul_decode", "p2p_latency_s", "gpu_reserved_bytes"):
        assert name in cal.unidentified and name not in cal.values
    profile = apply(load_profile(synth.PROFILE, calibrated=False), cal)
    for name in cal.unidentified:
        assert getattr(profile.efficiency, name) == getattr(prior, name)
    assert set(cal.values) | set(cal.unidentified) == set(CANDIDATES)
    assert all(cal.support[n] >= 1 for n in cal.values)


def test_apply_marks_calibrated_provenance_and_calibrate_is_fit_then_apply(recovered) -> None:
    synth, records, cal = recovered
    prior = load_profile(synth.PROFILE, calibrated=False)
    profile = apply(prior, cal)
    assert profile.provenance["efficiency.h2d_stream_pinned"].source == "calibrated"
    assert profile.provenance["gpu.bf16_flops"] == prior.provenance["gpu.bf16_flops"]
    assert profile.efficiency.h2d_stream_pinned == cal.values["h2d_stream_pinned"]
    assert calibrate(prior, records[:3]).efficiency == apply(prior, fit(prior, records[:3])).efficiency


def test_errors_are_what_the_fitted_profile_predicts(recovered) -> None:
    synth, records, cal = recovered
    preds = predict_measurements(apply(load_profile(synth.PROFILE, calibrated=False), cal), records)
    again = summarize(preds)
    assert again.median_ape == pytest.approx(cal.error_after.median_ape)
    assert again.max_ape == pytest.approx(cal.error_after.max_ape)
    errors = sorted(abs(p.predicted[m] / p.measured[m] - 1) for p in preds for m in p.measured)
    assert again.max_ape == pytest.approx(errors[-1])


def test_one_unexplained_run_does_not_drag_the_fit(synth) -> None:
    """A record measured 2x slower than anything the model can make of it (an unexplained gap, like the
    TP 2 offload run) costs its own error, not everyone else's: the robust loss holds the rest."""
    records = synth.records()
    records["8b-cpu-pinned"] = synth.record("8b-cpu-pinned", *synth.PLANS["8b-cpu-pinned"], synth.true_profile(),
                                            scale=2.0)
    cal = fit(load_profile(synth.PROFILE, calibrated=False), list(records.values()))
    for name in ("layer_overhead_s", "step_overhead_s", "matmul_prefill", "h2d_stream_pageable"):
        assert cal.values[name] == pytest.approx(synth.TRUE[name], rel=0.05), name


def test_measured_priors_pull_harder_than_assumed_ones() -> None:
    prior = load_profile("h200-2gpu", calibrated=False)
    assert prior.provenance["efficiency.allreduce_latency_s"].source == "probed"  # run6-probe, graphed all-reduce
    assert prior.provenance.get("efficiency.layer_overhead_s") is None  # the assumed default
    assert prior_weight(prior, "allreduce_latency_s") > 2 * prior_weight(prior, "layer_overhead_s")


def test_fit_refuses_nothing_and_unknown_coefficients() -> None:
    prior = load_profile("h200-2gpu", calibrated=False)
    with pytest.raises(CalibrationError, match="no RunRecords"):
        fit(prior, [{"baseline": "hf", "decode_step_s": 1.0}])
    with pytest.raises(CalibrationError, match="unknown coefficient 'pcie_magic'"):
        fit(prior, [], coefficients=("pcie_magic",))


# ---- records -----------------------------------------------------------------------------------------


def test_load_records_reads_files_bundles_lists_and_folders_and_counts_skips(synth, tmp_path) -> None:
    recs = synth.records(names=["8b-resident", "tiny-resident", "8b-cpu-pinned"])
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "deep").mkdir()
    (tmp_path / "a" / "record.json").write_text(json.dumps(recs["8b-resident"].to_json()))
    bundle = {"tiny": recs["tiny-resident"].to_json(), "base-hf": {"baseline": "hf", "decode_step_s": 0.05},
              "broken": {"error": "RuntimeError: CUDA out of memory"}}
    (tmp_path / "a" / "deep" / "bundle.json").write_text(json.dumps(bundle))
    (tmp_path / "list.json").write_text(json.dumps([recs["8b-cpu-pinned"].to_json(), {"note": "not a record"}]))
    out = load_records([tmp_path])
    assert [r.record_id for r in out] == ["bundle/tiny", "a/record", "list[0]"]  # sorted paths: a/deep/ < a/record
    assert out.skipped == {"baseline": 1, "error": 1, "not a RunRecord": 1}
    assert len(load_records(tmp_path / "a" / "record.json")) == 1
    with pytest.raises(RecordError, match="does not exist"):
        load_records([tmp_path / "missing.json"])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RecordError, match="malformed JSON at line 1"):
        load_records([tmp_path / "bad.json"])


def test_measurement_reads_the_figures_calibration_compares(synth) -> None:
    rec = synth.records(names=["8b-tp2-resident"])["8b-tp2-resident"]
    fuller = replace(rec.ranks[1], peak_allocated_bytes=rec.ranks[1].peak_allocated_bytes + 1000)
    rec = replace(rec, ranks=(rec.ranks[0], fuller))  # the fuller rank counts
    m = measurement(rec)
    assert m.record_id == "8b-tp2-resident" and m.model.name == "llama-3-8b" and m.plan.tp == 2
    assert m.decode_step_s == rec.timings.decode_step_s.median_s and m.prefill_s == rec.timings.prefill_s
    assert m.peak_gpu_bytes == rec.ranks[1].peak_allocated_bytes


def test_a_model_outside_the_catalogue_names_the_record_and_the_fix(synth) -> None:
    rec = synth.records(names=["8b-resident"])["8b-resident"]
    rec = replace(rec, model=replace(rec.model, name="llama-9-900b"), spec={**rec.spec, "model": "llama-9-900b"})
    with pytest.raises(CalibrationError, match=r"record 8b-resident: model 'llama-9-900b' is not in the catalogue"):
        measurement(rec)


def test_split_by_plan_holds_repeats_out_together_and_is_seeded(synth) -> None:
    recs = synth.records()
    repeat = replace(recs["8b-resident"], entry={"name": "8b-resident-again"})
    ms = [measurement(r) for r in [*recs.values(), repeat]]
    train, held = split_by_plan(ms, 0.25, seed=3)
    assert len({plan_key(m) for m in held}) == 3  # ceil(0.25 * 9 plans)
    assert not {plan_key(m) for m in held} & {plan_key(m) for m in train}
    assert len(train) + len(held) == len(ms)
    again = split_by_plan(ms, 0.25, seed=3)
    assert [m.record_id for m in again[1]] == [m.record_id for m in held]
    assert split_by_plan(ms, 0.0) == (ms, [])
    assert len(split_by_plan(ms[:2], 0.9)[0]) == 1  # always something to fit on
    with pytest.raises(CalibrationError, match=r"holdout fraction 1.5 must be in \[0, 1\)"):
        split_by_plan(ms, 1.5)


# ---- the profile's calibrated: section ----------------------------------------------------------------


def _copy_profile(tmp_path: Path, tail: str = "") -> Path:
    path = tmp_path / "h200-2gpu.yaml"
    shutil.copy(PROFILE_FILE, path)
    if tail:
        path.write_text(path.read_text() + tail)
    return path


def test_section_round_trips_and_leaves_the_rest_byte_identical(recovered, tmp_path) -> None:
    synth, _, cal = recovered
    path = _copy_profile(tmp_path)
    original = path.read_text()
    block = render_section(cal, date="2026-11-22", records=["benchmarks/results/x.json"])
    write_section(path, block)
    text = path.read_text()
    assert text.startswith(original) and text.endswith(block)
    clear_cache()
    profile = load_profile(str(path))
    for name, value in cal.values.items():
        assert getattr(profile.efficiency, name) == pytest.approx(value, rel=1e-5)
        assert profile.provenance[f"efficiency.{name}"].source == "calibrated"
    assert profile.raw["calibrated"]["record_ids"] == list(cal.record_ids)
    # Uncalibrated: the calibrated: section is ignored.
    assert (load_profile(str(path), calibrated=False).efficiency
            == load_profile("h200-2gpu", calibrated=False).efficiency)
    # Rewriting replaces the block, nothing else.
    write_section(path, block.replace('date: "2026-11-22"', 'date: "2026-12-01"'))
    assert path.read_text() == original + "\n" + block.replace('date: "2026-11-22"', 'date: "2026-12-01"')


def test_a_section_in_the_middle_is_replaced_in_place(recovered, tmp_path) -> None:
    _, _, cal = recovered
    before = "name: x\n# a comment\ncalibrated:\n  date: old\n  coefficients: {}\n\n"
    after = "# trailing comment\nnode:\n  gpus: 1\n"
    text = before + after
    block = render_section(cal, date="2026-11-22")
    new = replace_section(text, block)
    assert new == "name: x\n# a comment\n" + block + "\n" + after
    assert replace_section("a: 1", block) == "a: 1\n\n" + block


def test_section_values_must_say_calibrated(tmp_path) -> None:
    path = _copy_profile(tmp_path, "\ncalibrated:\n  coefficients:\n    hbm: {value: 0.7, source: measured, note: x}\n")
    clear_cache()
    with pytest.raises(ProfileError, match=r"calibrated.coefficients.hbm.source: 'measured' in the calibrated section"):
        load_profile(str(path))
    path.write_text(PROFILE_FILE.read_text()
                    + "\ncalibrated:\n  coefficients:\n    hbm: {value: 1.7, source: calibrated}\n")
    clear_cache()
    with pytest.raises(ProfileError, match=r"calibrated.coefficients.hbm.value: expected a finite number > 0 and <= 1"):
        load_profile(str(path))
    path.write_text(PROFILE_FILE.read_text() + "\ncalibrated:\n  when: today\n  coefficients: {}\n")
    clear_cache()
    with pytest.raises(ProfileError, match="calibrated.when: unknown field"):
        load_profile(str(path))


def test_calibration_modules_stay_pure() -> None:
    code = (
        "import sys, hpi.planner.calibrate, hpi.planner.validate, hpi.cli.calibrate, hpi.records\n"
        "bad = [m for m in ('torch', 'deepspeed', 'transformers', 'matplotlib') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_fitted_values_are_physical(recovered) -> None:
    _, _, cal = recovered
    for name, value in cal.values.items():
        assert value > 0
        if is_fraction(name):
            assert value <= 1.0, name
    assert dataclasses.asdict(cal.error_after)["n_records"] == len(cal.record_ids)


def test_an_autotune_trial_stands_for_the_run_record_it_holds(synth, tmp_path) -> None:
    """hpi autotune writes one hpi.AutotuneTrial per trial, its RunRecord under "record"; a failed trial
    (error, no record) is skipped as an error."""
    rec = synth.records(names=["8b-cpu-pinned"])["8b-cpu-pinned"]
    (tmp_path / "trial-0000.json").write_text(json.dumps({"kind": "hpi.AutotuneTrial", "trial": 0, "status": "ok",
                                                          "record": rec.to_json()}))
    (tmp_path / "trial-0001.json").write_text(json.dumps({"kind": "hpi.AutotuneTrial", "trial": 1,
                                                          "status": "failed", "error": "timeout"}))
    records = load_records(tmp_path)
    assert [r.record_id for r in records] == ["trial-0000"]
    assert records.skipped == {"error": 1}
    assert measurement(records[0]).decode_step_s == rec.timings.decode_step_s.median_s


def test_run_conditions_are_typed_and_default_to_what_old_records_ran() -> None:
    from hpi.planner.calibrate import run_conditions

    old = {"compute_dtype": "bf16", "fetch_wait": "host", "decode_graphs": False, "decode_compile": False,
           "fused_dequant": False, "skinny_gemm": False}
    assert run_conditions(RunRecord(spec={})) == old
    got = run_conditions(RunRecord(spec={"dtype": "fp16", "fetch_wait": "stream", "decode_graphs": True,
                                         "decode_compile": True, "fused_dequant": True, "skinny_gemm": True}))
    assert got == {"compute_dtype": "fp16", "fetch_wait": "stream", "decode_graphs": True, "decode_compile": True,
                   "fused_dequant": True, "skinny_gemm": True}
    assert run_conditions(RunRecord(spec={"decode_graphs": False}))["decode_graphs"] is False
