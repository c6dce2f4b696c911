"""Where a study lives and how it survives interruptions.

Storage: ``sqlite:///<studies>/<study>/study.db`` by default (any SQLAlchemy URL lets several machines
share one study), opened with ``load_if_exists=True`` so running the same command again resumes it.

Interrupted trials are re-run, never lost and never counted:

- Ctrl-C or SIGTERM, before or during a trial's run (or a launch interrupted): the objective marks the trial
  ``interrupted`` (the signal's name) and Optuna records it FAIL; the next start re-queues its parameters,
  however often it was interrupted. After the run, the signal waits until the trial is told (``tuner``).
- A process killed outright leaves its trial RUNNING. If it ran on this host and its process is gone, the
  next start fails it at once and re-queues it; a trial of another machine is failed by Optuna's heartbeat
  once it is stale (``grace_period``) and re-queued by ``RetryHeartbeatStaleTrialCallback``.

Re-queued trials carry Optuna's ``failed_trial`` / ``retry_history`` system attributes; a trial that has
been retried does not count toward ``--trials``.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from hpi.autotune.surrogate import Observation
from hpi.planner.specs.plan import Plan
from hpi.records import Prediction, RunRecord

HEARTBEAT_INTERVAL_S = 30
GRACE_PERIOD_S = 120  # a trial silent this long on another machine is taken as dead
MAX_RETRY = 2
PROCESS_GONE = "process gone"  # the "interrupted" mark of a trial whose process died without a word
MEMORY_STORAGE = "memory"  # in-process storage (benchmarks): nothing written, nothing resumed


def default_storage(studies_dir: Path, study: str) -> str:
    path = (studies_dir / study / "study.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _storage(url: str):
    if url == MEMORY_STORAGE:
        return optuna.storages.InMemoryStorage()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(url, heartbeat_interval=HEARTBEAT_INTERVAL_S, grace_period=GRACE_PERIOD_S,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))


def open_study(name: str, storage_url: str, maximize: bool, sampler: optuna.samplers.BaseSampler,
               identity: dict[str, Any]) -> optuna.Study:
    """Create or load the study; refuse to resume one created for another model/machine/workload/objective."""
    try:
        study = optuna.create_study(study_name=name, storage=_storage(storage_url), sampler=sampler,
                                    direction="maximize" if maximize else "minimize", load_if_exists=True)
    except ValueError as e:  # an existing study of the other direction
        raise ValueError(f"study {name!r} in {storage_url} exists with another objective direction ({e}): "
                         "pass another --study NAME") from None
    known = study.user_attrs.get("identity")
    if known is None:
        study.set_user_attr("identity", identity)
    elif known != identity:
        diff = sorted(k for k in set(known) | set(identity) if known.get(k) != identity.get(k))
        detail = ", ".join(f"{k}: {known.get(k)!r} there, {identity.get(k)!r} now" for k in diff)
        raise ValueError(f"study {name!r} was created for other settings ({detail}): run the same command to "
                         "resume it, or pass another --study NAME")
    return study


def owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(study: optuna.Study) -> list[int]:
    """Fail this host's orphaned RUNNING trials and re-queue every interrupted trial; returns their numbers."""
    host = socket.gethostname()
    storage = study._storage  # noqa: SLF001 - the storage API (set_trial_state_values) is public on it
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        who = t.user_attrs.get("owner") or {}
        if who.get("host") == host and not _pid_alive(int(who.get("pid", -1))):
            storage.set_trial_user_attr(t._trial_id, "interrupted", PROCESS_GONE)  # noqa: SLF001
            try:
                storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)  # noqa: SLF001
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
    retried = retried_numbers(study)
    requeued = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # A trial whose process vanished may be what killed it (the host ran out of memory): retried MAX_RETRY
        # times. One stopped by a signal is the user's doing, not the plan's: retried however often it came.
        retry = RetryHeartbeatStaleTrialCallback()
        for t in study.get_trials(deepcopy=True, states=(TrialState.FAIL,)):
            why = t.user_attrs.get("interrupted")
            if not why or t.number in retried:
                continue
            if why == PROCESS_GONE and len(t.system_attrs.get("retry_history", [])) >= MAX_RETRY:
                continue
            retry(study, t)
            requeued.append(t.number)
    return requeued


def retried_numbers(study: optuna.Study) -> set[int]:
    """Trials that have been re-queued (their retry replaces them)."""
    out: set[int] = set()
    for t in study.get_trials(deepcopy=False):
        out.update(t.system_attrs.get("retry_history", []))
    return out


def counted(study: optuna.Study) -> int:
    """Finished trials toward ``--trials``: measured, crashed or refused by prediction, not interrupted ones."""
    retried = retried_numbers(study)
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
               if t.number not in retried and not t.user_attrs.get("interrupted"))


def waiting(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def observation(t: FrozenTrial) -> Observation | None:
    """What the surrogate learns from a finished trial (None: nothing, e.g. an interrupted one)."""
    status = t.user_attrs.get("status")
    plan = t.user_attrs.get("plan")
    if plan is None or status not in ("ok", "oom", "crash", "timeout", "predicted_overflow"):
        return None
    measured = t.user_attrs.get("measured") or {}
    return Observation(plan=Plan.from_dict(plan), status=status, value=measured.get("value"),
                       record=trial_record(t), oom_where=(t.user_attrs.get("oom") or {}).get("where", "gpu"))


def trial_record(t: FrozenTrial) -> RunRecord | None:
    """The RunRecord a measured trial keeps in the study (its slim copy), read through ``hpi.records``."""
    doc = t.user_attrs.get("record")
    return RunRecord.from_json(doc) if doc else None


def trial_prediction(t: FrozenTrial) -> Prediction | None:
    """The uncalibrated prediction the trial's run carried (None: no record, or a record without one)."""
    record = trial_record(t)
    return record.prediction if record else None


def observations(study: optuna.Study) -> list[Observation]:
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        o = observation(t)
        if o is not None:
            out.append(o)
    return out


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best feasible measured trial (Optuna's ``best_trial`` honours the constraints)."""
    try:
        t = study.best_trial
    except ValueError:
        return None
    return t if t.user_attrs.get("status") == "ok" else None
