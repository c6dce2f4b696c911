"""Uncalibrated decode and prefill errors of the fidelity manifest while one ``Efficiency`` coefficient is swept.

    python benchmarks/fidelity_sweep.py layer_device_s_per_row_doubling 0 2e-6 4e-6 5.5e-6 8e-6 [--profiles h200-1gpu]

How a prior such as ``layer_device_s_per_row_doubling`` was chosen (README, "Calibration and fidelity"): every
record of ``validation/fidelity_set.yaml``, read and its exclusions applied as ``hpi validate`` does
(``hpi.planner.validate.read_measurements``), predicted on its machine's profile with its ``efficiency:`` priors
(no ``calibrated:`` section) and the swept coefficient set to each value. No leave-one-plan-out fits, so a sweep
takes seconds where ``hpi validate`` takes minutes. Per value:

- decode: the median |error| over every record with a decode step, and how many are within 10%;
- graphed decode at batch > 1 (GPU-resident, decode replayed as CUDA graphs): the signed median error, the median
  and worst |error| and how many are within 10%: the records the per-row term was fitted to;
- prefill: the median |error|.

The last stdout line is one JSON document with every value's figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys

from hpi.planner.calibrate.measurements import CalibrationError, Measurement, predict_measurements
from hpi.planner.profiles import load_profile
from hpi.planner.specs.hardware import Efficiency
from hpi.planner.validate import load_manifest, read_measurements


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def sweep_point(by_profile: dict[str, list[Measurement]], field: str, value: float) -> dict:
    """The figures of one value of ``field`` (module docstring); errors as fractions."""
    decode, graphed, prefill = [], [], []
    for name, ms in sorted(by_profile.items()):
        profile = load_profile(name, calibrated=False)
        profile = dataclasses.replace(profile, efficiency=dataclasses.replace(profile.efficiency, **{field: value}))
        for m, p in zip(ms, predict_measurements(profile, ms)):
            if p.measured.get("prefill_s"):
                prefill.append(abs(p.predicted["prefill_s"] / p.measured["prefill_s"] - 1))
            if not p.measured.get("decode_step_s"):
                continue
            error = p.predicted["decode_step_s"] / p.measured["decode_step_s"] - 1
            decode.append(abs(error))
            if m.workload.decode_graphs and m.plan.offload == "none" and m.plan.batch_size > 1:
                graphed.append(error)
    return {
        "value": value,
        "decode": {"n": len(decode), "median_ape": _median(decode), "within_10pct": sum(e <= 0.1 for e in decode)},
        "graphed_batch_gt_1": {
            "n": len(graphed), "signed_median": _median(graphed), "median_ape": _median([abs(e) for e in graphed]),
            "max_ape": max((abs(e) for e in graphed), default=None),
            "within_10pct": sum(abs(e) <= 0.1 for e in graphed)},
        "prefill": {"n": len(prefill), "median_ape": _median(prefill)},
    }


def _pct(x: float | None, signed: bool = False) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%" if signed else f"{100 * x:.1f}%"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("field", help="an Efficiency coefficient, e.g. layer_device_s_per_row_doubling")
    p.add_argument("values", nargs="+", type=float, help="its values, in its own unit (seconds for *_s fields)")
    p.add_argument("--profiles", default=None, help="comma-separated profiles to keep (default: every one)")
    args = p.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(Efficiency)}
    if args.field not in fields:
        print(f"fidelity_sweep.py: {args.field!r} is not an Efficiency coefficient: use one of "
              f"{', '.join(sorted(fields))}", file=sys.stderr)
        return 2
    try:  # a broken manifest or record file: its one line, as hpi validate prints it
        by_profile = read_measurements(load_manifest()).by_profile
    except CalibrationError as e:
        print(f"fidelity_sweep.py: {e}", file=sys.stderr)
        return 2
    if args.profiles:
        keep = set(args.profiles.split(","))
        unknown = keep - set(by_profile)
        if unknown:
            print(f"fidelity_sweep.py: no record of the manifest ran on {sorted(unknown)[0]!r}: use one of "
                  f"{', '.join(sorted(by_profile))}", file=sys.stderr)
            return 2
        by_profile = {name: ms for name, ms in by_profile.items() if name in keep}
    points = [sweep_point(by_profile, args.field, value) for value in args.values]
    for pt in points:
        d, g, f = pt["decode"], pt["graphed_batch_gt_1"], pt["prefill"]
        print(f"{args.field}={pt['value']:g}: decode median {_pct(d['median_ape'])}, {d['within_10pct']}/{d['n']} "
              f"within 10% | graphed batch>1 signed median {_pct(g['signed_median'], signed=True)}, "
              f"worst {_pct(g['max_ape'])}, "
              f"{g['within_10pct']}/{g['n']} within 10% | prefill median {_pct(f['median_ape'])}")
    print(json.dumps({"field": args.field, "profiles": sorted(by_profile), "points": points}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
