"""``hpi calibrate`` and ``hpi validate``: fit the cost model to RunRecords, and measure how well it predicts.

    hpi calibrate benchmarks/results/2026-11-22-h200x2 --hardware h200-2gpu [--out P.yaml] [--holdout 0.2] [--json]
    hpi validate [--json] [--plot fidelity.png] [--records DIR ...]

Registered in ``hpi.cli.app.COMMAND_MODULES``; importing this module stays cheap (scipy and
matplotlib are imported inside the handlers).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Any

from hpi import atomic
from hpi.cli.args import UsageError, count, finite
from hpi.cli.checks import writable_file
from hpi.cli.progress import PhaseProgress
from hpi.planner.calibrate import METRICS

PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".svgz", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".eps", ".ps")
VALIDATE_PHASES = {"read": "reading record files", "fit": "fitting held-out plans",
                   "predict": "predicting every record", "unlisted": "looking for records the manifest misses"}
_METRIC_LABELS = {"decode_step_s": "decode step", "prefill_s": "prefill", "peak_gpu_bytes": "peak GPU (allocated)"}


def register(sub) -> dict:
    p = sub.add_parser("calibrate",
                       help="fit the cost model's efficiencies to RunRecords and write them into a profile")
    p.add_argument("records", nargs="+", metavar="RECORDS",
                   help="record.json files, bundles {name: record}, or folders of them (baselines and errors are "
                        "skipped)")
    p.add_argument("--hardware", required=True, help="the profile the records ran on (name or path to a YAML)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="profile YAML to write the calibrated: section into (default: the profile's own file); "
                        "the rest of the file is kept byte for byte")
    p.add_argument("--holdout", type=finite, default=0.2, metavar="FRACTION",
                   help="share of the plans held out of the fit to report its error on (default 0.2; 0: fit all)")
    p.add_argument("--seed", type=count, default=0, help="seed of the held-out split (default 0)")
    p.add_argument("--date", default=None, type=iso_date, help="date written into the section (default: today)")
    p.add_argument("--allow-other-devices", action="store_true",
                   help="fit records that ran on another device than the profile's GPU (a CPU run, another GPU "
                        "model); refused otherwise: their timings would move the coefficients of a machine they "
                        "did not run on")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p = sub.add_parser("validate", help="predicted against measured for every recorded run (uncalibrated and "
                                        "leave-one-plan-out calibrated)")
    p.add_argument("--records", nargs="+", default=None, metavar="PATH",
                   help="record files or folders instead of the fidelity manifest's (profiles still come from it)")
    p.add_argument("--manifest", default=None, metavar="YAML",
                   help="fidelity manifest (default validation/fidelity_set.yaml)")
    p.add_argument("--plot", default=None, metavar="PATH.png", help="write predicted-vs-measured scatter plots")
    p.add_argument("--json", action="store_true", help="end with one JSON line: the error summary")
    return {"calibrate": cmd_calibrate, "validate": cmd_validate}


# ---- hpi calibrate -----------------------------------------------------------------------------------


def _profile_file(name_or_path: str) -> Path:
    """The YAML file a profile name or path refers to (where its calibrated: section lives)."""
    from hpi.planner.profiles import ProfileError, profiles_dir

    as_path = Path(name_or_path).expanduser()
    if as_path.suffix in (".yaml", ".yml") or os.sep in name_or_path or "/" in name_or_path:
        return as_path
    for suffix in (".yaml", ".yml"):
        candidate = profiles_dir() / f"{name_or_path}{suffix}"
        if candidate.is_file():
            return candidate
    raise ProfileError(f"unknown hardware profile {name_or_path!r}")


def iso_date(text: str) -> str:
    """A calendar date written YYYY-MM-DD."""
    try:
        return _dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date: write YYYY-MM-DD") from None


def _other_device(record, profile) -> str | None:
    """The device ``record`` ran on when it is not ``profile``'s GPU (a CPU run, another GPU model), or None."""
    device = record.device or (record.spec or {}).get("device")
    if not profile.gpus_per_node:
        return "a GPU" if device == "cuda" or record.devices else None
    if device == "cpu":
        return "the CPU"
    others = [d for d in record.devices if d != profile.gpu.name]
    return others[0] if others else None


def _refuse_other_devices(records, prior) -> None:
    """Records of another device would move ``prior``'s coefficients: refused unless --allow-other-devices."""
    foreign = [(r.record_id, device) for r in records if (device := _other_device(r, prior))]
    if foreign:
        rid, device = foreign[0]
        gpu = f"{prior.gpu.name} GPUs" if prior.gpus_per_node else "no GPU"
        raise UsageError(f"hpi calibrate: {len(foreign)} record(s) ran on another device than {prior.name} ({gpu}), "
                         f"e.g. {rid} on {device}: fitting them would move its coefficients; leave them out, or pass "
                         "--allow-other-devices to fit them anyway")


def _calibrate_target(args: argparse.Namespace) -> tuple[Path, str]:
    """The file the calibrated: section goes into and the text it starts from (the file's own, or the profile's
    for a new --out file); the file, where it exists, must be a profile that loads."""
    from hpi.planner.profiles import ProfileError, profile_from_text

    source = _profile_file(args.hardware)
    target = writable_file(args.out, "--out", "hpi calibrate", (".yaml", ".yml")) if args.out else source
    if not target.exists():
        if args.out is None:
            raise UsageError(f"hpi calibrate: the profile file {target} does not exist")
        text = source.read_text()
    else:
        try:
            text = target.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"hpi calibrate: --out {target}: cannot read it ({e})") from None
    try:
        profile_from_text(text, target, calibrated=False)
    except ProfileError as e:
        what = "is not a profile that loads" if target.exists() else "would not load as a copy of the profile"
        raise UsageError(f"hpi calibrate: --out {target} {what} ({e}): name the profile's own file, a copy of it "
                         "or a new file beside it") from None
    return target, text


def _pct(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"


def _display_path(path: str) -> str:
    """Relative to the repository when inside it (so a profile does not carry one machine's absolute paths)."""
    from hpi.planner.validate import REPO

    try:
        return str(Path(path).resolve().relative_to(REPO.resolve()))
    except ValueError:
        return str(Path(path).resolve())


def cmd_calibrate(args: argparse.Namespace) -> int:
    from hpi.planner.calibrate import (
        CalibrationError,
        apply,
        fit,
        measurement,
        predict_measurements,
        render_section,
        replace_section,
        split_by_plan,
        summarize,
        write_text_atomic,
    )
    from hpi.planner.profiles import clear_cache, load_profile, profile_from_text
    from hpi.record_files import load_records

    prior = load_profile(args.hardware, calibrated=False)
    if not 0 <= args.holdout < 1:
        raise CalibrationError(f"holdout fraction {args.holdout} must be in [0, 1)")
    records = load_records(args.records)
    measurements = [measurement(r) for r in records]
    if not measurements:
        raise CalibrationError(f"no RunRecords in {' '.join(args.records)} "
                               f"(skipped: {dict(records.skipped) or 'none'})")
    if not args.allow_other_devices:
        _refuse_other_devices(records, prior)
    target, text = _calibrate_target(args)  # before the fit: a target that cannot take the section is refused
    others = sorted({m.recorded_hardware for m in measurements
                     if m.recorded_hardware and m.recorded_hardware != prior.name})
    train, held = split_by_plan(measurements, args.holdout, args.seed)
    cal = fit(prior, train)
    if held:
        before = summarize(predict_measurements(prior, held))
        after = summarize(predict_measurements(apply(prior, cal), held))
    else:
        before, after = cal.error_before, cal.error_after
    files = sorted({_display_path(r.source.path if r.source else "") for r in records})
    block = render_section(cal, date=args.date or _dt.date.today().isoformat(), records=files,
                           held_out=[m.record_id for m in held], seed=args.seed if held else None,
                           error_before=before, error_after=after)
    new_text = replace_section(text, block)
    profile_from_text(new_text, target)  # the file must load once written: checked before it is replaced
    target.parent.mkdir(parents=True, exist_ok=True)  # a new --out file's folders (checked writable above)
    write_text_atomic(target, new_text)
    clear_cache()
    result = {
        "profile": prior.name,
        "out": str(target),
        "records": len(measurements),
        "skipped": dict(records.skipped),
        "train_ids": list(cal.record_ids),
        "held_out_ids": [m.record_id for m in held],
        "coefficients": cal.to_dict()["coefficients"],
        "unidentified": list(cal.unidentified),
        "fit": {"before": cal.error_before.to_dict(), "after": cal.error_after.to_dict()},
        "held_out": {"before": before.to_dict(), "after": after.to_dict()} if held else None,
        "records_naming_other_profiles": others,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    _print_calibration(result, cal, before, after, bool(held))
    return 0


def _print_calibration(result: dict[str, Any], cal, before, after, held: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    skipped = ", ".join(f"{n} {k}" for k, n in result["skipped"].items()) or "none"
    console.print(f"{result['records']} records (skipped: {skipped}); fitted to {len(result['train_ids'])}, "
                  f"held out {len(result['held_out_ids'])} (whole plans)")
    if result["records_naming_other_profiles"]:
        console.print("note: some records name another profile "
                      f"({', '.join(result['records_naming_other_profiles'])}); fitted to {result['profile']} as asked")
    table = Table(title=f"coefficients of {result['profile']}", title_justify="left")
    for col in ("coefficient", "prior", "calibrated", "ratio", "records"):
        table.add_column(col, justify="left" if col == "coefficient" else "right")
    for name, c in result["coefficients"].items():
        table.add_row(name, f"{c['prior']:.4g}", f"{c['value']:.4g}", f"{c['value'] / c['prior']:.2f}",
                      str(c["records"]))
    console.print(table)
    console.print(f"left at their prior (no record moves them): {', '.join(result['unidentified']) or 'none'}")
    errors = Table(title="absolute percentage error, median / max", title_justify="left")
    errors.add_column("records")
    for metric in METRICS:
        errors.add_column(_METRIC_LABELS[metric], justify="right")
    errors.add_column("all", justify="right")

    def row(label: str, s) -> None:
        cells = [f"{_pct(s.by_metric[m]['median_ape'])} / {_pct(s.by_metric[m]['max_ape'])}"
                 if m in s.by_metric else "-" for m in METRICS]
        errors.add_row(label, *cells, f"{_pct(s.median_ape)} / {_pct(s.max_ape)}")

    row("fitted, before", cal.error_before)
    row("fitted, after", cal.error_after)
    if held:
        row("held out, before", before)
        row("held out, after", after)
    console.print(errors)
    console.print(f"wrote the calibrated: section of {result['out']}")


# ---- hpi validate ------------------------------------------------------------------------------------


def _fmt(metric: str, value: float) -> str:
    if metric == "peak_gpu_bytes":
        return f"{value / 1e9:,.2f} GB"
    return f"{value * 1e3:,.1f} ms" if value < 1 else f"{value:,.3f} s"


def cmd_validate(args: argparse.Namespace) -> int:
    from hpi.planner.validate import DEFAULT_MANIFEST, load_manifest, validate

    if args.plot is not None:
        writable_file(args.plot, "--plot", "hpi validate", PLOT_SUFFIXES)
    manifest = load_manifest(args.manifest or DEFAULT_MANIFEST)
    with PhaseProgress("hpi validate", VALIDATE_PHASES, counted=("fit",), after="read") as progress:
        result = validate(manifest, args.records, progress=progress)
    if not result.rows:
        from hpi.planner.calibrate import CalibrationError

        raise CalibrationError("no records to validate: the manifest lists none, or all were skipped or excluded")
    _print_validation(result)
    if args.plot:
        plot(result, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        print(json.dumps(result.summary()))
    return 0


def _profile_label(profile: str) -> str:
    """A catalogue name as it is; a profile file (the manifest may name one) by its file name."""
    return Path(profile).name if profile.endswith((".yaml", ".yml")) else profile


def _print_validation(result) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=180)
    table = Table(title="predicted vs measured (calibrated: fitted without the run's own plan, same machine only)",
                  title_justify="left")
    for col in ("record", "profile", "plan", "metric", "measured", "uncalibrated", "err", "calibrated", "err"):
        table.add_column(col, justify="left" if col in ("record", "profile", "plan", "metric") else "right")
    for r in result.rows:
        table.add_row(r.record_id, _profile_label(r.profile), r.plan_label, _METRIC_LABELS[r.metric],
                      _fmt(r.metric, r.measured), _fmt(r.metric, r.uncalibrated),
                      f"{r.uncalibrated / r.measured - 1:+.0%}", _fmt(r.metric, r.calibrated),
                      f"{r.calibrated / r.measured - 1:+.0%}")
    console.print(table)
    s = result.summary()
    summary = Table(title=f"{s['n_records']} records, {s['n_plans']} plans: absolute percentage error, median / max",
                    title_justify="left")
    summary.add_column("prediction")
    for metric in METRICS:
        summary.add_column(_METRIC_LABELS[metric], justify="right")
    summary.add_column("all", justify="right")
    for label, part in (("uncalibrated", s["uncalibrated"]), ("calibrated, leave-one-plan-out", s)):
        cells = [f"{_pct(part['by_metric'][m]['median_ape'])} / {_pct(part['by_metric'][m]['max_ape'])}"
                 for m in METRICS]
        summary.add_row(label, *cells, f"{_pct(part['median_ape'])} / {_pct(part['max_ape'])}")
    floor = s["repeatability"]
    summary.add_row("repeats of one plan vs the plan's other runs (the floor)",
                    *[_floor_cell(floor[m]) for m in METRICS], "")
    console.print(summary)
    modes = s["decode_by_mode"]
    console.print("decode step by mode, median / max: " + "; ".join(
        f"{mode} ({v['calibrated']['n']}): calibrated {_pct(v['calibrated']['median_ape'])} / "
        f"{_pct(v['calibrated']['max_ape'])}, uncalibrated {_pct(v['uncalibrated']['median_ape'])} / "
        f"{_pct(v['uncalibrated']['max_ape'])}, repeats {_floor_cell(v['repeatability'])}"
        for mode, v in modes.items()))
    if result.skipped:
        console.print("skipped: " + ", ".join(f"{n} {k}" for k, n in result.skipped.items()))
    by_reason: dict[str, list[str]] = {}
    for key, reason in result.excluded.items():
        by_reason.setdefault(reason, []).append(key)
    for reason, keys in by_reason.items():
        console.print(f"excluded {', '.join(keys)}: {reason}")
    if result.unlisted:
        console.print("not in the fidelity manifest (add them to validation/fidelity_set.yaml): "
                      f"{', '.join(result.unlisted)}")


def _floor_cell(stats: dict) -> str:
    if not stats["n"]:
        return "no repeats"
    return f"{_pct(stats['median_ape'])} / {_pct(stats['max_ape'])} ({stats['n']} runs)"


def plot(result, path: str | Path) -> None:
    """Predicted against measured, one panel per metric, log-log, uncalibrated hollow and calibrated filled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4.8))
    for ax, metric in zip(axes, METRICS):
        rows = [r for r in result.rows if r.metric == metric]
        if not rows:
            ax.set_visible(False)
            continue
        measured = [r.measured for r in rows]
        lo, hi = min(measured + [r.uncalibrated for r in rows] + [r.calibrated for r in rows]), max(
            measured + [r.uncalibrated for r in rows] + [r.calibrated for r in rows])
        lo, hi = lo / 1.5, hi * 1.5
        ax.plot([lo, hi], [lo, hi], color="black", lw=1)
        ax.fill_between([lo, hi], [lo * 0.85, hi * 0.85], [lo * 1.15, hi * 1.15], color="0.9", label="±15%")
        ax.scatter(measured, [r.uncalibrated for r in rows], facecolors="none", edgecolors="tab:orange",
                   label="uncalibrated")
        ax.scatter(measured, [r.calibrated for r in rows], color="tab:blue", label="calibrated (leave-one-plan-out)")
        ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="measured", ylabel="predicted",
               title=_METRIC_LABELS[metric] + (" (bytes)" if metric == "peak_gpu_bytes" else " (s)"))
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    atomic.write_figure(path, fig, dpi=120)
    plt.close(fig)
