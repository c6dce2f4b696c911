"""``tune(settings)``: the whole study, from the planner's seeds to the best plan, its baseline and report.

The loop, one trial at a time:

1. **Seed** (a new study only): enqueue the planner's best predictions, one per discrete plan, for the
   ``--seeds`` best discrete plans (``study.enqueue_trial``).
2. **Advise** (whenever nothing is queued): refresh the surrogate from every finished trial (calibration,
   residual model, learned memory ceilings) and enqueue its untried plan of highest expected improvement
   over the best measured one; when nothing promises ``surrogate.EI_MIN``, Optuna's TPE sampler proposes
   the trial (multivariate, constraint-aware: it learns the memory boundary from the graded constraints).
3. **Run** the trial (``objective.run_trial``) through ``study.optimize`` so Optuna's heartbeat and stale
   trial handling apply.

SIGINT and SIGTERM stop the study as Ctrl-C does (``hpi.processes.Interrupts``), never in the middle of a
write to the study: they wait until a trial is told (or the seeds enqueued, the records written) except
while a trial runs, which they stop at once (the trial is re-queued; ``objective`` says how).

It stops at ``--trials`` counted trials or when the ``--timeout`` budget cannot fit another trial (plus the
baseline, which runs last, at the best plan's batch unless ``--baseline-batch`` says otherwise).
"""

from __future__ import annotations

import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna

from hpi.autotune.objective import TrialContext, TrialCrashed, measured_figures, run_trial
from hpi.autotune.runners import BASELINES, ExecutorRunner, RecipeRunner, RunFailed, SimRunner, ds_examples_plan
from hpi.autotune.simulate import DEFAULT_NOISE, HiddenMachine, SimulatedRunner, exhaustive_optimum, true_plan_values
from hpi.autotune.space import DiscretePlan, Space, derive_space, params_of, run_key
from hpi.autotune.study import (
    MEMORY_STORAGE,
    best_trial,
    counted,
    default_storage,
    observations,
    open_study,
    recover,
    trial_prediction,
    waiting,
)
from hpi.autotune.surrogate import Surrogate
from hpi.planner.cost.pipeline import stage_layer_sizes
from hpi.planner.specs.plan import Plan
from hpi.planner.specs.workload import SWITCHES, Workload
from hpi.processes import Interrupted, Interrupts

DEFAULT_SEEDS = 3
WITHIN = 0.03  # the simulated target: within 3% of the true optimum
BASELINE_RESERVE = 1.5  # trials' worth of time kept for the baseline
BASELINE_MIN_S = 120.0


@dataclass(frozen=True)
class TuneSettings:
    """What one ``hpi autotune`` asks for: the model, machine and workload, the study and its budget, the
    baseline and the hidden machine of a simulated study."""

    model: str
    hardware: str
    workload: Workload = Workload()
    objective: str = "throughput"
    n_trials: int = 12
    timeout_s: float | None = None
    study: str | None = None
    storage: str | None = None  # None: sqlite under studies_dir/<study>/; "memory": in-process, nothing kept
    studies_dir: str = "studies"
    simulate: bool = False
    seed: int = 0
    n_seeds: int = DEFAULT_SEEDS
    top_configs: int = 6
    batch: int = 1  # the latency objective's batch
    max_batch: int = 256
    restrict: tuple[tuple[str, Any], ...] = ()  # plan axes fixed by the user (hpi plan's flags)
    device: str = "cuda"
    dtype: str | None = None  # None: bf16 on cuda, fp32 on cpu
    warmup_steps: int = 1
    nvme_path: str | None = None
    checkpoint: str | None = None
    trial_timeout_s: float | None = None
    baseline: str | None = None
    baseline_batch: int | None = None  # None: the best plan's batch
    sim_spread: float = 1.0
    sim_noise: float = DEFAULT_NOISE
    report: bool = True

    def __post_init__(self) -> None:
        if self.n_trials < 1:
            raise ValueError(f"--trials {self.n_trials} < 1: ask for at least one trial")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"--timeout {self.timeout_s:g} <= 0: give the study a positive time budget in seconds")
        if self.n_seeds < 0 or self.top_configs < 1:
            raise ValueError("--seeds must be >= 0 and --top-configs >= 1")
        if self.baseline is not None and self.baseline not in BASELINES:
            raise ValueError(f"--baseline {self.baseline!r} is not one of {', '.join(BASELINES)}")
        if self.baseline == "ds-examples" and self.device != "cuda" and not self.simulate:
            raise ValueError("--baseline ds-examples runs DeepSpeedExamples' recipe, which needs CUDA: use "
                             "--baseline ds-examples-knobs (its knobs through hpi's executor) with --device cpu")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"--device {self.device!r} is not one of cuda, cpu")

    @property
    def run_dtype(self) -> str:
        return self.dtype or ("bf16" if self.device == "cuda" else "fp32")


def study_name(model_name: str, hardware_name: str, objective: str, simulate: bool) -> str:
    name = f"{model_name}_{hardware_name}_{objective}" + ("_sim" if simulate else "")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


@dataclass
class Tuner:
    cfg: TuneSettings
    on_event: Callable[[str, dict[str, Any]], None] | None = None
    started: float = field(default_factory=time.monotonic)
    interrupts: Interrupts = field(default_factory=Interrupts)  # installed by ``tune``

    def emit(self, kind: str, doc: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(kind, doc)

    # ---- setup ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from hpi.planner.catalog import load_model
        from hpi.planner.profiles import load_profile

        cfg = self.cfg
        self.model = load_model(cfg.checkpoint or cfg.model)
        self.nominal = load_profile(cfg.hardware)
        self.restrict = self._restrict()  # refuses what cannot run here before anything is written
        self.name = cfg.study or study_name(self.model.name, self.nominal.name, cfg.objective, cfg.simulate)
        self.study_dir = None if cfg.storage == MEMORY_STORAGE else Path(cfg.studies_dir) / self.name
        self.runs_dir = None if self.study_dir is None else self.study_dir / "runs"
        storage = cfg.storage or default_storage(Path(cfg.studies_dir), self.name)
        self.storage_url = storage
        self.machine = HiddenMachine(self.nominal, cfg.seed, cfg.sim_spread, cfg.sim_noise) if cfg.simulate else None
        identity = {"model": self.model.name, "hardware": self.nominal.name, "objective": cfg.objective,
                    "prompt_len_tokens": cfg.workload.prompt_len_tokens, "gen_len_tokens": cfg.workload.gen_len_tokens,
                    "batch": cfg.batch if cfg.objective == "latency" else None, "simulate": cfg.simulate,
                    "device": "simulated" if cfg.simulate else cfg.device,
                    "hidden_machine": [cfg.seed, cfg.sim_spread, cfg.sim_noise] if cfg.simulate else None}
        # Studies from before a condition existed ran without it: they resume with it turned off
        # (--no-cuda-graphs, --no-compile-decode, --no-fused-dequant, --no-skinny-gemm).
        for condition in SWITCHES:
            if getattr(cfg.workload, condition):
                identity[condition] = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True, group=True, constant_liar=True,
                                                 n_startup_trials=max(cfg.n_seeds, 1))
        self.study = open_study(self.name, storage, cfg.objective == "throughput", sampler, identity)
        self.space = self._space()
        self.surrogate = Surrogate(self.model, self.nominal, cfg.workload, self.space,
                                   calibrate_records=cfg.simulate or cfg.device == "cuda")
        self.runner = self._runner()

    def _restrict(self) -> dict[str, Any]:
        """The user's plan restrictions (SearchSpace fields), less what real trials here cannot run."""
        cfg = self.cfg
        restrict = dict(cfg.restrict)
        if cfg.simulate:
            return restrict
        if self.nominal.n_nodes > 1:
            raise ValueError(f"{self.nominal.name} has {self.nominal.n_nodes} nodes: hpi autotune runs trials on one "
                             "node; tune with a one-node profile (or --simulate)")
        if not cfg.nvme_path:  # NVMe trials need a folder on the drive
            offloads = restrict.get("offloads", ("none", "cpu", "nvme"))
            offloads = (offloads,) if isinstance(offloads, str) else tuple(offloads)
            restrict["offloads"] = tuple(o for o in offloads if o != "nvme")
            if not restrict["offloads"]:
                raise ValueError("--offload nvme needs --nvme-path DIR (a folder on the NVMe drive) for real trials")
        return restrict

    def _space(self) -> Space:
        stored = self.study.user_attrs.get("space")
        if stored is not None:
            return Space.from_dict(stored)
        cfg = self.cfg
        space = derive_space(self.model, self.nominal, cfg.workload, cfg.objective, top=cfg.top_configs,
                             restrict=self.restrict, batch=cfg.batch, max_batch=cfg.max_batch)
        self.study.set_user_attr("space", space.to_dict())
        return space

    def _runner(self):
        cfg = self.cfg
        if cfg.simulate:
            return SimRunner(SimulatedRunner(self.model, self.machine, cfg.workload, cfg.model, cfg.run_dtype))
        return ExecutorRunner(cfg.model, cfg.hardware, cfg.workload, cfg.device, cfg.run_dtype, cfg.warmup_steps,
                              cfg.nvme_path, cfg.checkpoint)

    # ---- the loop -----------------------------------------------------------------------------------------
    def seed(self) -> int:
        """Enqueue the planner's best predictions: the best plan, the best of the second discrete plan, and
        (throughput) the best plan's config at a quarter of its batch, so that the first records already
        tell calibration and the residual model how time grows with the batch. Then further discrete plans."""
        if self.study.get_trials(deepcopy=False) or self.cfg.n_seeds == 0:
            return 0
        picks = self.surrogate.ranked(k=min(2, self.cfg.n_seeds), distinct_configs=True)
        if picks and self.cfg.objective == "throughput" and len(picks) < self.cfg.n_seeds:
            best = picks[0][0]
            if best.batch_size >= 4:
                quarter = self.surrogate.ranked(exclude=[run_key(p) for p, _ in picks], accept=lambda p: (
                    DiscretePlan.of(p) == DiscretePlan.of(best) and p.batch_size <= best.batch_size // 4))
                picks += quarter
        if len(picks) < self.cfg.n_seeds:  # further discrete plans, then the next best of any
            more = self.surrogate.ranked(exclude=[run_key(p) for p, _ in picks], k=self.cfg.n_seeds - len(picks),
                                         distinct_configs=True, accept=lambda p: DiscretePlan.of(p) not in {
                                             DiscretePlan.of(q) for q, _ in picks})
            picks += more
        if len(picks) < self.cfg.n_seeds:
            picks += self.surrogate.ranked(exclude=[run_key(p) for p, _ in picks], k=self.cfg.n_seeds - len(picks))
        with self.interrupts.deferred():  # all seeds or none: a study with trials is never seeded again
            for rank, (plan, value) in enumerate(picks[: self.cfg.n_seeds], start=1):
                self.study.enqueue_trial(params_of(plan, self.space), skip_if_exists=True,
                                         user_attrs={"source": f"seed {rank}", "advised_value": value})
        return min(len(picks), self.cfg.n_seeds)

    def advise(self) -> dict[str, Any] | None:
        """Enqueue the surrogate's untried plan of highest expected improvement over the best measured one
        (None: nothing promises ``EI_MIN``, and TPE proposes the next trial)."""
        seen = observations(self.study)
        measured = [o.value for o in seen if o.status == "ok" and o.value is not None]
        incumbent = (max(measured) if self.surrogate.maximize else min(measured)) if measured else None
        pick = self.surrogate.advice(incumbent, exclude=[run_key(o.plan) for o in seen])
        if pick is None:
            return None
        plan, value, ei = pick
        with self.interrupts.deferred():
            self.study.enqueue_trial(params_of(plan, self.space), skip_if_exists=True, user_attrs={
                "source": "planner", "advised_value": value, "expected_improvement": ei})
        return {"plan": plan.label, "predicted": value, "incumbent": incumbent, "expected_improvement": ei}

    def _walls(self) -> list[float]:
        return [t.user_attrs["wall_s"] for t in self.study.get_trials(deepcopy=False) if "wall_s" in t.user_attrs]

    def _baseline_pending(self) -> bool:
        return self.cfg.baseline is not None and self._baseline_record() is None

    def _reserve_s(self) -> float:
        """Time kept back for the baseline: 1.5 trials (a share of the budget before any trial ran). A
        baseline builds the whole model its own way, so it may take longer than one of our runs."""
        if not self._baseline_pending() or self.cfg.simulate or self.cfg.timeout_s is None:
            return 0.0
        walls = self._walls()
        return BASELINE_RESERVE * max(walls) if walls else self.cfg.timeout_s / (self.cfg.n_trials + 1)

    def _time_left_s(self) -> float:
        if self.cfg.timeout_s is None:
            return math.inf
        return self.cfg.timeout_s - (time.monotonic() - self.started)

    def loop(self) -> None:
        ctx = TrialContext(space=self.space, surrogate=self.surrogate, runner=self.runner, runs_dir=self.runs_dir,
                           study_name=self.name, trial_timeout_s=self.cfg.trial_timeout_s,
                           on_trial=lambda doc: self.emit("trial", doc), interrupts=self.interrupts)
        if self.cfg.timeout_s is not None:
            ctx.deadline = self.started + self.cfg.timeout_s
        while counted(self.study) < self.cfg.n_trials:
            ctx.reserve_s = self._reserve_s()
            walls = self._walls()
            need = (max(walls) if walls else 0.0) + ctx.reserve_s
            if counted(self.study) and self._time_left_s() < need:
                self.emit("stop", {"why": f"time budget: {self._time_left_s():.0f} s left < {need:.0f} s for one more "
                                          "trial" + (" and the baseline" if ctx.reserve_s else "")})
                break
            if not waiting(self.study):
                advice = self.advise()
                if advice:
                    self.emit("advice", advice)
            # One trial whole (asked, prepared, run, recorded, told): a signal stops only its run at once.
            with warnings.catch_warnings(), self.interrupts.deferred():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self.study.optimize(lambda t: run_trial(t, ctx), n_trials=1, catch=(TrialCrashed,),
                                    gc_after_trial=False)
            self.surrogate.refresh(observations(self.study))

    # ---- baseline ---------------------------------------------------------------------------------------
    def _baseline_path(self, batch: int) -> Path | None:
        if self.runs_dir is None:
            return None
        return self.runs_dir / f"baseline-{self.cfg.baseline}-b{batch}.json"

    def _baseline_batch(self) -> int | None:
        """The batch the baseline runs at: ``--baseline-batch``, else the best plan's batch, halved until
        the baseline's own plan (16-bit weights on the CPU, KV cache on the GPU) is predicted to fit."""
        if self.cfg.baseline_batch is not None:
            return self.cfg.baseline_batch
        best = best_trial(self.study)
        if best is None:
            return None
        batch = int(best.user_attrs["plan"]["batch_size"])
        while batch > 1 and not self.surrogate.predict(ds_examples_plan(self.model.hidden_size, batch))["feasible"]:
            batch //= 2
        return batch

    def _baseline_record(self) -> dict[str, Any] | None:
        batch = self._baseline_batch()
        if batch is None:
            return None
        done = self.study.user_attrs.get(f"baseline:{self.cfg.baseline}:b{batch}")
        return done if done and done.get("status") == "ok" else None

    def baseline(self) -> dict[str, Any] | None:
        if self.cfg.baseline is None:
            return None
        batch = self._baseline_batch()
        if batch is None:
            return {"kind": self.cfg.baseline, "status": "skipped", "why": "no measured trial to compare with"}
        done = self._baseline_record()
        if done is not None:
            return done
        plan = ds_examples_plan(self.model.hidden_size, batch)
        out = {"kind": self.cfg.baseline, "batch": batch, "plan": plan.to_dict(), "label": plan.label}
        best = best_trial(self.study)
        best_batch = None if best is None else int(best.user_attrs["plan"]["batch_size"])
        if self.cfg.baseline_batch is None and best_batch is not None and batch != best_batch:
            out["note"] = (f"the best plan's batch {best_batch} is predicted not to fit the baseline's plan; "
                           f"{batch} is the largest that does")
        # The budget may be short by now; a baseline cut off is lost, so it gets at least its reserve.
        walls = self._walls()
        floor = max(BASELINE_MIN_S, BASELINE_RESERVE * max(walls) if walls else 0.0)
        timeout = None if self.cfg.timeout_s is None else max(self._time_left_s(), floor)
        started = time.monotonic()
        self.emit("baseline_start", out)
        try:
            if self.cfg.baseline == "ds-examples" and not self.cfg.simulate:
                folder = (self.runs_dir or Path(".")) / f"baseline-{self.cfg.baseline}-b{batch}"
                result = RecipeRunner(self.cfg.model, self.cfg.workload).run(batch, folder, timeout)
                measured = {k: result.get(k) for k in ("throughput_tok_s", "decode_step_s", "prefill_s", "ttft_s")}
                measured["gpu_peak_bytes"] = result.get("peak_allocated_bytes")
                out["record"] = {k: v for k, v in result.items() if k != "tokens"}
            else:
                folder = (None if self.runs_dir is None
                          else str(self.runs_dir / f"baseline-{self.cfg.baseline}-b{batch}"))
                record = self.runner.run(plan, folder, timeout, {"study": self.name, "baseline": self.cfg.baseline},
                                         noise_key=10_000 + batch)
                measured = measured_figures(record)
                out["record"] = record.without_tokens().to_json()
            out.update(status="ok", measured=measured)
        except RunFailed as f:
            out.update(status=f.kind, error=str(f)[:4000])
        out["wall_s"] = time.monotonic() - started
        path = self._baseline_path(batch)
        with self.interrupts.deferred():
            if path is not None:
                from hpi.executor.spec import write_json_atomic

                write_json_atomic(path, out)
            if out["status"] == "ok":  # the database keeps the figures (without the record) for a resumed study
                self.study.set_user_attr(f"baseline:{self.cfg.baseline}:b{batch}",
                                         {k: v for k, v in out.items() if k != "record"})
            self.emit("baseline", out)
        return out

    def run(self) -> dict[str, Any]:
        with self.interrupts.deferred():
            requeued = recover(self.study)
        self.surrogate.refresh(observations(self.study))
        seeded = self.seed()
        self.emit("start", {"study": self.name, "storage": self.storage_url, "configs": list(self.space.labels),
                            "seeded": seeded, "requeued": requeued, "done": counted(self.study),
                            "n_trials": self.cfg.n_trials, "grid_size": self.surrogate.lattice.size})
        self.loop()
        baseline = self.baseline()
        doc = self.result(baseline)
        with self.interrupts.deferred():
            self.outputs(doc)
        return doc

    # ---- results ------------------------------------------------------------------------------------------
    def result(self, baseline: dict[str, Any] | None) -> dict[str, Any]:
        trials = self.study.get_trials(deepcopy=False)
        best = best_trial(self.study)
        doc: dict[str, Any] = {
            "study": self.name, "storage": self.storage_url, "objective": self.cfg.objective,
            "model": self.model.name, "hardware": self.nominal.name, "simulated": self.cfg.simulate,
            "trials": counted(self.study),
            "runs": sum(1 for t in trials if "wall_s" in t.user_attrs),
            "statuses": _count("interrupted" if t.user_attrs.get("interrupted")
                               else t.user_attrs.get("status", t.state.name.lower())
                               for t in trials if t.state.is_finished()),
            "queued": sum(1 for t in trials if t.state == optuna.trial.TrialState.WAITING),
            "space": {"configs": list(self.space.labels), "grid_size": self.surrogate.lattice.size},
            "best": None,
        }
        if best is not None:
            m = best.user_attrs["measured"]
            doc["best"] = {**best.user_attrs["plan"], "label": best.user_attrs["label"], "trial": best.number,
                           "throughput_tok_s": m["throughput_tok_s"], "decode_step_s": m["decode_step_s"],
                           "prefill_s": m.get("prefill_s"), "gpu_peak_bytes": m.get("gpu_peak_bytes"),
                           "predicted_nominal": _nominal(best), "source": best.user_attrs.get("source")}
        if baseline is not None:
            doc["baseline"] = {k: v for k, v in baseline.items() if k != "record"}
            if best is not None and baseline.get("status") == "ok":
                b = baseline["measured"]
                key = "throughput_tok_s" if self.cfg.objective == "throughput" else "decode_step_s"
                if b.get(key):
                    ratio = m[key] / b[key] if self.cfg.objective == "throughput" else b[key] / m[key]
                    doc["ratio_over_baseline"] = ratio
                doc["ratio_over_baseline_throughput"] = (m["throughput_tok_s"] / b["throughput_tok_s"]
                                                         if b.get("throughput_tok_s") else None)
        if self.machine is not None:
            doc["simulation"] = self.simulation_summary()
        return doc

    def simulation_summary(self) -> dict[str, Any]:
        """How the study did against the hidden machine's exhaustive optimum (true, noise-free figures)."""
        truth = exhaustive_optimum(self.model, self.machine, self.cfg.workload, self.space, self.restrict,
                                   self.cfg.batch, self.cfg.max_batch)
        trials = sorted((t for t in self.study.get_trials(deepcopy=False) if t.user_attrs.get("plan")
                         and not t.user_attrs.get("interrupted")), key=lambda t: t.number)
        plans = [Plan.from_dict(t.user_attrs["plan"]) for t in trials]
        maximize = self.cfg.objective == "throughput"
        true_values = true_plan_values(self.machine, self.model, self.cfg.workload, plans, self.cfg.objective)
        opt = truth["value"]
        incumbent_measured, incumbent_true, first_within, curve = None, None, None, []
        for i, t in enumerate(trials):
            measured = (t.user_attrs.get("measured") or {}).get("value")
            if t.user_attrs.get("status") == "ok" and measured is not None and (
                    incumbent_measured is None
                    or (measured > incumbent_measured if maximize else measured < incumbent_measured)):
                incumbent_measured, incumbent_true = measured, true_values[i]
            gap = None if incumbent_true is None else _gap(incumbent_true, opt, maximize)
            curve.append(gap)
            if first_within is None and gap is not None and gap <= WITHIN:
                first_within = i + 1
        first_gap = (_gap(true_values[0], opt, maximize)
                     if trials and math.isfinite(true_values[0]) and true_values[0] > 0 else None)
        return {**{k: v for k, v in truth.items() if k != "plan"}, "true_optimum_plan": truth["plan"].label,
                "machine": self.machine.describe(), "trials_to_within_3pct": first_within,
                "trial1_gap": first_gap, "final_gap": curve[-1] if curve else None, "gap_curve": curve}

    def outputs(self, doc: dict[str, Any]) -> None:
        """best_plan.json, best_ds_config.json, the launch command, summary.json and the report."""
        if self.study_dir is None or doc["best"] is None:
            return
        from hpi.executor.render import ds_config
        from hpi.executor.spec import write_json_atomic

        plan = Plan.from_dict({k: doc["best"][k] for k in Plan.__dataclass_fields__})
        best_path = write_json_atomic(self.study_dir / "best_plan.json", {"plan": plan.to_dict(), **doc["best"]})
        nvme = self.cfg.nvme_path or ("/path/to/nvme" if plan.offload == "nvme" else None)
        write_json_atomic(self.study_dir / "best_ds_config.json",
                          ds_config(plan, dtype=self.cfg.run_dtype, hidden_size=self.model.hidden_size, nvme_path=nvme,
                                    stage_layers=max(stage_layer_sizes(self.model, plan.pp))))
        command = (f"hpi run --model {self.cfg.model} --hardware {self.cfg.hardware} --plan {best_path} "
                   f"--prompt-len {self.cfg.workload.prompt_len_tokens} --gen-len {self.cfg.workload.gen_len_tokens} "
                   f"--device {self.cfg.device} --dtype {self.cfg.run_dtype}"
                   + (f" --nvme-path {nvme}" if plan.offload == "nvme" else "") + " --json")
        doc["files"] = {"best_plan": str(best_path), "ds_config": str(self.study_dir / "best_ds_config.json"),
                        "summary": str(self.study_dir / "summary.json")}
        doc["launch_command"] = command
        if self.cfg.report:
            from hpi.autotune.report import write_report

            try:
                doc["files"]["report"] = str(write_report(self.study_dir, self.study, self.surrogate, doc))
            except Exception as e:  # noqa: BLE001 - the study and its records stand without the report
                doc["report_error"] = f"{type(e).__name__}: {e}"
        write_json_atomic(self.study_dir / "summary.json", doc)


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


def _nominal(trial) -> dict[str, Any] | None:
    """The uncalibrated prediction the trial's record carries (its throughput and decode step), if any."""
    p = trial_prediction(trial)
    return {"throughput_tok_s": p.throughput_tok_s, "decode_step_s": p.decode_step_s} if p else None


def _gap(value: float, opt: float, maximize: bool) -> float:
    return 1.0 - value / opt if maximize else value / opt - 1.0


def tune(cfg: TuneSettings, on_event: Callable[[str, dict[str, Any]], None] | None = None,
         runner: Any = None) -> dict[str, Any]:
    """Run (or resume) a study; returns the summary document (``--json``'s last line). ``runner`` replaces
    the executor (or the hidden machine) as what answers trials: ``run(plan, out_dir, timeout_s, note, *,
    noise_key) -> RunRecord`` raising ``RunFailed``."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # trial failures are reported as events, without tracebacks
    tuner = Tuner(cfg, on_event)
    with tuner.interrupts.installed():  # SIGTERM stops it as Ctrl-C does: raised as Interrupted (a KeyboardInterrupt)
        try:
            tuner.setup()
            if runner is not None:
                tuner.runner = runner
            return tuner.run()
        except KeyboardInterrupt as e:
            if getattr(e, "signum", None) is None and tuner.interrupts.received is not None:
                raise Interrupted(tuner.interrupts.received) from e  # a run the signal stopped raised its own
            raise
