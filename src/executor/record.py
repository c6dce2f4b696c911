"""The RunRecord: what a run measured, next to what the planner predicted for the same plan.

Each rank reports a ``RankReport`` (plain data, ``hpi.records``); rank 0 gathers them and folds them into one
``hpi.records.RunRecord``. Timing convention: all ranks start generating at a barrier; forward k of the *pipeline* ends
when its slowest rank ends it, so prefill is the first such end and each decode step the gap between
consecutive ends. The measured bubble is the slowest stage's idle share of a decode step, the same
definition the planner uses.
"""

from __future__ import annotations

import platform
import statistics
from dataclasses import replace
from typing import Any

from hpi.executor.render import aio_config
from hpi.planner.specs.plan import Plan
from hpi.records import (
    DecodeSteps,
    HostToDevice,
    ModelInfo,
    NvmeReads,
    Output,
    Prediction,
    RankReport,
    RunRecord,
    Software,
    Timings,
    Transfers,
    compare,
)

__all__ = ["RankReport", "bubble_ratio", "build_record", "pipeline_timings", "software_versions"]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def bubble_ratio(wall_s: float, slowest_busy_s: float) -> float:
    """The pipeline bubble: the slowest stage's idle share of ``wall_s`` (0 when no time passed). The planner's
    definition; ``hpi run`` applies it per decode step, ``hpi serve``'s metrics per window of steps."""
    return max(0.0, 1.0 - slowest_busy_s / wall_s) if wall_s > 0 else 0.0


def pipeline_timings(reports: list[RankReport], batch_size: int, generated: int) -> Timings:
    """The record's timings from the ranks' forward ends and busy times (module docstring: the convention)."""
    n = min(len(r.forward_end_s) for r in reports)
    ends = [max(r.forward_end_s[k] for r in reports) for k in range(n)]
    steps = [b - a for a, b in zip(ends, ends[1:])]
    bubble = [bubble_ratio(steps[k - 1], max(r.busy_s[k] for r in reports)) for k in range(1, n)]
    total = ends[-1] if ends else 0.0
    return Timings(
        prefill_s=ends[0] if ends else 0.0,
        ttft_s=ends[0] if ends else 0.0,
        decode_step_s=DecodeSteps(median_s=statistics.median(steps) if steps else 0.0, p90_s=_percentile(steps, 0.9),
                                  mean_s=statistics.fmean(steps) if steps else 0.0, all_s=tuple(steps)),
        total_s=total,
        throughput_tok_s=batch_size * generated / total if total > 0 else 0.0,
        pp_bubble_ratio=statistics.fmean(bubble) if bubble else 0.0,
        tp_allreduce_s_per_step=max((r.tp_allreduce_s for r in reports), default=0.0) / max(n, 1),
        build_s=max((r.build_s for r in reports), default=0.0),
        compile_s=max((r.compile_s for r in reports if r.compile_s is not None), default=None),
        decode_forwards=max(n - 1, 1),
    )


def software_versions() -> Software:
    versions = {"python": platform.python_version()}
    for name in ("torch", "deepspeed", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing or broken package is recorded, not fatal
            versions[name] = "absent"
    try:
        import torch

        versions["cuda"] = torch.version.cuda or "none"
    except Exception:  # noqa: BLE001
        pass
    return Software(**versions)


AIO_KNOBS = ("aio_block_size_bytes", "aio_queue_depth", "aio_threads")


def _aio_asked(plan: dict[str, Any]) -> dict[str, Any]:
    """The aio section the worker gave DeepSpeed: rendered from the run's plan as the worker renders it
    (``hpi.executor.render.aio_config``); a plan from before the aio knobs ran at their defaults."""
    return aio_config(Plan().with_(**{name: plan[name] for name in AIO_KNOBS if name in plan}))


def _nvme_figures(plan: dict[str, Any], reports: list[RankReport], decode_s: float,
                  profile_read_bytes_s: float | None) -> NvmeReads | None:
    """NVMe offload: bytes per step from the partitions, and what the drive did (bytes, rate, queue depth),
    against the profile's per-GPU NVMe read share (the probe's O_DIRECT sequential read, split by the
    placement over the ranks reading at once)."""
    if plan.get("offload") != "nvme":
        return None
    per_step = max((r.nvme_bytes_per_forward for r in reports), default=0) * plan.get("micro_batches", 1)
    measured = [r for r in reports if r.nvme_read_bytes is not None]
    read = sum(r.nvme_read_bytes for r in measured) if measured else None
    interval = max((r.nvme_read_interval_s for r in measured), default=0.0)
    return NvmeReads(
        bytes_per_step=per_step,
        achieved_read_bytes_s=per_step / decode_s if decode_s > 0 else 0.0,
        profile_read_bytes_s=profile_read_bytes_s,
        aio=_aio_asked(plan),
        device=measured[0].nvme_device if measured else None,
        device_read_bytes=read,
        device_read_bytes_s=read / interval if measured and interval > 0 else None,
        device_avg_queue_depth=max(r.nvme_avg_queue_depth for r in measured) if measured else None,
    )


def build_record(
    spec_dict: dict[str, Any],
    reports: list[RankReport],
    tokens: list[list[int]],
    prediction: dict[str, Any] | None,
    profile_h2d_pinned_bytes_s: float | None,
    model_info: ModelInfo,
) -> RunRecord:
    """Fold rank reports into the RunRecord (``prediction``: the planner's ``Estimate.to_dict()``, or None)."""
    plan = spec_dict["plan"]
    generated = max((len(t) for t in tokens), default=0)
    timings = pipeline_timings(reports, plan["batch_size"], generated)
    decode_median = timings.decode_step_s.median_s
    h2d_per_step = max((r.h2d_bytes_per_forward for r in reports), default=0) * plan.get("micro_batches", 1)
    achieved = h2d_per_step / decode_median if decode_median > 0 and h2d_per_step else 0.0
    predicted = Prediction.from_json(prediction, "prediction")
    record = RunRecord(
        spec=spec_dict, plan=plan, model=model_info, hardware=spec_dict.get("hardware"), device=spec_dict["device"],
        devices=tuple(sorted({r.device_name for r in reports})), world_size=len(reports),
        software=software_versions(), timings=timings,
        transfers=Transfers(
            h2d=HostToDevice(h2d_per_step, achieved, profile_h2d_pinned_bytes_s),
            nvme=_nvme_figures(plan, reports, decode_median, predicted.nvme_read_bytes_s if predicted else None)),
        ranks=tuple(replace(r, tokens=None) for r in reports), prediction=predicted,
        output=Output(tokens=tuple(tuple(t) for t in tokens), generated_tokens_per_sequence=generated),
    )  # fmt: skip
    if predicted is None:
        return record
    return replace(record, measured_vs_predicted=compare(timings, predicted, record.gpu_peak_allocated_bytes))
