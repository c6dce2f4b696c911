"""Figures read out of the measurement document ``run_probe`` returns, and the form every profile number
takes: a quantity with its provenance (``q``)."""

from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, Sequence

__all__ = ["q", "gbs", "copy_figure", "step_error"]


def q(value: float, source: str, note: str) -> dict[str, Any]:
    """A quantity with provenance, as every profile number must be; measured rates keep 4 significant digits."""
    value = float(value)
    return {"value": value if value.is_integer() else float(f"{value:.4g}"), "source": source, "note": note}


def _median(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return statistics.median(values) if values else None


def gbs(x: float | None) -> str:
    """A rate in words: "53.6 GB/s", or "n/a" where it was not measured."""
    return "n/a" if x is None else f"{x / 1e9:.1f} GB/s"


def copy_figure(doc: Mapping[str, Any], kind: str, when: str = "alone") -> float | None:
    """Median over GPUs of one host<->device figure: kind h2d_pinned|d2h_pinned|h2d_pageable|d2h_pageable."""
    per_gpu = ((doc.get("copies") or {}).get(kind) or {}).get(when) or []
    return _median(per_gpu)


def step_error(doc: Mapping[str, Any], step: str) -> str:
    """Why a measurement step left no figure: its error, or "skipped" where it did not run."""
    return (doc.get("errors") or {}).get(step, "skipped")
