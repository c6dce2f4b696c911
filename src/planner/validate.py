"""Predicted against measured for every recorded run: the fidelity set, left out one plan at a time.

    result = validate()              # the records listed in validation/fidelity_set.yaml
    result.summary()                 # {"n_plans": ..., "median_ape": ..., "by_metric": ..., "uncalibrated": ...}

Each record is predicted twice on the profile of the machine it ran on (the manifest says which):
- uncalibrated: the profile's probed ceilings and its ``efficiency:`` priors (``load_profile(...,
  calibrated=False)``), nothing learnt from any record;
- calibrated, leave-one-plan-out: coefficients fitted (``hpi.planner.calibrate.fit``) to the records of the
  *other* plans of the same profile, so a run and its repeats never inform their own prediction, and
  no record of another machine is used. A profile with a single plan has nothing to fit to: its
  calibrated prediction is the uncalibrated one (``Fold.train_ids`` is empty).

Metrics are ``hpi.planner.calibrate.METRICS``: median decode step, prefill, and peak GPU memory as
``torch.cuda.max_memory_allocated`` (max over ranks) against the model's allocator-visible parts.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from hpi.planner.calibrate import (
    METRICS,
    Calibration,
    CalibrationError,
    Measurement,
    apply,
    fit,
    measurement,
    predict_measurements,
)
from hpi.planner.profiles import load_profile, malformed_yaml
from hpi.planner.specs.workload import SWITCHES
from hpi.record_files import load_records
from hpi.records import RecordError

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MANIFEST = REPO / "validation" / "fidelity_set.yaml"
RECORD_ROOTS = ("benchmarks/results/**/*.json", "studies/*/runs/**/*.json")

# ``progress(phase, done, total)``: "read" (record files), "fit" (held-out plans fitted), "predict" (machines),
# "unlisted" (the scan for record files the manifest misses; 0 of 1, then 1 of 1).
Progress = Callable[[str, int, int], None]

__all__ = [
    "DEFAULT_MANIFEST",
    "Exclusion",
    "Fold",
    "Manifest",
    "Progress",
    "Row",
    "Validation",
    "ManifestMeasurements",
    "leave_one_plan_out",
    "load_manifest",
    "read_measurements",
    "validate",
]


# ---- the manifest -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestEntry:
    pattern: str  # a file or a glob, relative to the manifest's root
    profile: str | None  # None: the profile each record names
    note: str = ""
    # Run conditions the records ran with that their specs do not say (they were written before the field existed):
    # switch name (``Workload`` SWITCHES) -> value, read over what each record's spec says.
    conditions: tuple[tuple[str, bool], ...] = ()


@dataclass(frozen=True)
class Exclusion:
    pattern: str  # a record id or a glob of ids ("run1-8b/*"), or a record file path (relative to the root)
    reason: str
    metrics: tuple[str, ...] = ()  # only these metrics of the record; () = the whole record
    within: str = ""  # with a record pattern: only records of the files this glob names (ids repeat across files)

    def matches(self, record_id: str, rel_path: str) -> bool:
        if self.within and not fnmatch.fnmatch(rel_path, self.within):
            return False
        return fnmatch.fnmatch(record_id, self.pattern) or fnmatch.fnmatch(rel_path, self.pattern)


@dataclass(frozen=True)
class Manifest:
    root: Path  # relative paths start here: the folder above the manifest's (the repository root)
    entries: tuple[ManifestEntry, ...]
    exclusions: tuple[Exclusion, ...]
    path: Path | None = None

    def entry_for(self, file: Path) -> ManifestEntry | None:
        """The last entry whose pattern matches ``file`` (files are matched relative to ``root``)."""
        full = str(Path(file).resolve())
        hits = [e for e in self.entries if fnmatch.fnmatch(full, str(self._absolute(e.pattern)))]
        return hits[-1] if hits else None

    def profile_for(self, file: Path) -> str | None:
        """The profile ``file``'s records ran on, as the last matching entry names it: a name from the catalogue,
        or a profile file (a drive probed the hour its records ran on a lent machine) whose relative path starts
        at ``root``, as record paths do. The file is named relative to the working directory, so that reports read
        the same on every checkout run from its root. None where no entry matches or names one."""
        entry = self.entry_for(file)
        profile = entry.profile if entry else None
        if not profile or not profile.endswith((".yaml", ".yml")) or Path(profile).is_absolute():
            return profile
        return os.path.relpath(self.root / profile)

    def _absolute(self, pattern: str) -> Path:
        return ((self.root / pattern).resolve() if not any(c in pattern for c in "*?[")
                else self.root.resolve() / pattern)

    def files(self) -> list[Path]:
        out: dict[Path, None] = {}
        for e in self.entries:
            pattern = str(self._absolute(e.pattern))
            matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True)) if any(c in pattern for c in "*?[") \
                else [Path(pattern)]
            for m in matches:
                if not m.is_file():
                    raise CalibrationError(f"{self.path or 'manifest'}: {e.pattern}: no such record file")
                out[m.resolve()] = None
        return list(out)

    def unlisted(self) -> list[str]:
        """Record files under benchmarks/results/ and studies/*/runs/ that no entry lists and no exclusion of the
        whole file names (the autotune study's summary beside its trials' records, say)."""
        listed = set(self.files())
        found = {p.resolve() for pattern in RECORD_ROOTS for p in self.root.glob(pattern) if p.is_file()}
        rels = sorted(_relative(p, self.root) for p in found - listed)
        return [rel for rel in rels if not self._excluded_file(rel) and _looks_like_records(self.root / rel)]

    def _excluded_file(self, rel_path: str) -> bool:
        return any(not e.metrics and fnmatch.fnmatch(rel_path, e.pattern) for e in self.exclusions)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _looks_like_records(path: Path) -> bool:
    """A RunRecord file, or a bundle of only baselines and failed entries (not a probe's or a config's JSON)."""
    try:
        records = load_records(path)
    except (RecordError, UnicodeDecodeError):
        return False
    return bool(records) or bool(records.skipped.get("baseline") or records.skipped.get("error"))


def load_manifest(path: str | Path = DEFAULT_MANIFEST, root: str | Path | None = None) -> Manifest:
    """Read a fidelity manifest (see validation/fidelity_set.yaml for the schema).

    Relative record paths start at ``root``, by default the folder above the manifest's own folder (the
    repository for validation/fidelity_set.yaml); absolute paths are taken as they are.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise CalibrationError(f"cannot read fidelity manifest {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise CalibrationError(malformed_yaml(path, e)) from None
    if not isinstance(data, dict) or not isinstance(data.get("records", []), list):
        raise CalibrationError(f"{path}: expected records: [{{path, profile, note}}, ...] and exclude: [...]")
    unknown = set(data) - {"records", "exclude"}
    if unknown:
        raise CalibrationError(f"{path}: unknown field {sorted(unknown)[0]!r}; expected records and exclude")
    entries = []
    for i, e in enumerate(data.get("records") or []):
        if not isinstance(e, dict) or not isinstance(e.get("path"), str):
            raise CalibrationError(f"{path}: records[{i}]: expected {{path: FILE_OR_GLOB, profile: NAME, note: TEXT}}")
        entries.append(ManifestEntry(e["path"], e.get("profile"), str(e.get("note", "")),
                                     _conditions(path, i, e.get("conditions"))))
    exclusions = []
    for i, e in enumerate(data.get("exclude") or []):
        if not isinstance(e, dict) or not (e.get("record") or e.get("path")) or not e.get("reason"):
            raise CalibrationError(f"{path}: exclude[{i}]: expected {{record: ID (or path: FILE), reason: WHY}}")
        metrics = tuple(e.get("metrics") or ())
        bad = [m for m in metrics if m not in METRICS]
        if bad:
            raise CalibrationError(f"{path}: exclude[{i}].metrics: {bad[0]!r} is not one of {', '.join(METRICS)}")
        exclusions.append(Exclusion(str(e.get("record") or e.get("path")), str(e["reason"]), metrics,
                                    str(e.get("within") or "")))
    return Manifest(Path(root) if root else path.resolve().parent.parent, tuple(entries), tuple(exclusions), path)


def _conditions(path: Path, i: int, given: object) -> tuple[tuple[str, bool], ...]:
    """A record entry's ``conditions:`` ({switch: true/false}), checked: only ``Workload``'s switches."""
    if given is None:
        return ()
    if not isinstance(given, dict) or any(k not in SWITCHES or not isinstance(v, bool) for k, v in given.items()):
        raise CalibrationError(f"{path}: records[{i}].conditions: expected {{SWITCH: true or false}} with SWITCH one "
                               f"of {', '.join(SWITCHES)}, got {given!r}")
    return tuple(sorted(given.items()))


# ---- leave one plan out -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One record and metric: measured, predicted uncalibrated, predicted by the fit that left it out."""

    record_id: str
    profile: str
    model: str
    plan_label: str
    metric: str
    measured: float
    uncalibrated: float
    calibrated: float
    plan_key: str = ""  # ``hpi.planner.calibrate.plan_key``: runs of one plan share it
    decode_graphs: bool = False  # the run replayed its decode steps as CUDA graphs

    @property
    def ape_uncalibrated(self) -> float:
        return abs(self.uncalibrated / self.measured - 1.0)

    @property
    def ape_calibrated(self) -> float:
        return abs(self.calibrated / self.measured - 1.0)


@dataclass(frozen=True)
class Fold:
    """One held-out plan: its records, the records the coefficients were fitted to, and the fit."""

    profile: str
    held_out_ids: tuple[str, ...]
    train_ids: tuple[str, ...]
    calibration: Calibration | None  # None when no other plan of this profile was recorded


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


def _fit_fold(profile_name: str, train: Sequence[Measurement]) -> Calibration:
    """One fold's fit (module level, so that a process pool can run it)."""
    return fit(load_profile(profile_name, calibrated=False), train)


def _fits(tasks: list[tuple[str, list[Measurement]]], fitter: Callable[..., Calibration] | None,
          progress: Progress | None = None) -> list[Calibration]:
    """The folds' fits: in a process pool for the default fitter (the folds are independent), else in order.
    The pool's workers die with this process (``hpi.processes.worker_pool``), however it ends."""
    report = progress or _no_progress
    report("fit", 0, len(tasks))
    if fitter is not None or len(tasks) < 2 or (os.cpu_count() or 1) < 2:
        out = []
        for name, train in tasks:
            out.append((fitter or fit)(load_profile(name, calibrated=False), train))
            report("fit", len(out), len(tasks))
        return out
    from concurrent.futures import as_completed

    from hpi.processes import worker_pool

    with worker_pool(min(len(tasks), os.cpu_count() or 1)) as pool:
        futures = {pool.submit(_fit_fold, name, train): i for i, (name, train) in enumerate(tasks)}
        fits: list[Calibration | None] = [None] * len(tasks)
        for done, future in enumerate(as_completed(futures), start=1):
            fits[futures[future]] = future.result()
            report("fit", done, len(tasks))
    return fits


def _folds(profile_name: str, measurements: Sequence[Measurement]) -> list[tuple[list[Measurement], list[Measurement]]]:
    """(held out, train) per plan; a run and its repeats are held out together."""
    out = []
    for key in sorted({m.key for m in measurements}):
        held = [m for m in measurements if m.key == key]
        train = [m for m in measurements if m.key != key]
        assert not {m.record_id for m in held} & {m.record_id for m in train}, "a held-out record leaked into its fit"
        out.append((held, train))
    return out


def _rows_and_folds(profile_name: str, measurements: Sequence[Measurement],
                    folds, fits) -> tuple[list[Row], list[Fold]]:
    prior = load_profile(profile_name, calibrated=False)
    uncal = {p.record_id: p for p in predict_measurements(prior, measurements)}
    rows: list[Row] = []
    out: list[Fold] = []
    for (held, train), cal in zip(folds, fits):
        hardware = apply(prior, cal) if cal else prior
        out.append(Fold(profile_name, tuple(sorted(m.record_id for m in held)), tuple(m.record_id for m in train), cal))
        for p, m in zip(predict_measurements(hardware, held), held):
            for metric in METRICS:
                measured = p.measured[metric]
                if measured > 0:
                    rows.append(Row(m.record_id, profile_name, m.model.name, m.plan.label, metric, measured,
                                    uncal[m.record_id].predicted[metric], p.predicted[metric], m.key,
                                    m.workload.decode_graphs))
    return rows, out


def leave_one_plan_out(profile_name: str, measurements: Sequence[Measurement],
                       fitter: Callable[..., Calibration] | None = None) -> tuple[list[Row], list[Fold]]:
    """Rows for every measurement of one machine, each calibrated without its own plan's records.

    ``fitter(prior, train)`` defaults to ``hpi.planner.calibrate.fit`` (run in a process pool)."""
    folds = _folds(profile_name, measurements)
    fitted = iter(_fits([(profile_name, train) for _, train in folds if train], fitter))
    fits = [next(fitted) if train else None for _, train in folds]
    return _rows_and_folds(profile_name, measurements, folds, fits)


# ---- the whole set ------------------------------------------------------------------------------------


def _stats(errors: list[float]) -> dict[str, float]:
    if not errors:
        return {"n": 0, "median_ape": float("nan"), "max_ape": float("nan")}
    return {"n": len(errors), "median_ape": statistics.median(errors), "max_ape": max(errors)}


def repeat_errors(rows: Sequence[Row], metric: str) -> list[float]:
    """How far each repeat of a plan lands from the median of that plan's other runs on the same machine kind.

    The best any predictor of the plan could do for a run is the plan's typical figure, which the other runs
    estimate; so these errors are the floor under held-out prediction error that the runs themselves set
    (host-bound eager decode on a shared host moves 20-60% between repeats: SUMMARY.md of the H100, run 11).
    Only plans recorded more than once count."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r.metric == metric:
            groups.setdefault((r.profile, r.plan_key), []).append(r.measured)
    out = []
    for values in groups.values():
        for i, value in enumerate(values):
            others = values[:i] + values[i + 1:]
            if others:
                out.append(abs(value / statistics.median(others) - 1.0))
    return out


@dataclass(frozen=True)
class Validation:
    rows: tuple[Row, ...]
    folds: tuple[Fold, ...]
    skipped: Mapping[str, int] = field(default_factory=dict)  # loader: baselines, error entries
    excluded: Mapping[str, str] = field(default_factory=dict)  # record id (":metric" when partial) -> the reason
    unlisted: tuple[str, ...] = ()  # record files the manifest does not list

    @property
    def n_plans(self) -> int:
        return sum(1 for _ in self.folds)

    @property
    def n_records(self) -> int:
        return len({r.record_id for r in self.rows})

    def _summary(self, attr: str) -> dict[str, Any]:
        every = [getattr(r, attr) for r in self.rows]
        out = _stats(every)
        return {"median_ape": out["median_ape"], "max_ape": out["max_ape"],
                "by_metric": {m: _stats([getattr(r, attr) for r in self.rows if r.metric == m]) for m in METRICS}}

    def repeatability(self) -> dict[str, dict[str, float]]:
        """Per metric: ``repeat_errors`` of the plans recorded more than once (n: their runs)."""
        return {m: _stats(repeat_errors(self.rows, m)) for m in METRICS}

    def decode_by_mode(self) -> dict[str, dict[str, dict[str, float]]]:
        """Decode step errors split by how the steps ran: graphed (no host in the step) and eager."""
        out = {}
        for mode, graphed in (("graphed", True), ("eager", False)):
            rows = [r for r in self.rows if r.metric == "decode_step_s" and r.decode_graphs == graphed]
            out[mode] = {"calibrated": _stats([r.ape_calibrated for r in rows]),
                         "uncalibrated": _stats([r.ape_uncalibrated for r in rows]),
                         "repeatability": _stats(repeat_errors(rows, "decode_step_s"))}
        return out

    def summary(self) -> dict[str, Any]:
        """The JSON document ``hpi validate --json`` prints last: calibrated (leave-one-plan-out) and uncalibrated,
        the decode step split by graphed and eager steps, and the runs' own repeatability."""
        calibrated = self._summary("ape_calibrated")
        profiles: dict[str, int] = {}
        for rid, prof in {(r.record_id, r.profile) for r in self.rows}:
            profiles[prof] = profiles.get(prof, 0) + 1
        return {
            "n_plans": self.n_plans,
            "n_records": self.n_records,
            "median_ape": calibrated["median_ape"],
            "max_ape": calibrated["max_ape"],
            "by_metric": calibrated["by_metric"],
            "uncalibrated": self._summary("ape_uncalibrated"),
            "decode_by_mode": self.decode_by_mode(),
            "repeatability": self.repeatability(),
            "profiles": dict(sorted(profiles.items())),
            "calibration": "leave-one-plan-out per profile",
            "peak_gpu_bytes": "max over ranks of torch.cuda.max_memory_allocated vs the model's "
                              "allocator-visible parts",
        }


def _files_and_profiles(manifest: Manifest, record_paths: Sequence[str | Path] | None) -> list[tuple[Path, str | None]]:
    if record_paths is None:
        files = manifest.files()
    else:
        files = []
        for raw in record_paths:
            p = Path(raw)
            if p.is_dir():
                files += sorted(q.resolve() for q in p.rglob("*.json") if q.is_file())
            elif p.is_file():
                files.append(p.resolve())
            else:
                raise CalibrationError(f"record path {p} does not exist: pass record files or folders")
    return [(f, manifest.profile_for(f)) for f in files]


@dataclass(frozen=True)
class ManifestMeasurements:
    """A fidelity set as read: each machine's measurements, with the manifest's exclusions applied (a record
    excluded whole left out, an excluded metric measured as 0), what was excluded and why, what was skipped."""

    by_profile: dict[str, list[Measurement]]
    excluded: dict[str, str]  # record id, or "id:metric", -> reason
    skipped: dict[str, int]  # the loader's reasons (baselines, failed entries, not a RunRecord) -> count


def read_measurements(manifest: Manifest, record_paths: Sequence[str | Path] | None = None,
                      progress: Progress | None = None) -> ManifestMeasurements:
    """The records of the set (``record_paths``, default the manifest's files) by the profile each ran on
    (the manifest's, else the record's own), reporting the "read" phase to ``progress``."""
    report = progress or _no_progress
    by_profile: dict[str, list[Measurement]] = {}
    excluded: dict[str, str] = {}
    seen: set[str] = set()
    files = _files_and_profiles(manifest, record_paths)
    report("read", 0, len(files))
    # All files read together: two of one stem in different folders (a rerun kept beside the first) are then
    # named with their folder (``load_records``), as calibrate and the record tests name them.
    profile_of = {str(file): profile for file, profile in files}
    conditions_of = {str(file): dict(entry.conditions) for file, _ in files
                     if (entry := manifest.entry_for(file)) and entry.conditions}  # once a file, not a record
    records = load_records([file for file, _ in files])
    for record in records:
        rel = _relative(Path(record.source.path), manifest.root)
        profile = profile_of[record.source.path]
        m = measurement(record)
        if record.source.path in conditions_of:
            m = dataclasses.replace(m, workload=dataclasses.replace(m.workload, **conditions_of[record.source.path]))
        hits = [e for e in manifest.exclusions if e.matches(m.record_id, rel)]
        whole = next((e for e in hits if not e.metrics), None)
        if whole:
            excluded[m.record_id] = whole.reason
            continue
        for e in hits:  # a measured 0 leaves the metric out of the fit and of the rows
            m = dataclasses.replace(m, **{metric: 0.0 for metric in e.metrics})
            excluded.update({f"{m.record_id}:{metric}": e.reason for metric in e.metrics})
        if m.record_id in seen:
            raise CalibrationError(f"record id {m.record_id} appears twice ({rel}): rename one of the files")
        seen.add(m.record_id)
        name = profile or m.recorded_hardware
        if not name:
            raise CalibrationError(f"record {m.record_id} names no hardware profile: "
                                   f"list {rel} in the manifest with one")
        by_profile.setdefault(name, []).append(m)
    report("read", len(files), len(files))
    return ManifestMeasurements(by_profile, excluded, dict(records.skipped))


def validate(manifest: Manifest | None = None, record_paths: Sequence[str | Path] | None = None,
             fitter: Callable[..., Calibration] | None = None, progress: Progress | None = None) -> Validation:
    """Every record of the set (``record_paths``, default the manifest's files), left out one plan at a time.
    ``progress(phase, done, total)`` hears how far it got (``Progress``)."""
    report = progress or _no_progress
    manifest = manifest or load_manifest()
    read = read_measurements(manifest, record_paths, report)
    by_profile, excluded, skipped = read.by_profile, read.excluded, read.skipped
    # Every fold of every machine fitted at once (in parallel), then read back per machine.
    plans = {name: _folds(name, by_profile[name]) for name in sorted(by_profile)}
    tasks = [(name, train) for name in plans for _, train in plans[name] if train]
    fitted = iter(_fits(tasks, fitter, report))
    rows: list[Row] = []
    folds: list[Fold] = []
    for i, (name, machine_folds) in enumerate(plans.items()):
        report("predict", i, len(plans))
        fits = [next(fitted) if train else None for _, train in machine_folds]
        r, f = _rows_and_folds(name, by_profile[name], machine_folds, fits)
        rows += r
        folds += f
    report("predict", len(plans), len(plans))
    unlisted: tuple[str, ...] = ()
    if record_paths is None:
        report("unlisted", 0, 1)
        unlisted = tuple(manifest.unlisted())
        report("unlisted", 1, 1)
    return Validation(tuple(rows), tuple(folds), skipped, excluded, unlisted)
