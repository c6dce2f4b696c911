"""benchmarks/fidelity_sweep.py on the real fidelity manifest: the figures README quotes for the per-row term."""

from __future__ import annotations

import json

import pytest

from hpi.planner.validate import load_manifest
from tests.benchmarks.scripts import load

sweep = load("fidelity_sweep")


def test_the_per_row_term_brings_the_graphed_batch_steps_to_a_median_of_zero(capsys) -> None:
    assert sweep.main(["layer_device_s_per_row_doubling", "0", "5.5e-6"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    without, with_term = (pt["graphed_batch_gt_1"] for pt in doc["points"])
    # 32 graphed steps at batch > 1: the two compiled batch-16 steps of 2026-12-04 left the set's decode figures
    # with hpi's compile options of 2026-12-05 (validation/fidelity_set.yaml), and the H100's graphed and compiled
    # batch-16 steps of 2026-12-05 came in, then those of 2026-12-06 with hpi's stacked few-row products
    # (executor/skinny_gemm.py, priced by cost.overhead.skinny_saving) and the two one-build side by sides of
    # 2026-12-06-skinny-switch (8 steps); the H100 profile took the 2026-12-05 probe's graphed line with them
    assert without["n"] == with_term["n"] == 32
    assert without["signed_median"] == pytest.approx(-0.113, abs=0.002) and without["within_10pct"] == 15
    assert abs(with_term["signed_median"]) < 0.025 and with_term["max_ape"] < 0.14 and with_term["within_10pct"] == 31
    assert doc["points"][1]["decode"]["median_ape"] < doc["points"][0]["decode"]["median_ape"]
    assert doc["points"][1]["prefill"] == doc["points"][0]["prefill"]  # decode only


@pytest.mark.parametrize("argv", [["not_a_coefficient", "1"], ["hbm", "1", "--profiles", "no-such-machine"]])
def test_bad_input_is_one_line_and_exit_2(capsys, argv) -> None:
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fidelity_sweep.py: ") and "use one of" in err[0]


def test_a_broken_manifest_is_one_line_and_exit_2(capsys, monkeypatch, tmp_path) -> None:
    broken = tmp_path / "fidelity_set.yaml"
    broken.write_text("records: [\n")
    monkeypatch.setattr(sweep, "load_manifest", lambda: load_manifest(broken))
    assert sweep.main(["hbm", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "malformed YAML" in err[0]
