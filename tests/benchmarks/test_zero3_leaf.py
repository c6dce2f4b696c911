"""benchmarks/zero3_leaf.py: the summary's arithmetic on known steps, and one real round on the CPU (a 4-layer
model through hpi's launcher: every build decodes the same tokens; the times are the benchmark's to report, not a
test's to assert)."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.scripts import load

pytest.importorskip("torch")
pytest.importorskip("deepspeed")


def test_summary_is_host_time_a_layer_over_the_plain_step_and_checks_the_tokens():
    mod = load("zero3_leaf")
    runs = [{"build": b, "decode_step_s": s, "tokens": [[1, 2]]}
            for b, s in (("plain", 0.004), ("module", 0.036), ("layer", 0.012), ("module", 0.040))]
    summary = mod.summarize(runs, 16)
    assert summary["decode_step_s"] == {"plain": 0.004, "module": 0.038, "layer": 0.012}  # medians
    assert summary["zero3_host_s_per_layer"] == pytest.approx({"module": 0.034 / 16, "layer": 0.008 / 16})
    assert summary["layer_over_module"] == pytest.approx(0.008 / 0.034) and summary["same_tokens"] is True
    runs[2]["tokens"] = [[1, 3]]
    assert mod.summarize(runs, 16)["same_tokens"] is False


def test_bad_counts_are_refused_in_one_line_with_exit_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        load("zero3_leaf").main(["--out", str(tmp_path), "--layers", "0"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "--layers 0 is too small" in err
    assert not list(tmp_path.iterdir())  # nothing written before the input is valid


def test_one_cpu_round_runs_the_three_builds_to_the_same_tokens(tmp_path, capsys):
    assert load("zero3_leaf").main(["--out", str(tmp_path), "--layers", "4", "--reps", "1", "--gen-len", "6"]) == 0
    doc = json.loads((tmp_path / "zero3_leaf.json").read_text())
    summary = doc["summary"]
    assert doc["kind"] == "hpi.Zero3Leaf" and [r["build"] for r in doc["runs"]] == ["plain", "module", "layer"]
    assert summary["same_tokens"] is True and summary["layers"] == 4
    assert set(summary["zero3_host_s_per_layer"]) == {"module", "layer"}
