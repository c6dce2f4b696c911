"""``hpi autotune``: the command line, its --json document, its files and its refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hpi.cli import main


def test_simulated_autotune_json_last_line_files_and_report(tmp_path, capsys):
    code = main(["autotune", "--model", "mixtral-8x7b", "--hardware", "h100-sxm-1gpu", "--simulate", "--trials", "6",
                 "--seed", "1", "--studies-dir", str(tmp_path), "--baseline", "ds-examples", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out.strip().splitlines()[-1])
    best = doc["best"]
    assert {"offload", "tp", "pp", "dp", "weight_bits", "batch_size", "throughput_tok_s", "decode_step_s"} <= set(best)
    assert doc["trials"] == 6 and doc["simulated"] and doc["study"] == "mixtral-8x7b_h100-sxm-1gpu_throughput_sim"
    assert doc["baseline"]["kind"] == "ds-examples" and doc["baseline"]["status"] == "ok"
    assert doc["ratio_over_baseline"] > 1.0
    assert "trial 0 [seed 1]" in err  # one line per trial on stderr
    folder = tmp_path / doc["study"]
    assert doc["storage"] == f"sqlite:///{(folder / 'study.db').resolve()}"
    assert json.loads((folder / "best_plan.json").read_text())["plan"]["batch_size"] == best["batch_size"]
    assert json.loads((folder / "best_ds_config.json").read_text())["zero_optimization"]["stage"] == 3
    assert doc["launch_command"].startswith("hpi run --model mixtral-8x7b --hardware h100-sxm-1gpu --plan ")
    assert sorted(p.name for p in (folder / "runs").glob("trial-*.json")) == [f"trial-{i:04d}.json" for i in range(6)]
    report = (folder / "report.md").read_text()
    for plot in ("throughput_vs_batch", "pinned_vs_pageable", "predicted_vs_measured", "importance", "pareto"):
        assert f"plots/{plot}.png" in report and (folder / "plots" / f"{plot}.png").stat().st_size > 1000

    # the same command again: the study is complete, nothing runs, the answer is the same
    code = main(["autotune", "--model", "mixtral-8x7b", "--hardware", "h100-sxm-1gpu", "--simulate", "--trials", "6",
                 "--seed", "1", "--studies-dir", str(tmp_path), "--baseline", "ds-examples", "--json", "--no-report"])
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and again["best"] == doc["best"] and again["runs"] == doc["runs"]


@pytest.mark.parametrize("argv,needle", [
    (["--trials", "0"], "--trials 0 < 1"),
    (["--timeout", "0"], "--timeout 0 <= 0"),
    (["--device", "cpu", "--baseline", "ds-examples"], "needs CUDA"),
    (["--offload", "nvme"], "--nvme-path"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, needle):
    code = main(["autotune", "--model", "llama-3-8b", "--hardware", "h100-sxm-1gpu", "--studies-dir", str(tmp_path),
                 *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_hpi_does_not_import_optuna_or_matplotlib_to_start():
    code = ("import sys, hpi.cli.app\nhpi.cli.app.build_parser()\n"
            "bad = [m for m in ('optuna', 'matplotlib', 'torch', 'sqlalchemy') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_matplotlib_the_report_has_no_plots_but_everything_else(tmp_path, capsys, monkeypatch):
    import hpi.autotune.report

    def missing():
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(hpi.autotune.report, "_plt", missing)
    code = main(["autotune", "--model", "llama-3-70b", "--hardware", "h100-sxm-1gpu", "--simulate", "--trials", "2",
                 "--studies-dir", str(tmp_path), "--json"])
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = (tmp_path / doc["study"] / "report.md").read_text()
    assert code == 0 and "no plots: No module named 'matplotlib'" in report and "## Trials" in report
    assert not (tmp_path / doc["study"] / "plots").exists()


def test_trials_decode_through_graphs_where_the_plan_allows_it():
    """What ExecutorRunner launches matches what the planner priced (cost.overhead.graphed_forwards)."""
    from hpi.autotune.runners import ExecutorRunner
    from hpi.planner.specs.plan import Plan
    from hpi.planner.specs.workload import Workload

    graphs = ExecutorRunner("llama-3-8b", "h100-sxm-1gpu", Workload(512, 32, decode_graphs=True))
    assert graphs.graphs_for(Plan(batch_size=8))
    for blocked in (Plan(offload="cpu"), Plan(weight_bits=4), Plan(kv_offload=True), Plan(dp=2, batch_size=2)):
        assert not graphs.graphs_for(blocked), blocked.label
    assert not ExecutorRunner("mixtral-8x7b", "h100-sxm-1gpu", Workload(decode_graphs=True)).graphs_for(Plan())
    assert not ExecutorRunner("llama-3-8b", "h100-sxm-1gpu", Workload(512, 32)).graphs_for(Plan())


def test_a_study_made_eager_resumes_only_eager(tmp_path, capsys):
    argv = ["autotune", "--model", "llama-3-8b", "--hardware", "h100-sxm-1gpu", "--simulate", "--trials", "2",
            "--seeds", "1", "--studies-dir", str(tmp_path), "--no-report", "--json"]
    assert main(argv + ["--no-cuda-graphs"]) == 0
    capsys.readouterr()
    assert main(argv) == 2  # the default prices graphs: another study's settings
    err = capsys.readouterr().err
    assert "decode_graphs: None there, True now" in err and len(err.strip().splitlines()) == 1
    assert main(argv + ["--no-cuda-graphs"]) == 0
