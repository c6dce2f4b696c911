"""``hpi validate`` and ``hpi calibrate`` (hpi.cli.calibrate, hpi.planner.validate) on a small fixture of
synthetic records: leave-one-plan-out never fits on the held-out run, the JSON line equals an independent
computation, bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import json
import re
import shutil
import statistics
from dataclasses import replace
from pathlib import Path

import pytest

from hpi.cli import main
from hpi.planner.calibrate import METRICS, apply, fit, measurement, plan_key
from hpi.planner.catalog import load_model
from hpi.planner.predict import predict
from hpi.planner.profiles import clear_cache, load_profile
from hpi.planner.validate import leave_one_plan_out, load_manifest, validate
from hpi.record_files import load_records

PROFILE_FILE = Path(__file__).resolve().parents[2] / "src" / "planner" / "hardware_profiles" / "h200-2gpu.yaml"
# Measured = the model's prediction with the true coefficients times a per-run factor (run-to-run noise).
FIXTURE = {"8b-resident": 1.00, "8b-pp2-resident": 1.04, "8b-cpu-pinned": 0.97, "8b-cpu-pageable": 1.02}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory, synth) -> Path:
    """records/ with one bundle (a run repeated, one record naming the wrong profile) and a manifest."""
    root = tmp_path_factory.mktemp("fidelity")
    truth = synth.true_profile()
    bundle = {n: synth.record(n, *synth.PLANS[n], truth, scale=s).to_json() for n, s in FIXTURE.items()}
    bundle["8b-resident-again"] = synth.record("8b-resident-again", *synth.PLANS["8b-resident"], truth, scale=1.06,
                                               hardware="h100-sxm-1gpu").to_json()
    bundle["base-hf"] = {"baseline": "hf", "decode_step_s": 0.05}
    (root / "records").mkdir()
    (root / "records" / "session.json").write_text(json.dumps(bundle))
    (root / "validation").mkdir()
    (root / "validation" / "fidelity_set.yaml").write_text(
        "records:\n  - path: records/*.json\n    profile: h200-2gpu\n    note: fixture\nexclude: []\n")
    return root


@pytest.fixture(scope="module")
def manifest_path(fixture_dir) -> Path:
    return fixture_dir / "validation" / "fidelity_set.yaml"


def _allocated(est) -> float:
    return est.gpu_peak_bytes - est.gpu_memory_parts["framework"]


def _independent(fixture_dir: Path) -> dict:
    """The summary recomputed from predict() and fit() directly: no hpi.planner.validate code."""
    records = load_records(fixture_dir / "records")
    prior = load_profile("h200-2gpu", calibrated=False)
    ms = [measurement(r) for r in records]
    errors = {"calibrated": {m: [] for m in METRICS}, "uncalibrated": {m: [] for m in METRICS}}
    for m in ms:
        others = [o for o in ms if plan_key(o) != plan_key(m)]
        hw = apply(prior, fit(prior, others))
        for label, profile in (("uncalibrated", prior), ("calibrated", hw)):
            est = predict(load_model(m.model.name), profile, m.workload, m.plan)
            predicted = {"decode_step_s": est.decode_step_s, "prefill_s": est.prefill_s,
                         "peak_gpu_bytes": _allocated(est)}
            for metric in METRICS:
                errors[label][metric].append(abs(predicted[metric] / m.measured(metric) - 1))

    def stats(by_metric):
        every = [e for v in by_metric.values() for e in v]
        return every, {k: (statistics.median(v), max(v)) for k, v in by_metric.items()}

    return {label: stats(by_metric) for label, by_metric in errors.items()}


def test_leave_one_plan_out_never_fits_on_the_held_out_run(fixture_dir) -> None:
    ms = [measurement(r) for r in load_records(fixture_dir / "records")]
    calls: list[tuple[str, ...]] = []

    def spy(prior, train):
        calls.append(tuple(m.record_id for m in train))
        return fit(prior, train)

    rows, folds = leave_one_plan_out("h200-2gpu", ms, fitter=spy)
    assert len(folds) == 4 == len(calls)  # 5 records, 4 plans: the repeat goes with its plan
    for fold, train_ids in zip(folds, calls):
        assert fold.train_ids == train_ids
        assert not set(fold.held_out_ids) & set(train_ids)
        held_keys = {plan_key(m) for m in ms if m.record_id in fold.held_out_ids}
        assert len(held_keys) == 1
        assert not held_keys & {plan_key(m) for m in ms if m.record_id in train_ids}
    resident = next(f for f in folds if "session/8b-resident" in f.held_out_ids)  # <file stem>/<entry>
    assert set(resident.held_out_ids) == {"session/8b-resident", "session/8b-resident-again"}
    assert {r.record_id for r in rows} == {m.record_id for m in ms}
    assert len(rows) == 5 * len(METRICS)


def test_manifest_profile_overrides_what_a_record_names(fixture_dir, manifest_path) -> None:
    result = validate(load_manifest(manifest_path))
    assert {r.profile for r in result.rows} == {"h200-2gpu"}  # not h100-sxm-1gpu, which one record names
    assert result.skipped == {"baseline": 1}
    assert load_manifest(manifest_path).root == fixture_dir


def test_validate_json_last_line_equals_an_independent_computation(capsys, fixture_dir, manifest_path) -> None:
    code, out, err = run(capsys, "validate", "--manifest", str(manifest_path), "--json")
    assert code == 0, err
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["n_plans"] == 4 and doc["n_records"] == 5 and doc["profiles"] == {"h200-2gpu": 5}
    want = _independent(fixture_dir)
    for label, part in (("calibrated", doc), ("uncalibrated", doc["uncalibrated"])):
        every, by_metric = want[label]
        assert part["median_ape"] == pytest.approx(statistics.median(every), rel=1e-6, abs=1e-9)
        assert part["max_ape"] == pytest.approx(max(every), rel=1e-6)
        for metric, (median, worst) in by_metric.items():
            assert part["by_metric"][metric]["median_ape"] == pytest.approx(median, rel=1e-6, abs=1e-9)
            assert part["by_metric"][metric]["max_ape"] == pytest.approx(worst, rel=1e-6, abs=1e-9)
            assert part["by_metric"][metric]["n"] == 5
    # The priors are off, the fit on the other plans is not: calibration must help on this fixture.
    assert doc["median_ape"] < doc["uncalibrated"]["median_ape"]
    assert "8b-cpu-pageable" in out and "leave-one-plan-out" in out


def test_validate_names_a_rerun_kept_under_the_stem_of_an_earlier_run_by_its_folder(fixture_dir, tmp_path) -> None:
    """Two record files of one stem in two folders (a rerun kept beside the first, as 2026-12-02's callA-first/ and
    callB/): every record is validated, named with its folder, not refused as a duplicate."""
    for folder in ("callA", "callB"):
        (tmp_path / "records" / folder).mkdir(parents=True)
        shutil.copy(fixture_dir / "records" / "session.json", tmp_path / "records" / folder / "session.json")
    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / "fidelity_set.yaml").write_text(
        "records:\n  - path: records/*/*.json\n    profile: h200-2gpu\n    note: rerun\nexclude: []\n")
    result = validate(load_manifest(tmp_path / "validation" / "fidelity_set.yaml"))
    ids = {r.record_id for r in result.rows}
    assert {"callA/session/8b-resident", "callB/session/8b-resident"} <= ids
    assert len(ids) == 10 and result.skipped == {"baseline": 2}


@pytest.mark.parametrize("fitter", [None, fit], ids=["process-pool", "in-order"])
def test_validate_reports_each_phase_and_each_fitted_plan(fixture_dir, manifest_path, fitter) -> None:
    calls: list[tuple[str, int, int]] = []
    result = validate(load_manifest(manifest_path), fitter=fitter, progress=lambda *call: calls.append(call))
    phases: dict[str, list[tuple[int, int]]] = {}
    for phase, done, total in calls:
        phases.setdefault(phase, []).append((done, total))
    assert list(phases) == ["read", "fit", "predict", "unlisted"]  # in this order, each phase once
    assert phases["read"] == [(0, 1), (1, 1)]  # one record file (a bundle)
    assert phases["fit"] == [(i, 4) for i in range(5)]  # 4 plans, each fitted on the other 3: counted one by one
    assert phases["predict"] == [(0, 1), (1, 1)]  # one machine
    assert phases["unlisted"] == [(0, 1), (1, 1)]
    assert len(result.folds) == 4


def test_validate_shows_progress_on_stderr_and_keeps_stdout_for_its_results(capsys, manifest_path) -> None:
    code, out, err = run(capsys, "validate", "--manifest", str(manifest_path), "--json")
    assert code == 0, err
    lines = [re.sub(r" \[(\d+m)?\d+s\]$", "", line) for line in err.splitlines()]  # less the time taken
    assert lines == [*[f"hpi validate: fitting held-out plans: {i}/4" for i in range(5)],  # after reading the input
                     "hpi validate: predicting every record", "hpi validate: looking for records the manifest misses"]
    assert "hpi validate" not in out and json.loads(out.strip().splitlines()[-1])["n_plans"] == 4


def test_validate_plot_writes_a_png(capsys, manifest_path, tmp_path) -> None:
    png = tmp_path / "fidelity.png"
    code, out, err = run(capsys, "validate", "--manifest", str(manifest_path), "--plot", str(png))
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validate_records_flag_uses_the_manifest_for_profiles(capsys, fixture_dir, manifest_path) -> None:
    code, out, err = run(capsys, "validate", "--manifest", str(manifest_path), "--records",
                         str(fixture_dir / "records" / "session.json"), "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["profiles"] == {"h200-2gpu": 5}


@pytest.mark.parametrize("argv,message", [
    (["validate", "--records", "/nonexistent/records"], "does not exist"),
    (["calibrate", "/nonexistent/record.json", "--hardware", "h200-2gpu"], "does not exist"),
    (["calibrate", "RECORDS", "--hardware", "no-such-machine"], "unknown hardware profile"),
    (["calibrate", "RECORDS", "--hardware", "h200-2gpu", "--holdout", "1.5"], "holdout fraction 1.5"),
    (["validate", "--manifest", "BROKEN"], "broken.yaml:2: malformed YAML"),
])  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(capsys, fixture_dir, tmp_path, argv, message) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("records: x\n  bad: [\n")
    argv = [str(fixture_dir / "records") if a == "RECORDS" else str(broken) if a == "BROKEN" else a for a in argv]
    out_file = tmp_path / "p.yaml"
    shutil.copy(PROFILE_FILE, out_file)
    if argv[0] == "calibrate":
        argv += ["--out", str(out_file)]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err
    assert out_file.read_text() == PROFILE_FILE.read_text()  # nothing written


def test_a_record_of_a_model_outside_the_catalogue_is_refused(capsys, synth, tmp_path) -> None:
    rec = synth.record("odd", *synth.PLANS["8b-resident"], synth.true_profile())
    rec = replace(rec, model=replace(rec.model, name="gpt-7-1t"), spec={**rec.spec, "model": "gpt-7-1t"})
    (tmp_path / "odd.json").write_text(json.dumps(rec.to_json()))
    code, _, err = run(capsys, "validate", "--records", str(tmp_path))
    assert code == 2 and "model 'gpt-7-1t' is not in the catalogue" in err and len(err.strip().splitlines()) == 1


def test_calibrate_writes_the_section_and_reports_held_out_errors(capsys, fixture_dir, tmp_path) -> None:
    out_file = tmp_path / "h200-2gpu.yaml"
    shutil.copy(PROFILE_FILE, out_file)
    code, out, err = run(capsys, "calibrate", str(fixture_dir / "records"), "--hardware", "h200-2gpu",
                         "--out", str(out_file), "--holdout", "0.25", "--seed", "1", "--date", "2026-11-22", "--json")
    assert code == 0, err
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["records"] == 5 and doc["skipped"] == {"baseline": 1}
    assert len(doc["held_out_ids"]) >= 1 and not set(doc["held_out_ids"]) & set(doc["train_ids"])
    assert doc["held_out"]["after"]["n_records"] == len(doc["held_out_ids"])
    assert doc["records_naming_other_profiles"] == ["h100-sxm-1gpu"]
    text = out_file.read_text()
    assert text.startswith(PROFILE_FILE.read_text())
    clear_cache()
    raw = load_profile(str(out_file)).raw["calibrated"]
    assert raw["held_out"] == doc["held_out_ids"] and raw["record_ids"] == doc["train_ids"]
    assert raw["date"] == "2026-11-22" and raw["seed"] == 1
    assert raw["error_after"]["n_records"] == len(doc["held_out_ids"])
    for name, c in doc["coefficients"].items():
        assert raw["coefficients"][name]["source"] == "calibrated"
        assert float(raw["coefficients"][name]["value"]) == pytest.approx(c["value"], rel=1e-5)
    # The human-readable run prints the tables and rewrites the same block.
    code, out, err = run(capsys, "calibrate", str(fixture_dir / "records"), "--hardware", "h200-2gpu",
                         "--out", str(out_file), "--holdout", "0", "--date", "2026-11-22")
    assert code == 0, err
    assert "coefficients of h200-2gpu" in out and "left at their prior" in out
    assert out_file.read_text().startswith(PROFILE_FILE.read_text()) and out_file.read_text().count("calibrated:") == 1


def test_repeatability_is_each_repeat_against_the_plans_other_runs(fixture_dir, manifest_path) -> None:
    """The fixture measures 8b-resident twice, at 1.00x and 1.06x the truth: the floor any predictor of that
    plan faces is |1.06 - 1| and |1 / 1.06 - 1|; the single-run plans add nothing; memory is not scaled."""
    result = validate(load_manifest(manifest_path))
    floor = result.repeatability()
    for metric in ("decode_step_s", "prefill_s"):
        assert floor[metric]["n"] == 2
        assert floor[metric]["max_ape"] == pytest.approx(0.06, rel=1e-6)
        assert floor[metric]["median_ape"] == pytest.approx((0.06 + (1 - 1 / 1.06)) / 2, rel=1e-6)
    assert floor["peak_gpu_bytes"]["max_ape"] == pytest.approx(0.0, abs=1e-12)
    doc = result.summary()
    assert doc["repeatability"] == floor
    # No fixture record is graphed: every decode row is eager, and the eager split equals the whole metric.
    modes = doc["decode_by_mode"]
    assert modes["graphed"]["calibrated"]["n"] == 0
    assert modes["eager"]["calibrated"] == doc["by_metric"]["decode_step_s"]
    assert modes["eager"]["uncalibrated"] == doc["uncalibrated"]["by_metric"]["decode_step_s"]
    assert modes["eager"]["repeatability"] == floor["decode_step_s"]


def test_repeat_errors_group_by_machine_and_plan() -> None:
    from hpi.planner.validate import Row, repeat_errors

    def row(profile: str, key: str, measured: float, metric: str = "decode_step_s") -> Row:
        return Row("r", profile, "m", "p", metric, measured, measured, measured, key)

    rows = [row("a", "k1", 10.0), row("a", "k1", 12.0), row("a", "k1", 11.0), row("b", "k1", 30.0),
            row("a", "k2", 5.0), row("a", "k1", 99.0, metric="prefill_s")]
    # k1 on a: 10 vs median(12, 11) = 11.5; 12 vs 10.5; 11 vs 11. The H200's lone k1 and k2 have no repeat.
    assert sorted(repeat_errors(rows, "decode_step_s")) == pytest.approx(sorted([abs(10 / 11.5 - 1),
                                                                                 abs(12 / 10.5 - 1), 0.0]))
    assert repeat_errors(rows, "prefill_s") == []


CPU_RECORD = Path(__file__).resolve().parent / "data" / "tiny-llama-cpu.record.json"


def test_out_is_checked_before_anything_is_written(capsys, fixture_dir, tmp_path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: broken\ngpu: [unclosed\n")
    code, _, err = run(capsys, "calibrate", str(fixture_dir / "records"), "--hardware", "h200-2gpu",
                       "--out", str(broken))
    assert code == 2 and "is not a profile that loads" in err and len(err.strip().splitlines()) == 1
    assert broken.read_text() == "name: broken\ngpu: [unclosed\n"  # left as it was
    code, _, err = run(capsys, "calibrate", str(fixture_dir / "records"), "--hardware", "h200-2gpu",
                       "--out", str(tmp_path / "other-name.yaml"))  # a copy named otherwise would not load
    assert code == 2 and "must equal the file name" in err and not (tmp_path / "other-name.yaml").exists()
    fresh = tmp_path / "new" / "folder" / "h200-2gpu.yaml"  # a new file: the profile's text, then the section
    code, out, err = run(capsys, "calibrate", str(fixture_dir / "records"), "--hardware", "h200-2gpu",
                         "--out", str(fresh), "--holdout", "0", "--json")
    assert code == 0, err
    assert fresh.read_text().startswith(PROFILE_FILE.read_text()) and fresh.read_text().count("calibrated:") == 1
    clear_cache()
    assert load_profile(str(fresh)).raw["calibrated"]["record_ids"] == json.loads(out)["train_ids"]


def test_a_record_of_another_device_is_refused_unless_allowed(capsys, tmp_path) -> None:
    out_file = tmp_path / "h200-2gpu.yaml"
    shutil.copy(PROFILE_FILE, out_file)
    argv = ["calibrate", str(CPU_RECORD), "--hardware", "h200-2gpu", "--out", str(out_file), "--holdout", "0"]
    code, _, err = run(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "ran on another device than h200-2gpu (NVIDIA H200 GPUs)" in err and "--allow-other-devices" in err
    assert out_file.read_text() == PROFILE_FILE.read_text()
    code, out, err = run(capsys, *argv, "--allow-other-devices", "--json")
    assert code == 0, err
    assert json.loads(out)["records"] == 1 and out_file.read_text() != PROFILE_FILE.read_text()


def test_unlisted_names_record_files_no_entry_lists_unless_an_exclusion_names_the_whole_file(fixture_dir,
                                                                                            tmp_path) -> None:
    """A record file under benchmarks/results/ that no entry lists is named, so it is not forgotten; one the
    manifest excludes whole, with its reason (the autotune study's summary.json), is not."""
    folder = tmp_path / "benchmarks" / "results" / "session"
    folder.mkdir(parents=True)
    for name in ("listed.json", "forgotten.json", "left-out.json"):
        shutil.copy(fixture_dir / "records" / "session.json", folder / name)
    (tmp_path / "validation").mkdir()
    manifest = tmp_path / "validation" / "fidelity_set.yaml"
    manifest.write_text("records:\n  - path: benchmarks/results/session/listed.json\n    profile: h200-2gpu\n"
                        "exclude:\n  - path: benchmarks/results/session/left-out.json\n    reason: not a run\n"
                        "  - path: benchmarks/results/session/forgotten.json\n    metrics: [prefill_s]\n"
                        "    reason: \"a metric only, so the file is still in scope\"\n")
    assert load_manifest(manifest).unlisted() == ["benchmarks/results/session/forgotten.json"]
