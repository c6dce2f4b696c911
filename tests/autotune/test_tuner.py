"""The study loop: search efficiency on the hidden machine, outcomes as Optuna records them, resuming."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from hpi.autotune.runners import RunFailed
from hpi.autotune.space import params_of, suggest_plan
from hpi.autotune.tuner import Tuner, tune


def _tuner(cfg, runner) -> Tuner:
    t = Tuner(cfg)
    t.setup()
    t.runner = runner
    return t


# ---- search efficiency (simulated, seeded, deterministic) -------------------------------------------------

@pytest.mark.parametrize("model,hardware,seed", [
    # the nominal plan is 15% off (w4 dequantizes slowly there; 35% before cost.pinned priced the power-of-two
    # pinned blocks, which moved the planner's own pick closer to this machine's optimum)
    ("llama-3-70b", "a6000-workstation", 1),
    # the nominal plan is 18% off (on the A6000 Mixtral's nominal plan became this machine's optimum when DeepSpeed's
    # dequantization moved onto the compute stream beside the copies, cost.estimate)
    ("mixtral-8x7b", "h100-sxm-1gpu", 1),
])
def test_simulated_study_lands_within_3pct_of_the_true_optimum_in_12_trials(model, hardware, seed):
    cfg_doc = tune(_cfg(model, hardware, seed))
    sim = cfg_doc["simulation"]
    assert sim["trial1_gap"] > 0.05  # the planner alone would be off by more than the 3% aimed at: the search matters
    assert sim["trials_to_within_3pct"] is not None and sim["trials_to_within_3pct"] <= 12
    assert sim["final_gap"] <= 0.03
    assert sim["expected_grid_trials"] > 60  # a grid search of the same lattice needs far more
    assert cfg_doc["trials"] == 12 and cfg_doc["best"]["throughput_tok_s"] > 0


def _cfg(model, hardware, seed, **kw):
    from hpi.autotune.tuner import TuneSettings

    return TuneSettings(model=model, hardware=hardware, simulate=True, n_trials=12, seed=seed, storage="memory",
                      report=False, **kw)


# ---- outcomes -------------------------------------------------------------------------------------------

def test_a_predicted_overflow_is_a_graded_constraint_and_is_not_launched(config, fake_runner):
    cfg = config(n_trials=1)
    runner = fake_runner(cfg)
    tuner = _tuner(cfg, runner)
    s = tuner.surrogate
    row = int(np.flatnonzero(~s.scores.feasible)[0])
    plan = s.lattice.plan(*s._rows[row])
    tuner.study.enqueue_trial(params_of(plan, tuner.space), user_attrs={"source": "test"})
    tuner.loop()
    (t,) = tuner.study.get_trials()
    assert t.state == TrialState.COMPLETE and t.value == 0.0
    assert t.user_attrs["status"] == "predicted_overflow" and not runner.calls
    assert max(t.constraints.values()) > 0 and t.constraints["gpu_memory"] > 0
    record = json.loads((tuner.runs_dir / "trial-0000.json").read_text())
    assert record["status"] == "predicted_overflow" and record["launched"] is False
    with pytest.raises(ValueError):
        tuner.study.best_trial  # an infeasible trial is never the best  # noqa: B018


def test_a_real_out_of_memory_is_a_constraint_with_its_figures_and_is_learned(config, fake_runner):
    cfg = config(n_trials=1)

    def oom(i, plan):
        raise RunFailed("oom", "rank 0 (node 0, local rank 0) ran out of memory: CUDA out of memory. Tried to allocate "
                               "2.00 GiB\nlast lines ...", where="gpu", figures=("2.00 GiB",))

    runner = fake_runner(cfg, oom)
    tuner = _tuner(cfg, runner)
    tuner.seed()
    tuner.loop()
    (t,) = [t for t in tuner.study.get_trials() if t.state != TrialState.WAITING]
    assert t.state == TrialState.COMPLETE and t.value == 0.0 and t.user_attrs["status"] == "oom"
    assert t.constraints["gpu_memory"] > 0
    assert t.user_attrs["oom"]["figures"] == ["2.00 GiB"] and "Tried to allocate" in t.user_attrs["oom"]["message"]
    plan = suggest_plan(optuna.trial.FixedTrial(t.params), tuner.space)
    tuner.surrogate.refresh([o for o in __import__("hpi.autotune.study", fromlist=["observations"])
                             .observations(tuner.study)])
    assert not tuner.surrogate.predict(plan)["feasible"]  # the next suggestions avoid it


def test_a_crash_is_a_failed_row_with_its_error_and_the_study_goes_on(config, fake_runner):
    cfg = config(n_trials=2)

    def crash_first(i, plan):
        if i == 0:
            raise RunFailed("crash", "rank 1 (node 0, local rank 1) exited with code 3\nlog: /x")

    runner = fake_runner(cfg, crash_first)
    doc = _tuner(cfg, runner).run()
    trials = optuna.load_study(study_name=doc["study"], storage=doc["storage"]).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["status"] == "crash"
    assert failed[0].user_attrs["error"].startswith("rank 1 (node 0, local rank 1) exited with code 3")
    assert doc["trials"] == 2 and doc["statuses"] == {"crash": 1, "ok": 1} and doc["best"] is not None


# ---- resuming -----------------------------------------------------------------------------------------

def test_an_interrupted_study_resumes_and_reruns_the_interrupted_trial(config, fake_runner):
    cfg = config(n_trials=3)

    def ctrl_c_on_second(i, plan):
        if i == 1:
            raise KeyboardInterrupt

    first = fake_runner(cfg, ctrl_c_on_second)
    with pytest.raises(KeyboardInterrupt):
        tune(cfg, runner=first)
    interrupted_plan = first.calls[1]
    second = fake_runner(cfg)
    doc = tune(cfg, runner=second)
    assert interrupted_plan in second.calls  # re-run (after the seeds still queued)
    assert doc["trials"] == 3 and doc["statuses"]["interrupted"] == 1
    study = optuna.load_study(study_name=doc["study"], storage=doc["storage"])
    retry = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") is not None]
    assert len(retry) == 1 and retry[0].user_attrs["source"] == f"retry of {retry[0].system_attrs['failed_trial']}"


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_trial_left_running_by_a_killed_process_is_rerun(config, fake_runner):
    cfg = config(n_trials=2)
    tuner = _tuner(cfg, fake_runner(cfg))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial = tuner.study.ask()
    plan = suggest_plan(trial, tuner.space)
    trial.set_user_attr("owner", {"host": socket.gethostname(), "pid": dead.pid})
    runner = fake_runner(cfg)
    doc = tune(cfg, runner=runner)
    assert runner.calls[0] == plan
    study = optuna.load_study(study_name=doc["study"], storage=doc["storage"])
    assert study.get_trials()[0].state == TrialState.FAIL and doc["trials"] == 2


def test_resuming_with_other_settings_is_refused(config):
    tune(config(n_trials=1))
    with pytest.raises(ValueError, match="was created for other settings.*objective"):
        tune(config(n_trials=1, objective="latency", study="llama-3-70b_h100-sxm-1gpu_throughput_sim"))
