"""The RunRecord: what a run measured, next to what the planner predicted for the same plan.

Each rank reports a ``RankReport`` (plain data); rank 0 gathers them and folds them into one JSON
document. Timing convention: all ranks start generating at a barrier; forward k of the *pipeline* ends
when its slowest rank ends it, so prefill is the first such end and each decode step the gap between
consecutive ends. The measured bubble is the slowest stage's idle share of a decode step, the same
definition the planner uses.
"""

from __future__ import annotations

import platform
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from hpi.executor.render import AIO_DEFAULTS


@dataclass
class RankReport:
    rank: int
    coords: tuple[int, int, int]  # (tp, dp, pp stage)
    device_name: str
    forward_end_s: list[float]
    busy_s: list[float]
    peak_allocated_bytes: int = 0
    peak_reserved_bytes: int = 0
    host_rss_bytes: int = 0
    pinned_bytes: int = 0
    h2d_bytes_per_forward: int = 0  # bytes ZeRO-3 copies host->device for one forward of this rank's stage
    nvme_bytes_per_forward: int = 0  # bytes of this rank's partitions that live on NVMe (read every forward)
    nvme_device: str | None = None  # the block device under the NVMe folder (None: no device, e.g. tmpfs)
    nvme_read_bytes: int | None = None  # what that device read during the measured run (/proc/diskstats)
    nvme_read_interval_s: float | None = None
    nvme_avg_queue_depth: float | None = None  # requests in flight on average during the measured run
    tp_allreduce_s: float = 0.0  # total time inside TP all-reduces during the measured run
    build_s: float = 0.0  # materialize (or load) the weights and wrap them
    tokens: list[list[int]] = field(default_factory=list)  # last-stage ranks: new tokens per sequence


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def pipeline_times(reports: list[RankReport]) -> dict[str, Any]:
    n = min(len(r.forward_end_s) for r in reports)
    ends = [max(r.forward_end_s[k] for r in reports) for k in range(n)]
    steps = [b - a for a, b in zip(ends, ends[1:])]
    bubble = []
    for k in range(1, n):
        slowest_busy = max(r.busy_s[k] for r in reports)
        bubble.append(max(0.0, 1.0 - slowest_busy / steps[k - 1]) if steps[k - 1] > 0 else 0.0)
    return {
        "forwards": n,
        "prefill_s": ends[0] if ends else 0.0,
        "ttft_s": ends[0] if ends else 0.0,
        "total_s": ends[-1] if ends else 0.0,
        "decode_step_s": {
            "median": statistics.median(steps) if steps else 0.0,
            "p90": _percentile(steps, 0.9),
            "mean": statistics.fmean(steps) if steps else 0.0,
            "all": steps,
        },
        "pp_bubble_ratio": statistics.fmean(bubble) if bubble else 0.0,
    }


def software_versions() -> dict[str, str]:
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
    return versions


def _nvme_figures(spec_dict: dict[str, Any], reports: list[RankReport], decode_s: float, micro_batches: int,
                  profile_read_bytes_s: float | None = None):
    """NVMe offload: bytes per step from the partitions, and what the drive did (bytes, rate, queue depth),
    against the profile's per-GPU NVMe read share (the probe's O_DIRECT sequential read, split by the
    placement over the ranks reading at once)."""
    if spec_dict["plan"].get("offload") != "nvme":
        return None
    per_step = max((r.nvme_bytes_per_forward for r in reports), default=0) * micro_batches
    measured = [r for r in reports if r.nvme_read_bytes is not None]
    read = sum(r.nvme_read_bytes for r in measured) if measured else None
    interval = max((r.nvme_read_interval_s for r in measured), default=0.0)
    achieved = per_step / decode_s if decode_s > 0 else 0.0
    out = {
        "bytes_per_step": per_step,
        "achieved_read_bytes_s": achieved,
        "profile_read_bytes_s": profile_read_bytes_s,
        "fraction_of_profile": achieved / profile_read_bytes_s if profile_read_bytes_s and achieved else None,
        "aio": dict(AIO_DEFAULTS),  # the queue depth and block size DeepSpeed was given (hpi.executor.render)
        "device": measured[0].nvme_device if measured else None,
        "device_read_bytes": read,
        "device_read_bytes_s": read / interval if measured and interval > 0 else None,
        "device_avg_queue_depth": max(r.nvme_avg_queue_depth for r in measured) if measured else None,
    }
    if not measured:
        out["why_no_device_figures"] = "the NVMe folder is on no block device /proc/diskstats knows (tmpfs, overlay, or not Linux)"
    return out


def build_record(
    spec_dict: dict[str, Any],
    reports: list[RankReport],
    tokens: list[list[int]],
    prediction: dict[str, Any] | None,
    profile_h2d_pinned_bytes_s: float | None,
    model_info: dict[str, Any],
) -> dict[str, Any]:
    """Fold rank reports into the RunRecord document (JSON-ready)."""
    times = pipeline_times(reports)
    plan = spec_dict["plan"]
    batch, generated = plan["batch_size"], max((len(t) for t in tokens), default=0)
    decode_median = times["decode_step_s"]["median"]
    h2d_per_step = max((r.h2d_bytes_per_forward for r in reports), default=0) * plan.get("micro_batches", 1)
    achieved = h2d_per_step / decode_median if decode_median > 0 and h2d_per_step else 0.0
    decode_forwards = max(times["forwards"] - 1, 1)
    record = {
        "nvme": _nvme_figures(spec_dict, reports, decode_median, plan.get("micro_batches", 1),
                              ((prediction or {}).get("placement") or {}).get("nvme_read_bytes_s")),
        "kind": "hpi.RunRecord",
        "version": 1,
        "spec": spec_dict,
        "plan": plan,
        "model": model_info,
        "hardware": spec_dict.get("hardware"),
        "device": spec_dict["device"],
        "software": software_versions(),
        "devices": sorted({r.device_name for r in reports}),
        "world_size": len(reports),
        "tokens": tokens,
        "generated_tokens_per_sequence": generated,
        "prefill_s": times["prefill_s"],
        "ttft_s": times["ttft_s"],
        "decode_step_s": times["decode_step_s"],
        "total_s": times["total_s"],
        "throughput_tok_s": batch * generated / times["total_s"] if times["total_s"] > 0 else 0.0,
        "pp_bubble_ratio": times["pp_bubble_ratio"],
        "tp_allreduce_s_per_step": max((r.tp_allreduce_s for r in reports), default=0.0) / max(times["forwards"], 1),
        "h2d": {
            "bytes_per_step": h2d_per_step,
            "achieved_bytes_s": achieved,
            "profile_pinned_bytes_s": profile_h2d_pinned_bytes_s,
            "fraction_of_profile": achieved / profile_h2d_pinned_bytes_s if profile_h2d_pinned_bytes_s and achieved else None,
        },
        "ranks": [asdict(r) | {"tokens": None} for r in reports],
        "build_s": max((r.build_s for r in reports), default=0.0),
        "decode_forwards": decode_forwards,
        "predicted": prediction,
    }
    if prediction:
        record["measured_vs_predicted"] = {
            key: {"measured": record[key] if key != "decode_step_s" else decode_median, "predicted": prediction.get(key)}
            for key in ("prefill_s", "decode_step_s", "total_s", "ttft_s", "throughput_tok_s")
        }
        record["measured_vs_predicted"]["gpu_peak_bytes"] = {
            "measured": max((r.peak_allocated_bytes for r in reports), default=0),
            "predicted": prediction.get("memory", {}).get("gpu_peak_bytes"),
        }
    return record
