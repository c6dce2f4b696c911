"""Records in, figures out: what calibration compares for each RunRecord, and how far the model is from it.

``measurement`` reads one ``hpi.records.RunRecord`` (its plan, model, workload and run conditions, and the
three measured figures of ``METRICS``); ``predict_measurements`` re-predicts each on a profile (the prediction
stored in the record is not used); ``summarize`` gives the absolute percentage errors.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from hpi.planner.catalog import load_model
from hpi.planner.cost.estimate import evaluate
from hpi.planner.cost.inputs import Arrangement, Knobs
from hpi.planner.feasibility import plan_problems
from hpi.planner.predict import arrangement_for
from hpi.planner.specs.hardware import HardwareProfile
from hpi.planner.specs.model import ModelSpec
from hpi.planner.specs.plan import Plan
from hpi.planner.specs.workload import SWITCHES, Workload
from hpi.record_files import skip_reason
from hpi.records import RunRecord

METRICS = ("decode_step_s", "prefill_s", "peak_gpu_bytes")


class CalibrationError(ValueError):
    """Records that cannot be calibrated from; the message names the record and the fix."""


# ---- records ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """What calibration needs from one RunRecord: the run's inputs and its three measured figures."""

    record_id: str
    model: ModelSpec
    plan: Plan
    workload: Workload
    decode_step_s: float  # median decode step
    prefill_s: float
    peak_gpu_bytes: float  # max over ranks of torch.cuda.max_memory_allocated
    recorded_hardware: str  # the profile the record names (it may be wrong: the manifest corrects it)
    source_path: str = ""

    def measured(self, metric: str) -> float:
        return float(getattr(self, metric))

    @property
    def key(self) -> str:
        return plan_key(self)


def _as_record(record: RunRecord | Mapping[str, Any]) -> RunRecord:
    """A RunRecord, or a document of one read through ``hpi.records`` (the one parser)."""
    return record if isinstance(record, RunRecord) else RunRecord.from_json(record)


def _missing(rid: str, key: str) -> CalibrationError:
    return CalibrationError(f"record {rid}: missing {key}; is it a RunRecord written by hpi run?")


def measurement(record: RunRecord | Mapping[str, Any],
                model_loader: Callable[[str], ModelSpec] = load_model) -> Measurement:
    """Read one RunRecord (or its document); a model not in the catalogue names the record and the fix."""
    record = _as_record(record)
    rid = record.record_id
    if record.plan is None:
        raise _missing(rid, "plan")
    try:
        plan = Plan.from_dict(dict(record.plan))
    except (TypeError, ValueError) as e:
        raise CalibrationError(f"record {rid}: bad plan: {e}") from None
    try:
        conditions = record.conditions
    except (TypeError, ValueError) as e:
        raise CalibrationError(f"record {rid}: spec: {e}") from None
    model_name = record.model_name
    if not model_name:
        raise CalibrationError(f"record {rid}: no model name (model.name or spec.model)")
    model = _record_model(record, str(model_name), model_loader)
    if model is None:
        raise CalibrationError(f"record {rid}: model {model_name!r} is not in the catalogue (hpi models), and its "
                               f"config {conditions.model!r} is not here either; add the config.json to the "
                               "catalogue or leave the record out")
    try:
        workload = Workload(conditions.prompt_len_tokens, conditions.gen_len_tokens, **run_conditions(record))
    except ValueError as e:
        raise CalibrationError(f"record {rid}: spec.workload: {e}") from None
    timings = record.timings
    if timings.decode_step_s is None:
        raise _missing(rid, "decode_step_s")
    if timings.prefill_s is None:
        raise _missing(rid, "prefill_s")
    decode_median, prefill = float(timings.decode_step_s.median_s), float(timings.prefill_s)
    if decode_median <= 0 or prefill <= 0:
        raise CalibrationError(f"record {rid}: decode step {decode_median} s / prefill {prefill} s: nothing measured")
    return Measurement(
        record_id=rid, model=model, plan=plan, workload=workload, decode_step_s=decode_median, prefill_s=prefill,
        peak_gpu_bytes=float(record.gpu_peak_allocated_bytes),
        recorded_hardware=str(record.hardware or conditions.hardware or ""),
        source_path=record.source.path if record.source else "",
    )  # fmt: skip


def run_conditions(record: RunRecord) -> dict[str, str | bool]:
    """The Workload fields a RunRecord's spec sets besides the lengths (``RunRecord.conditions``: older records
    read as the conditions they ran with)."""
    c = record.conditions
    return {"compute_dtype": c.dtype, "fetch_wait": c.fetch_wait, **{name: getattr(c, name) for name in SWITCHES}}


_REPO = Path(__file__).resolve().parents[3]


def _record_model(record: RunRecord, name: str, loader: Callable[[str], ModelSpec]) -> ModelSpec | None:
    """The catalogue model the record names, else the config the run loaded (spec.model): as written, or,
    for a path of another machine (a run from an exported tree), the same path's tail in this repository."""
    candidates = [name]
    spec_model = str(record.conditions.model or "")
    if spec_model and spec_model != name:
        candidates.append(spec_model)
        parts = Path(spec_model).parts
        candidates += [str(_REPO.joinpath(*parts[i:])) for i in range(1, len(parts))
                       if _REPO.joinpath(*parts[i:]).is_file()]
    for candidate in candidates:
        try:
            return loader(candidate)
        except (ValueError, OSError):
            continue
    return None


def plan_key(m: Measurement) -> str:
    """Runs of one plan (model, workload and its run conditions, every plan field) share a key
    (``Plan.key``): repeats are held out together."""
    return m.plan.key(m.model.name, m.workload)


def as_measurements(records: Sequence[RunRecord | Mapping[str, Any] | Measurement]) -> list[Measurement]:
    """Measurements of the records (documents that are not RunRecords, e.g. baselines, are left out)."""
    out = []
    for r in records:
        if isinstance(r, Measurement):
            out.append(r)
        elif isinstance(r, RunRecord) or skip_reason(r) is None:
            out.append(measurement(r))
    return out


# ---- predictions --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    record_id: str
    measured: Mapping[str, float]
    predicted: Mapping[str, float]

    def ape(self, metric: str) -> float:
        """Absolute percentage error of one metric, as a fraction: |predicted / measured - 1|."""
        return abs(self.predicted[metric] / self.measured[metric] - 1.0)


@dataclass(frozen=True)
class _Batch:
    """Records that share a layout (model, workload, tp, pp, dp), evaluated together as one vectorised call."""

    arrangement: Arrangement
    knobs: Knobs
    rows: tuple[int, ...]  # their indices in the measurement list


@dataclass(frozen=True)
class Cases:
    """Measurements grouped into vectorised batches, with their measured figures (records, metrics)."""

    measurements: tuple[Measurement, ...]
    batches: tuple[_Batch, ...]
    measured: np.ndarray  # (records, metrics)


def build_cases(profile: HardwareProfile, measurements: Sequence[Measurement]) -> Cases:
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(measurements):
        problems = plan_problems(m.model, profile, m.plan)
        if problems:
            raise CalibrationError(f"record {m.record_id}: its plan cannot be built on {profile.name}: {problems[0]}")
        groups.setdefault((m.model, m.workload, m.plan.tp, m.plan.pp, m.plan.dp), []).append(i)
    batches = []
    for (model, workload, tp, pp, dp), rows in groups.items():
        lay = arrangement_for(model, profile, workload, tp, pp, dp)
        batches.append(_Batch(lay, Knobs.from_plans([measurements[i].plan for i in rows]), tuple(rows)))
    measured = np.array([[m.measured(k) for k in METRICS] for m in measurements], dtype=float).reshape(-1, len(METRICS))
    return Cases(tuple(measurements), tuple(batches), measured)


def predict_array(cases: Cases, hardware: HardwareProfile) -> np.ndarray:
    """(records, metrics) predicted figures, in ``METRICS`` order."""
    out = np.zeros((len(cases.measurements), len(METRICS)))
    for b in cases.batches:
        # The placement (links, ceilings) does not depend on the efficiencies: swap the profile only.
        ev = evaluate(dataclasses.replace(b.arrangement, hardware=hardware), b.knobs)
        mem = ev.memory
        rows = list(b.rows)
        out[rows, 0] = ev.decode_step_s
        out[rows, 1] = ev.prefill_s
        out[rows, 2] = mem.gpu_peak_bytes - mem.gpu_parts["framework"]
    return out


def predictions_of(cases: Cases, hardware: HardwareProfile) -> list[Prediction]:
    pred = predict_array(cases, hardware)
    return [Prediction(m.record_id, dict(zip(METRICS, map(float, cases.measured[i]))),
                       dict(zip(METRICS, map(float, pred[i]))))
            for i, m in enumerate(cases.measurements)]


def predict_measurements(profile: HardwareProfile,
                         records: Sequence[RunRecord | Mapping[str, Any] | Measurement]) -> list[Prediction]:
    """Measured and predicted figures of each record on ``profile`` (as calibration compares them)."""
    return predictions_of(build_cases(profile, as_measurements(records)), profile)


# ---- errors -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorSummary:
    """Absolute percentage errors (fractions) over records and metrics; ``by_metric`` per metric."""

    n_records: int
    median_ape: float
    max_ape: float
    by_metric: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"n_records": self.n_records, "median_ape": self.median_ape, "max_ape": self.max_ape,
                "by_metric": {k: dict(v) for k, v in self.by_metric.items()}}


def summarize(predictions: Sequence[Prediction], metrics: Sequence[str] = METRICS) -> ErrorSummary:
    """Median and max APE over every (record, metric) pair, and per metric."""
    by_metric: dict[str, dict[str, float]] = {}
    every: list[float] = []
    for metric in metrics:
        errors = [p.ape(metric) for p in predictions if p.measured.get(metric)]
        every += errors
        if errors:
            by_metric[metric] = {"n": len(errors), "median_ape": statistics.median(errors), "max_ape": max(errors)}
    if not every:
        return ErrorSummary(len(predictions), math.nan, math.nan, by_metric)
    return ErrorSummary(len(predictions), statistics.median(every), max(every), by_metric)

