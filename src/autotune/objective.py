"""One trial: parameters -> Plan -> (refused by prediction | run) -> value, constraints and a record on disk.

How each outcome lands in Optuna (so that the sampler learns from all of them):

==================  ===========  ==================================  ===========================================
outcome             state        value                               constraints (> 0: broken)
==================  ===========  ==================================  ===========================================
measured            COMPLETE     throughput (tok/s) or decode step   measured GPU peak / usable - 1 (else predicted)
predicted overflow  COMPLETE     0 tok/s or inf s; not launched      predicted need / capacity - 1, per memory
out of memory       COMPLETE     0 tok/s or inf s                    max(predicted, 0) + 0.05 on the memory that ran out
crash, timeout      FAIL         -                                   -; the error in user_attrs["error"]
interrupted         FAIL         -                                   -; re-queued by the next start (study.recover)
==================  ===========  ==================================  ===========================================

Interrupts (SIGINT, SIGTERM; ``hpi.processes.Interrupts``): the tuner defers them over a whole trial (asked,
prepared, recorded, told) except its run. One that comes before or during the run stops the run and marks the
trial ``interrupted``, wherever it is raised in the objective; one that comes after the run waits until the
trial is told, so its measurement is kept. Either way the trial is not lost (issue 14: a Ctrl-C while a trial
was prepared made it an uncounted FAIL, never re-queued).

Every trial's record (the RunRecord, or the failure with its message) is written atomically to
``<runs>/trial-NNNN.json``; a real run's own folder (spec, DeepSpeed config, logs) is ``<runs>/trial-NNNN/``.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hpi.autotune.runners import RunFailed
from hpi.autotune.space import Space, run_key, suggest_plan
from hpi.autotune.study import owner
from hpi.autotune.surrogate import Surrogate
from hpi.planner.specs.plan import Plan
from hpi.processes import Interrupts
from hpi.records import RunRecord

OOM_MARGIN = 0.05  # an out-of-memory is at least this far over the limit, whatever the prediction said


class TrialCrashed(Exception):
    """A run that crashed or timed out: Optuna records the trial FAIL and the study goes on."""


def worst_value(maximize: bool) -> float:
    return 0.0 if maximize else math.inf


def _number(v: Any) -> float | None:
    return float(v) if v is not None else None


def measured_figures(record: RunRecord) -> dict[str, Any]:
    """The figures a trial reports (and the study keeps): the headline times, the GPU peak, the h2d rate."""
    t = record.timings
    return {
        "throughput_tok_s": _number(t.throughput_tok_s),
        "decode_step_s": _number(t.figure("decode_step_s")),
        "prefill_s": _number(t.prefill_s),
        "ttft_s": _number(t.ttft_s),
        "gpu_peak_bytes": record.gpu_peak_allocated_bytes if record.ranks else None,
        "h2d_bytes_s": record.transfers.h2d.achieved_bytes_s if record.transfers.h2d else None,
    }


@dataclass
class TrialContext:
    """What every trial of one study shares."""

    space: Space
    surrogate: Surrogate
    runner: Any  # ExecutorRunner | SimRunner
    runs_dir: Path | None  # None: records are not written (in-memory benchmark studies)
    study_name: str
    deadline: float | None = None  # time.monotonic() after which no run may go on
    reserve_s: float = 0.0  # kept back for the baseline at the end
    trial_timeout_s: float | None = None
    on_trial: Callable[[dict[str, Any]], None] | None = None
    interrupts: Interrupts | None = None  # the tuner's: a trial's run is the one place a signal stops at once

    def interruptible(self) -> contextlib.AbstractContextManager:
        return self.interrupts.immediate() if self.interrupts is not None else contextlib.nullcontext()

    def interrupt_name(self, e: KeyboardInterrupt) -> str:
        """SIGINT or SIGTERM: the signal ``e`` carries, else the last one received (a run stopped by it raises
        its own KeyboardInterrupt), else how a bare KeyboardInterrupt came."""
        signum = getattr(e, "signum", None) or (self.interrupts.received if self.interrupts is not None else None)
        return signal.Signals(signum).name if signum else "KeyboardInterrupt"

    @property
    def maximize(self) -> bool:
        return self.space.objective == "throughput"

    def value_of(self, measured: dict[str, Any]) -> float | None:
        return measured["throughput_tok_s"] if self.maximize else measured["decode_step_s"]

    def launch_timeout(self) -> float | None:
        limits = [t for t in (self.trial_timeout_s,) if t]
        if self.deadline is not None:
            limits.append(max(self.deadline - time.monotonic() - self.reserve_s, 1.0))
        return min(limits) if limits else None


def _write(ctx: TrialContext, number: int, doc: dict[str, Any]) -> str | None:
    if ctx.runs_dir is None:
        return None
    from hpi.executor.spec import write_json_atomic  # pure: json + tempfile, no torch

    return str(write_json_atomic(ctx.runs_dir / f"trial-{number:04d}.json", doc))


def _measured_before(trial, key: str) -> Any:
    """A finished trial of the same plan (TPE can propose one twice): its measurement is reused."""
    for t in trial.study.get_trials(deepcopy=False):
        if t.number != trial.number and t.user_attrs.get("key") == repr(key) and t.user_attrs.get("status") == "ok":
            return t
    return None


def run_trial(trial, ctx: TrialContext) -> float:
    """The Optuna objective. Interrupted anywhere in it, the trial is marked ``interrupted``: Optuna records
    it FAIL and the next start re-queues it (``study.recover``)."""
    try:
        return _run_trial(trial, ctx)
    except KeyboardInterrupt as e:
        trial.set_user_attr("interrupted", ctx.interrupt_name(e))
        raise


def retried_number(trial) -> int | None:
    """The number of the trial this one runs again (the first of its retries), or None."""
    return trial.storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")  # noqa: SLF001


def _run_trial(trial, ctx: TrialContext) -> float:
    plan = suggest_plan(trial, ctx.space)
    key = run_key(plan)
    source = trial.user_attrs.get("source", "tpe")
    retry_of = retried_number(trial)
    if retry_of is not None:
        source = f"retry of {retry_of}"
    # A retried trial starts with its original's attributes (Optuna copies them): clear the interruption.
    for name, value in (("plan", plan.to_dict()), ("label", plan.label), ("key", repr(key)), ("source", source),
                        ("owner", owner()), ("interrupted", None)):
        trial.set_user_attr(name, value)
    predicted = ctx.surrogate.predict(plan)
    trial.set_user_attr("predicted", predicted)
    base = {"kind": "hpi.AutotuneTrial", "study": ctx.study_name, "trial": trial.number, "source": source,
            "plan": plan.to_dict(), "label": plan.label, "predicted": predicted}
    done = _finish(trial, ctx, plan, predicted, base, noise_key=trial.number if retry_of is None else retry_of)
    if ctx.on_trial is not None:
        ctx.on_trial({**base, **done, "trial": trial.number})
    if done["status"] in ("crash", "timeout"):
        raise TrialCrashed(done["error"])
    return done["value"]


def _constrain(trial, constraints: dict[str, float]) -> None:
    for name, value in constraints.items():
        trial.set_constraint(name, float(value))


def _finish(trial, ctx: TrialContext, plan: Plan, predicted: dict[str, Any], base: dict[str, Any], *,
            noise_key: int) -> dict[str, Any]:
    worst = worst_value(ctx.maximize)
    earlier = _measured_before(trial, run_key(plan))
    if earlier is not None:
        _constrain(trial, earlier.constraints)
        for name in ("status", "measured", "record"):
            trial.set_user_attr(name, earlier.user_attrs.get(name))
        trial.set_user_attr("reused_from", earlier.number)
        _write(ctx, trial.number, {**base, "status": "ok", "reused_from": earlier.number,
                                   "measured": earlier.user_attrs.get("measured")})
        return {"status": "ok", "value": earlier.value, "reused_from": earlier.number,
                "measured": earlier.user_attrs.get("measured")}
    if not predicted["feasible"]:
        _constrain(trial, predicted["constraints"])
        trial.set_user_attr("status", "predicted_overflow")
        broken = {k: v for k, v in predicted["constraints"].items() if v > 0}
        _write(ctx, trial.number, {**base, "status": "predicted_overflow", "launched": False, "broken": broken})
        return {"status": "predicted_overflow", "value": worst, "broken": broken}

    out_dir = str(ctx.runs_dir / f"trial-{trial.number:04d}") if ctx.runs_dir is not None else None
    note = {"study": ctx.study_name, "trial": trial.number, "source": base["source"]}
    started = time.monotonic()
    try:
        with ctx.interruptible():  # a signal waiting since the trial was asked stops it here, before the launch
            record = ctx.runner.run(plan, out_dir, ctx.launch_timeout(), note, noise_key=noise_key)
    except RunFailed as f:
        wall = time.monotonic() - started
        trial.set_user_attr("wall_s", wall)
        if f.kind == "oom":
            name = "gpu_memory" if f.where == "gpu" else "cpu_memory"
            constraints = dict(predicted["constraints"])
            constraints[name] = max(constraints[name], 0.0) + OOM_MARGIN
            _constrain(trial, constraints)
            oom = {"where": f.where, "message": f.summary, "figures": list(f.figures), "log_dir": f.log_dir}
            trial.set_user_attr("status", "oom")
            trial.set_user_attr("oom", oom)
            _write(ctx, trial.number, {**base, "status": "oom", "oom": oom, "error": str(f), "wall_s": wall})
            return {"status": "oom", "value": worst, "oom": oom, "wall_s": wall}
        trial.set_user_attr("status", f.kind)
        trial.set_user_attr("error", str(f)[:4000])
        _write(ctx, trial.number, {**base, "status": f.kind, "error": str(f), "log_dir": f.log_dir, "wall_s": wall})
        return {"status": f.kind, "error": f.summary, "wall_s": wall}
    except KeyboardInterrupt as e:
        _write(ctx, trial.number, {**base, "status": "interrupted", "signal": ctx.interrupt_name(e),
                                   "wall_s": time.monotonic() - started})
        raise
    wall = time.monotonic() - started
    measured = measured_figures(record)
    value = ctx.value_of(measured)
    if value is None or not math.isfinite(value) or value <= 0:
        error = f"the run's record has no usable {'throughput_tok_s' if ctx.maximize else 'decode_step_s'}"
        trial.set_user_attr("status", "crash")
        trial.set_user_attr("error", error)
        _write(ctx, trial.number, {**base, "status": "crash", "error": error, "record": record.to_json(),
                                   "wall_s": wall})
        return {"status": "crash", "error": error, "wall_s": wall}
    measured["value"] = value
    constraints = dict(predicted["constraints"])
    if measured["gpu_peak_bytes"] and record.device == "cuda" and not record.simulated:
        constraints["gpu_memory"] = _measured_gpu_constraint(ctx, measured["gpu_peak_bytes"])  # what it really took
    constraints = {k: min(v, 0.0) for k, v in constraints.items()}  # it ran: nothing was broken
    _constrain(trial, constraints)
    for name, v in (("status", "ok"), ("measured", measured), ("record", record.slim().to_json()), ("wall_s", wall)):
        trial.set_user_attr(name, v)
    _write(ctx, trial.number, {**base, "status": "ok", "measured": measured, "wall_s": wall,
                               "record": record.to_json()})
    return {"status": "ok", "value": value, "measured": measured, "wall_s": wall}


def _measured_gpu_constraint(ctx: TrialContext, peak_allocated_bytes: float) -> float:
    """Measured peak over usable memory, less 1. ``max_memory_allocated`` leaves out the CUDA context and
    allocator slack, so the (calibrated) profile's reserve for them is added back."""
    hw = ctx.surrogate.profile
    usable = hw.usable_gpu_bytes
    return (peak_allocated_bytes + hw.efficiency.gpu_reserved_bytes) / usable - 1.0
