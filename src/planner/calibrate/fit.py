"""The coefficients calibration may fit, their priors and bounds, the robust least-squares fit, and the held-out
split by plan (the method: ``hpi.planner.calibrate``'s docstring)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from hpi.planner.calibrate.measurements import (
    CalibrationError,
    Cases,
    ErrorSummary,
    Measurement,
    as_measurements,
    build_cases,
    predict_array,
    predictions_of,
    summarize,
)
from hpi.planner.specs.hardware import Efficiency, HardwareProfile, Provenance, is_fraction
from hpi.records import RunRecord

# Coefficients calibration may fit, each with the bounds of its kind. ``gpu_memory_usable`` and
# ``dram_usable`` are planning policy, not measurements; ``host_reserved_bytes`` shows in no metric.
CANDIDATES = (
    "matmul_prefill", "matmul_decode", "hbm", "h2d_stream_pinned", "h2d_stream_pageable", "nvme_read",
    "nvme_read_multithread", "prefetch_overlap", "collective_bandwidth", "allreduce_latency_s",
    "collective_host_overhead_s",
    "p2p_latency_s", "layer_overhead_s", "layer_device_overhead_s", "compiled_layer_device_overhead_s",
    "offload_layer_overhead_s", "offload_layer_leaf_share", "step_overhead_s",
    "graphed_step_overhead_s", "gpu_workspace_bytes",
    "gpu_reserved_bytes", "dequant_hbm", "fused_dequant_hbm", "collective_drift_factor",
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


def _log_ratios(cases: Cases, profile: HardwareProfile, eff: Efficiency) -> np.ndarray:
    """(records, metrics) log(predicted / measured); NaN where nothing was measured."""
    pred = predict_array(cases, dataclasses.replace(profile, efficiency=eff))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log(pred / cases.measured)
    return np.where((cases.measured > 0) & (pred > 0), ratio, np.nan)


def _reach(cases: Cases, profile: HardwareProfile, eff: Efficiency, names: Sequence[str], factor: float) -> np.ndarray:
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


def _least_squares(cases: Cases, profile: HardwareProfile, prior: Efficiency, names: Sequence[str],
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
            "coefficients": {n: {"value": v, "prior": self.priors[n], "records": self.support[n]}
                             for n, v in self.values.items()},
            "unidentified": list(self.unidentified),
            "record_ids": list(self.record_ids),
            "error_before": self.error_before.to_dict(),
            "error_after": self.error_after.to_dict(),
        }


def fit(profile: HardwareProfile, records: Sequence[RunRecord | Mapping[str, Any] | Measurement], *,
        coefficients: Sequence[str] = CANDIDATES, ridge: float | None = None) -> Calibration:
    """Fit ``coefficients`` of ``profile.efficiency`` to ``records`` (RunRecord dicts or Measurements).

    The records must come from the machine ``profile`` describes; a record's stored prediction is not
    used. ``ridge`` overrides the per-coefficient prior weights (``prior_weight``) with one value.
    Raises CalibrationError when there is nothing to fit to.
    """
    unknown = [n for n in coefficients if n not in {f.name for f in dataclasses.fields(Efficiency)}]
    if unknown:
        raise CalibrationError(f"unknown coefficient {unknown[0]!r}; Efficiency has {', '.join(CANDIDATES)}")
    measurements = as_measurements(records)
    if not measurements:
        raise CalibrationError("no RunRecords to calibrate from (baselines and error entries are skipped)")
    cases = build_cases(profile, measurements)
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
    before = summarize(predictions_of(cases, profile))
    after = summarize(predictions_of(cases, dataclasses.replace(profile, efficiency=fitted)))
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


def calibrate(profile: HardwareProfile,
              records: Sequence[RunRecord | Mapping[str, Any] | Measurement]) -> HardwareProfile:
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
