"""Fit the cost model's coefficients (``Efficiency``) to measured RunRecords.

    records = load_records(["benchmarks/results/2026-11-22-h200x2"])   # files, bundles, folders
    prior = load_profile("h200-2gpu", calibrated=False)                 # probed ceilings, default efficiencies
    cal = fit(prior, records)                                           # Calibration: values, ids, errors
    profile = apply(prior, cal)                                         # or calibrate(prior, records)

What a record measures and what the model predicts for it (``METRICS``):
- ``decode_step_s``: the median decode step (the record's ``decode_step_s.median``) against the model's
  decode step;
- ``prefill_s``: the first forward (prefill = TTFT) against the model's prefill;
- ``peak_gpu_bytes``: the largest ``torch.cuda.max_memory_allocated`` over ranks against the GPU parts
  the caching allocator holds (``cost.memory.ALLOCATED_PARTS``: the model's ``gpu_peak_bytes`` less its
  ``framework`` part, CUDA context and allocator slack, which ``max_memory_allocated`` never counts). Reserved bytes are not
  used: under ZeRO-3 the allocator caches every gathered buffer it saw (19.6 GB reserved for 3.2 GB
  allocated on the 8B offload records), and it hands that cache back before it reports out-of-memory.

Method: every record is re-predicted from its plan and workload on the given profile (the prediction
stored in the record is ignored: it may come from another profile or an older model). The coefficients
in ``CANDIDATES`` are fitted in log space (a coefficient c = prior * exp(theta)) by
``scipy.optimize.least_squares`` on the log ratios predicted / measured of every record and metric,
within physical bounds (fractions in (0, 1], times and bytes in [prior/1000, prior*1000]), with a
Cauchy loss (robust to a run the model cannot explain) and a ridge pull toward the prior whose weight
depends on the prior's provenance (``prior_weight``: a measured number weighs more than an assumed
default), so that a coefficient the records barely constrain stays near its prior. A coefficient is
*fitted* when some record's prediction would move by ``SENSITIVITY_MIN`` (5%) somewhere within the
coefficient's bounds, and stays exactly at its prior otherwise (e.g. ``nvme_read`` without an NVMe
record): ``Calibration.support`` counts the records that move when the fitted value goes 10x either way,
``unidentified`` lists the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from hpi.planner.catalog import load_model
from hpi.planner.cost.estimate import evaluate
from hpi.planner.cost.inputs import Arrangement, Knobs
from hpi.planner.feasibility import plan_problems
from hpi.planner.predict import arrangement_for
from hpi.planner.specs.hardware import Efficiency, HardwareProfile, Provenance, is_fraction
from hpi.planner.specs.model import ModelSpec
from hpi.planner.specs.plan import Plan
from hpi.planner.specs.workload import Workload

__all__ = [
    "CANDIDATES",
    "METRICS",
    "Calibration",
    "CalibrationError",
    "ErrorSummary",
    "Measurement",
    "Prediction",
    "RecordList",
    "apply",
    "calibrate",
    "fit",
    "load_records",
    "measurement",
    "plan_key",
    "predict_measurements",
    "prior_weight",
    "record_id",
    "render_section",
    "replace_section",
    "split_by_plan",
    "summarize",
    "write_section",
]

METRICS = ("decode_step_s", "prefill_s", "peak_gpu_bytes")
RECORD_KIND = "hpi.RunRecord"

# Coefficients calibration may fit, each with the bounds of its kind. ``gpu_memory_usable`` and
# ``dram_usable`` are planning policy, not measurements; ``host_reserved_bytes`` shows in no metric.
CANDIDATES = (
    "matmul_prefill", "matmul_decode", "hbm", "h2d_stream_pinned", "h2d_stream_pageable", "nvme_read",
    "prefetch_overlap", "collective_bandwidth", "allreduce_latency_s", "collective_host_overhead_s",
    "p2p_latency_s", "layer_overhead_s", "layer_device_overhead_s", "offload_layer_overhead_s", "step_overhead_s", "graphed_step_overhead_s",
    "gpu_workspace_bytes",
    "gpu_reserved_bytes", "dequant_hbm", "collective_drift_factor",
)  # fmt: skip
# The prior as a (log-normal) Bayesian prior: its pull is the measurement spread over the prior's own
# spread, which depends on where the prior comes from. A probed or measured number (NCCL's 37 us alpha)
# is worth far more than an assumed default (the 0.62 streaming fraction of another machine).
MEASUREMENT_SPREAD = 0.05  # run-to-run spread of one figure on one machine (SUMMARY.md, 2x H200: ~5%)
PRIOR_SPREAD = {"datasheet": math.log(1.5), "probed": math.log(1.5), "measured": math.log(1.5),
                "published": math.log(1.5), "assumed": math.log(4.0), "calibrated": math.log(4.0)}
# Coefficients that state a structural assumption rather than a measured fraction get a tight prior
# whatever their provenance: prefetch_overlap = 1 is FlexGen's rule that copy engines stream while the
# SMs compute; a fit may bend it only on strong evidence, not to absorb an effect the model lacks.
STRUCTURAL_SPREAD = {"prefetch_overlap": math.log(1.25)}
# Cauchy loss at twice the measurement spread: residuals up to ~10% count as squares, larger ones only
# logarithmically, so a run the model cannot explain (a structural gap, a broken run) cannot drag
# weakly constrained coefficients to unphysical values to shave a little off its error. (At 1x the
# spread the leave-one-out folds flipped between which run they sacrificed; at 4x outliers dragged.)
ROBUST_SCALE = 2.0 * MEASUREMENT_SPREAD
GRADUATION = (4.0, 1.0)  # the loss scale, as multiples of ROBUST_SCALE, of the successive warm-started fits
SENSITIVITY_MIN = 0.05  # |log| a prediction must move (5%) for a record to say anything about a coefficient
_RANGE = 1e3  # times and bytes may move a factor 1000 either way from the prior


class CalibrationError(ValueError):
    """Records that cannot be calibrated from; the message names the record and the fix."""


# ---- records ------------------------------------------------------------------------------------------


class RecordList(list):
    """``load_records``' result: the RunRecords (dicts), plus ``skipped``: how many entries were left out, by reason."""

    def __init__(self, records: Iterable[dict] = (), skipped: Mapping[str, int] | None = None) -> None:
        super().__init__(records)
        self.skipped: dict[str, int] = dict(skipped or {})


def _skip_reason(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return "not a JSON object"
    if "error" in entry:
        return "error"
    if entry.get("kind") != RECORD_KIND:
        return "baseline" if "baseline" in entry else "not a RunRecord"
    return None


TRIAL_KIND = "hpi.AutotuneTrial"  # one trial of hpi autotune (hpi.autotune.objective): its RunRecord under "record"


def _unwrap(entry: Any) -> Any:
    """An autotune trial's own RunRecord; any other entry as it is (a failed trial has no record: skipped)."""
    if isinstance(entry, dict) and entry.get("kind") == TRIAL_KIND and isinstance(entry.get("record"), dict) \
            and "error" not in entry:
        return entry["record"]
    return entry


def _entries(data: Any, path: Path) -> list[tuple[str | None, Any]]:
    """(entry name, value) pairs of a record file: one record, a list of them, or a bundle {name: record}."""
    if isinstance(data, list):
        return [(None, item) for item in data]
    if isinstance(data, dict) and "kind" not in data and all(isinstance(v, dict) for v in data.values()) and data:
        return list(data.items())
    if isinstance(data, dict):
        return [(None, data)]
    raise CalibrationError(f"{path}: expected a RunRecord, a list of them or a bundle {{name: record}}, got {type(data).__name__}")


def _default_id(path: Path, entry: str | None, index: int, n: int) -> str:
    if entry is not None:
        return f"{path.stem}/{entry}"
    base = f"{path.parent.name}/{path.stem}" if path.stem == "record" else path.stem
    return base if n == 1 else f"{base}[{index}]"


def load_records(paths: str | Path | Sequence[str | Path]) -> RecordList:
    """RunRecords from files, bundles ({entry name: record}), lists, or folders (every ``*.json``, recursively).
    An ``hpi autotune`` trial file stands for the RunRecord it holds.

    Baselines, error entries and other JSON are skipped and counted in the result's ``skipped``. Each
    record is returned as a copy with ``_source`` = {path, entry, id} added; ``record_id`` reads it.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*.json") if q.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise CalibrationError(f"record path {p} does not exist: pass a record file, a bundle or a folder")
    out = RecordList()
    for path in files:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
        except OSError as e:
            raise CalibrationError(f"cannot read record file {path}: {e.strerror}") from None
        entries = _entries(data, path)
        for index, (name, entry) in enumerate(entries):
            entry = _unwrap(entry)
            reason = _skip_reason(entry)
            if reason:
                out.skipped[reason] = out.skipped.get(reason, 0) + 1
                continue
            source = {"path": str(path), "entry": name, "id": _default_id(path, name, index, len(entries))}
            out.append({**entry, "_source": source})
    return out


def record_id(record: Mapping[str, Any]) -> str:
    """A stable name: ``<file stem>/<entry>`` for a bundle entry, else the run folder, else a plan hash."""
    source = record.get("_source")
    if isinstance(source, Mapping) and source.get("id"):
        return str(source["id"])
    entry = record.get("entry")
    if isinstance(entry, Mapping) and entry.get("name"):
        return str(entry["name"])
    out_dir = (record.get("spec") or {}).get("out_dir")
    if out_dir:
        return Path(out_dir).name
    digest = hashlib.sha1(json.dumps(record.get("plan"), sort_keys=True).encode()).hexdigest()[:10]
    return f"record-{digest}"


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


def _require(record: Mapping[str, Any], rid: str, *keys: str) -> Any:
    value: Any = record
    for k in keys:
        if not isinstance(value, Mapping) or k not in value:
            raise CalibrationError(f"record {rid}: missing {'.'.join(keys)}; is it a RunRecord written by hpi run?")
        value = value[k]
    return value


def measurement(record: Mapping[str, Any], model_loader: Callable[[str], ModelSpec] = load_model) -> Measurement:
    """Read one RunRecord; a model not in the catalogue names the record and the fix."""
    rid = record_id(record)
    plan_fields = _require(record, rid, "plan")
    try:
        plan = Plan.from_dict(dict(plan_fields))
    except (TypeError, ValueError) as e:
        raise CalibrationError(f"record {rid}: bad plan: {e}") from None
    spec = record.get("spec") or {}
    model_name = (record.get("model") or {}).get("name") or spec.get("model")
    if not model_name:
        raise CalibrationError(f"record {rid}: no model name (model.name or spec.model)")
    model = _record_model(record, str(model_name), model_loader)
    if model is None:
        raise CalibrationError(f"record {rid}: model {model_name!r} is not in the catalogue (hpi models), and its "
                               f"config {spec.get('model')!r} is not here either; add the config.json to the "
                               "catalogue or leave the record out")
    wl = spec.get("workload") or {}
    try:
        workload = Workload(int(wl.get("prompt_len_tokens", 0)), int(wl.get("gen_len_tokens", 0)),
                            **run_conditions(record))
    except ValueError as e:
        raise CalibrationError(f"record {rid}: spec.workload: {e}") from None
    decode = _require(record, rid, "decode_step_s")
    decode_median = float(decode["median"] if isinstance(decode, Mapping) else decode)
    prefill = float(_require(record, rid, "prefill_s"))
    ranks = record.get("ranks") or []
    peak = max((float(r.get("peak_allocated_bytes") or 0) for r in ranks), default=0.0)
    if decode_median <= 0 or prefill <= 0:
        raise CalibrationError(f"record {rid}: decode step {decode_median} s / prefill {prefill} s: nothing measured")
    return Measurement(
        record_id=rid, model=model, plan=plan, workload=workload, decode_step_s=decode_median, prefill_s=prefill,
        peak_gpu_bytes=peak, recorded_hardware=str(record.get("hardware") or spec.get("hardware") or ""),
        source_path=str((record.get("_source") or {}).get("path", "")),
    )  # fmt: skip


# The run conditions a record's spec carries outside the Plan (``Workload.compute_dtype`` from
# ``spec.dtype``, ``Workload.fetch_wait`` from ``spec.fetch_wait``), with the value records written before
# the field existed ran with (hpi.executor.spec: fetch_wait arrived with the stream-ordered wait; before it,
# every run used DeepSpeed's stock host wait; dtype was always recorded, bf16 its default; runs before
# ``decode_graphs`` decoded eagerly).
CONDITION_FIELDS = {"compute_dtype": ("dtype", "bf16"), "fetch_wait": ("fetch_wait", "host"),
                    "decode_graphs": ("decode_graphs", False)}


def run_conditions(record: Mapping[str, Any]) -> dict[str, str | bool]:
    """The Workload fields a RunRecord's spec sets besides the lengths: {field: value}, typed as the default."""
    spec = record.get("spec") or {}
    out: dict[str, str | bool] = {}
    for name, (key, default) in CONDITION_FIELDS.items():
        value = spec.get(key)
        out[name] = default if value in (None, "") else type(default)(value)
    return out


_REPO = Path(__file__).resolve().parents[2]


def _record_model(record: Mapping[str, Any], name: str, loader: Callable[[str], ModelSpec]) -> ModelSpec | None:
    """The catalogue model the record names, else the config the run loaded (spec.model): as written, or,
    for a path of another machine (a run from an exported tree), the same path's tail in this repository."""
    candidates = [name]
    spec_model = str((record.get("spec") or {}).get("model") or "")
    if spec_model and spec_model != name:
        candidates.append(spec_model)
        parts = Path(spec_model).parts
        candidates += [str(_REPO.joinpath(*parts[i:])) for i in range(1, len(parts)) if _REPO.joinpath(*parts[i:]).is_file()]
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


def _measurements(records: Sequence[Mapping[str, Any] | Measurement]) -> list[Measurement]:
    out = []
    for r in records:
        if isinstance(r, Measurement):
            out.append(r)
        elif _skip_reason(r) is None:
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

    layout: Arrangement
    knobs: Knobs
    rows: tuple[int, ...]  # their indices in the measurement list


@dataclass(frozen=True)
class _Cases:
    measurements: tuple[Measurement, ...]
    batches: tuple[_Batch, ...]
    measured: np.ndarray  # (records, metrics)


def _cases(profile: HardwareProfile, measurements: Sequence[Measurement]) -> _Cases:
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
    return _Cases(tuple(measurements), tuple(batches), measured)


def _predict_array(cases: _Cases, hardware: HardwareProfile) -> np.ndarray:
    """(records, metrics) predicted figures, in ``METRICS`` order."""
    out = np.zeros((len(cases.measurements), len(METRICS)))
    for b in cases.batches:
        # The placement (links, ceilings) does not depend on the efficiencies: swap the profile only.
        ev = evaluate(dataclasses.replace(b.layout, hardware=hardware), b.knobs)
        mem = ev.memory
        rows = list(b.rows)
        out[rows, 0] = ev.decode_step_s
        out[rows, 1] = ev.prefill_s
        out[rows, 2] = mem.gpu_peak_bytes - mem.gpu_parts["framework"]
    return out


def _predictions(cases: _Cases, hardware: HardwareProfile) -> list[Prediction]:
    pred = _predict_array(cases, hardware)
    return [Prediction(m.record_id, dict(zip(METRICS, map(float, cases.measured[i]))), dict(zip(METRICS, map(float, pred[i]))))
            for i, m in enumerate(cases.measurements)]


def predict_measurements(profile: HardwareProfile, records: Sequence[Mapping[str, Any] | Measurement]) -> list[Prediction]:
    """Measured and predicted figures of each record on ``profile`` (as calibration compares them)."""
    return _predictions(_cases(profile, _measurements(records)), profile)


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


# ---- the fit ------------------------------------------------------------------------------------------


def _is_fraction(name: str) -> bool:
    return is_fraction(name)


def _bounds(name: str, prior: float) -> tuple[float, float]:
    """Bounds of theta = log(value / prior): fractions in [1e-3, 1]; times, bytes and factors a factor 1000
    around the prior."""
    if _is_fraction(name):
        return math.log(1e-3 / prior), math.log(1.0 / prior)
    return -math.log(_RANGE), math.log(_RANGE)


def _with(eff: Efficiency, names: Sequence[str], theta: np.ndarray) -> Efficiency:
    values = {}
    for n, t in zip(names, theta):
        v = getattr(eff, n) * math.exp(float(t))
        values[n] = min(v, 1.0) if _is_fraction(n) else v  # exp(log(1/prior)) may round a hair above 1
    return dataclasses.replace(eff, **values)


def _log_ratios(cases: _Cases, profile: HardwareProfile, eff: Efficiency) -> np.ndarray:
    """(records, metrics) log(predicted / measured); NaN where nothing was measured."""
    pred = _predict_array(cases, dataclasses.replace(profile, efficiency=eff))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log(pred / cases.measured)
    return np.where((cases.measured > 0) & (pred > 0), ratio, np.nan)


def _reach(cases: _Cases, profile: HardwareProfile, eff: Efficiency, names: Sequence[str], factor: float) -> np.ndarray:
    """(records, coefficients) how far each prediction moves, in |log|, when one coefficient alone goes
    ``factor`` times up and down from ``eff`` (clipped to its bounds); the largest over the metrics."""
    base = np.nan_to_num(_log_ratios(cases, profile, eff))
    out = np.zeros((len(cases.measurements), len(names)))
    for k, name in enumerate(names):
        lo, hi = _bounds(name, getattr(eff, name))
        for step in (max(-math.log(factor), lo), min(math.log(factor), hi)):
            if step == 0:
                continue
            moved = np.nan_to_num(_log_ratios(cases, profile, _with(eff, [name], np.array([step]))))
            out[:, k] = np.maximum(out[:, k], np.abs(moved - base).max(axis=1))
    return out


def prior_weight(profile: HardwareProfile, name: str) -> float:
    """Ridge weight of one coefficient: MEASUREMENT_SPREAD / the spread its provenance gives the prior."""
    source = profile.provenance.get(f"efficiency.{name}")
    spread = PRIOR_SPREAD.get(source.source if source else "assumed", PRIOR_SPREAD["assumed"])
    return MEASUREMENT_SPREAD / min(spread, STRUCTURAL_SPREAD.get(name, spread))


def _least_squares(cases: _Cases, profile: HardwareProfile, prior: Efficiency, names: Sequence[str],
                   ridge: float | None) -> np.ndarray:
    from scipy.optimize import least_squares

    if not names:
        return np.zeros(0)
    bounds = np.array([_bounds(n, getattr(prior, n)) for n in names])
    lo, hi = bounds[:, 0], bounds[:, 1]
    weights = np.array([prior_weight(profile, n) if ridge is None else ridge for n in names])

    def residuals(theta: np.ndarray) -> np.ndarray:
        r = _log_ratios(cases, profile, _with(prior, names, theta))
        return np.concatenate([np.nan_to_num(r[np.isfinite(r)]), weights * theta])

    # Start 1% inside the bounds: a prior sitting on one (prefetch_overlap = 1) leaves the trust region
    # scaling of a bounded least-squares solver no room to take a first step.
    x = np.clip(np.zeros(len(names)), lo + 0.01, hi - 0.01)
    # Graduated robustness: a Cauchy loss started far from the optimum sees every residual as an outlier
    # and barely moves, so the scale shrinks from 4x its final value, each fit warm-started.
    for scale in ROBUST_SCALE * np.array(GRADUATION):
        x = least_squares(residuals, x, bounds=(lo, hi), method="trf", loss="cauchy", f_scale=scale,
                          diff_step=1e-3, xtol=1e-6, ftol=1e-6, gtol=1e-8, max_nfev=30).x
    return x


@dataclass(frozen=True)
class Calibration:
    """Coefficients fitted to a set of RunRecords on one profile.

    ``values`` and ``priors`` hold the fitted coefficients only (the rest of ``Efficiency`` keeps its
    prior: ``unidentified`` lists the candidates no record could move); ``support`` counts the records
    whose predictions move with each fitted coefficient. Errors are over ``record_ids`` (in-sample).
    """

    profile: str
    values: Mapping[str, float]
    priors: Mapping[str, float]
    support: Mapping[str, int]
    unidentified: tuple[str, ...]
    record_ids: tuple[str, ...]
    error_before: ErrorSummary
    error_after: ErrorSummary

    @property
    def fitted(self) -> tuple[str, ...]:
        return tuple(self.values)

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "coefficients": {n: {"value": v, "prior": self.priors[n], "records": self.support[n]} for n, v in self.values.items()},
            "unidentified": list(self.unidentified),
            "record_ids": list(self.record_ids),
            "error_before": self.error_before.to_dict(),
            "error_after": self.error_after.to_dict(),
        }


def fit(profile: HardwareProfile, records: Sequence[Mapping[str, Any] | Measurement], *,
        coefficients: Sequence[str] = CANDIDATES, ridge: float | None = None) -> Calibration:
    """Fit ``coefficients`` of ``profile.efficiency`` to ``records`` (RunRecord dicts or Measurements).

    The records must come from the machine ``profile`` describes; a record's stored prediction is not
    used. ``ridge`` overrides the per-coefficient prior weights (``prior_weight``) with one value.
    Raises CalibrationError when there is nothing to fit to.
    """
    unknown = [n for n in coefficients if n not in {f.name for f in dataclasses.fields(Efficiency)}]
    if unknown:
        raise CalibrationError(f"unknown coefficient {unknown[0]!r}; Efficiency has {', '.join(CANDIDATES)}")
    measurements = _measurements(records)
    if not measurements:
        raise CalibrationError("no RunRecords to calibrate from (baselines and error entries are skipped)")
    cases = _cases(profile, measurements)
    prior = profile.efficiency
    names = list(coefficients)
    # A coefficient is fitted when some record's prediction would move by SENSITIVITY_MIN anywhere in its
    # bounds (a pipeline send's 15 us alpha matters only if it is really milliseconds: the data decides);
    # the others stay exactly at their prior. Support: records that move when the fitted value goes 10x
    # either way.
    reach = _reach(cases, profile, prior, names, _RANGE)
    identified = [n for k, n in enumerate(names) if (reach[:, k] >= SENSITIVITY_MIN).any()]
    theta = _least_squares(cases, profile, prior, identified, ridge)
    fitted = _with(prior, identified, theta)
    support = _reach(cases, profile, fitted, identified, 10.0) >= SENSITIVITY_MIN
    # Where the fit left a coefficient, no record depends on it: back to its prior, reported unidentified.
    idle = [n for k, n in enumerate(identified) if not support[:, k].any()]
    if idle:
        fitted = dataclasses.replace(fitted, **{n: getattr(prior, n) for n in idle})
        support = support[:, [k for k, n in enumerate(identified) if n not in idle]]
        identified = [n for n in identified if n not in idle]
    before = summarize(_predictions(cases, profile))
    after = summarize(_predictions(cases, dataclasses.replace(profile, efficiency=fitted)))
    return Calibration(
        profile=profile.name,
        values={n: float(getattr(fitted, n)) for n in identified},
        priors={n: float(getattr(prior, n)) for n in identified},
        support={n: int(support[:, k].sum()) for k, n in enumerate(identified)},
        unidentified=tuple(n for n in names if n not in identified),
        record_ids=tuple(m.record_id for m in measurements),
        error_before=before,
        error_after=after,
    )


def apply(profile: HardwareProfile, calibration: Calibration, note: str = "") -> HardwareProfile:
    """The profile with the calibrated coefficients over its efficiencies (provenance ``calibrated``)."""
    provenance = dict(profile.provenance)
    for name, value in calibration.values.items():
        text = note or (f"fitted to {calibration.support[name]} of {len(calibration.record_ids)} records; "
                        f"prior {calibration.priors[name]:.6g}")
        provenance[f"efficiency.{name}"] = Provenance(source="calibrated", note=text)
    efficiency = dataclasses.replace(profile.efficiency, **dict(calibration.values))
    return dataclasses.replace(profile, efficiency=efficiency, provenance=provenance)


def calibrate(profile: HardwareProfile, records: Sequence[Mapping[str, Any] | Measurement]) -> HardwareProfile:
    """``apply(profile, fit(profile, records))``."""
    return apply(profile, fit(profile, records))


# ---- held-out splits ----------------------------------------------------------------------------------


def split_by_plan(measurements: Sequence[Measurement], fraction: float, seed: int = 0
                  ) -> tuple[list[Measurement], list[Measurement]]:
    """(train, held out): whole plans (a run and its repeats) go to one side; seeded, so repeatable.

    ``fraction`` of the plans (rounded up, at least one when fraction > 0) is held out, always leaving at
    least one plan to fit on.
    """
    if not 0.0 <= fraction < 1.0:
        raise CalibrationError(f"holdout fraction {fraction} must be in [0, 1)")
    keys = sorted({m.key for m in measurements})
    if fraction == 0.0 or len(keys) < 2:
        return list(measurements), []
    n_out = min(max(1, math.ceil(fraction * len(keys))), len(keys) - 1)
    order = np.random.default_rng(seed).permutation(len(keys))
    held = {keys[i] for i in order[:n_out]}
    return [m for m in measurements if m.key not in held], [m for m in measurements if m.key in held]


# ---- the profile's calibrated: section -----------------------------------------------------------------

SECTION_KEY = "calibrated"


def _yaml_scalar(value: Any) -> str:
    """One value in YAML flow style (JSON is valid YAML; floats keep 6 significant digits)."""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else json.dumps(None)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_yaml_scalar(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_scalar(v) for v in value) + "]"
    return json.dumps(value)


def _yaml_list(key: str, items: Sequence[str]) -> list[str]:
    """``key:`` and one ``- item`` line per item (indented under the section), or ``key: []``."""
    if not items:
        return [f"  {key}: []"]
    return [f"  {key}:"] + [f"    - {json.dumps(str(i))}" for i in items]


def _error_brief(summary: ErrorSummary) -> dict[str, Any]:
    out: dict[str, Any] = {"n_records": summary.n_records, "median_ape": summary.median_ape, "max_ape": summary.max_ape}
    for metric, stats in summary.by_metric.items():
        out[metric] = {"median_ape": stats["median_ape"], "max_ape": stats["max_ape"]}
    return out


def render_section(calibration: Calibration, *, date: str, records: Sequence[str] = (), held_out: Sequence[str] = (),
                   seed: int | None = None, error_before: ErrorSummary | None = None,
                   error_after: ErrorSummary | None = None) -> str:
    """The ``calibrated:`` block of a profile YAML, ending in a newline.

    ``error_before`` / ``error_after`` default to the calibration's in-sample errors; pass the held-out
    errors when there are held-out records (``held_out`` names them).
    """
    before = error_before or calibration.error_before
    after = error_after or calibration.error_after
    scope = "held-out records" if held_out else "the fitted records (in-sample)"
    lines = [
        f"{SECTION_KEY}:",
        "  # Written by `hpi calibrate` (hpi.planner.calibrate); the next run replaces this block as a whole.",
        f"  # Applied over efficiency: by load_profile. Errors: |predicted/measured - 1| on {scope}.",
        f"  date: {_yaml_scalar(date)}",
        *_yaml_list("records", records),
        *_yaml_list("record_ids", calibration.record_ids),
    ]
    if held_out:
        lines += _yaml_list("held_out", held_out)
    if seed is not None:
        lines.append(f"  seed: {int(seed)}")
    lines += [
        f"  error_before: {_yaml_scalar(_error_brief(before))}",
        f"  error_after: {_yaml_scalar(_error_brief(after))}",
        f"  unidentified: {_yaml_scalar(list(calibration.unidentified))}",
        "  coefficients:" + ("" if calibration.values else " {}"),
    ]
    n = len(calibration.record_ids)
    for name, value in calibration.values.items():
        note = f"fitted to {calibration.support[name]} of {n} records; prior {calibration.priors[name]:.6g}"
        lines.append(f"    {name}: {{value: {value:.6g}, source: calibrated, note: {json.dumps(note)}}}")
    return "\n".join(lines) + "\n"


def _section_span(lines: Sequence[str]) -> tuple[int, int] | None:
    """[start, end) line indices of the top-level ``calibrated:`` block: its key line and every following
    indented or blank line, less trailing blank lines (they and top-level comments belong to what follows)."""
    start = next((i for i, line in enumerate(lines) if line.rstrip("\r\n").split("#", 1)[0].rstrip() == f"{SECTION_KEY}:"
                  or line.startswith(f"{SECTION_KEY}: ")), None)
    if start is None:
        return None
    end = start + 1
    while end < len(lines) and (lines[end][:1] in (" ", "\t") or not lines[end].strip()):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    return start, end


def replace_section(text: str, block: str) -> str:
    """``text`` with its ``calibrated:`` block replaced by ``block`` (appended when absent); every other byte kept."""
    lines = text.splitlines(keepends=True)
    span = _section_span(lines)
    if span is None:
        sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        return text + sep + block
    start, end = span
    return "".join(lines[:start]) + block + "".join(lines[end:])


def write_section(path: str | Path, block: str) -> None:
    """Replace the profile file's ``calibrated:`` block atomically (a temporary file renamed over it)."""
    import os
    import tempfile

    path = Path(path)
    text = path.read_text() if path.exists() else ""
    new = replace_section(text, block)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
