"""The profile's ``calibrated:`` section: rendered from a Calibration, and replaced in the YAML file with every
other byte kept (``hpi calibrate`` writes it; ``hpi.planner.profiles.load_profile`` applies it)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from hpi.planner.calibrate.fit import Calibration
from hpi.planner.calibrate.measurements import ErrorSummary

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
    start = next((i for i, line in enumerate(lines)
                  if line.rstrip("\r\n").split("#", 1)[0].rstrip() == f"{SECTION_KEY}:"
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
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    write_text_atomic(path, replace_section(text, block))


def write_text_atomic(path: str | Path, new: str) -> None:
    """Write ``new`` into ``path`` through a temporary file renamed over it: a reader sees the old file or the
    new one, never half of one (the file's permissions are kept)."""
    import os
    import tempfile

    path = Path(path)
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
