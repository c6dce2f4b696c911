"""A ``torch.profiler`` account of a measured run, for diagnosis: ``HPI_TORCH_PROFILE=1 hpi run ...``.

Why: two measurements of one plan on one build streamed the 70B's 4-bit weights at 0.75 and 0.87 s a step
(benchmarks/results/2026-12-04-h200-split), and the eager 8B decode step took 41-46 ms where its kernels need 7
(issue 20). Step times alone cannot say whether the copy engine waited on the host, copied slower, or the host
waited on the device. The profiler's trace can: each rank writes, beside its record (``out_dir``), a summary of
the measured run (``profile-rank<R>.json``: busy time of the copies and kernels as the union of their intervals,
the copy rate while copying, the copy engine's idle gaps, the host's waits on the device, the top kernels and
host calls) and the profiler's own tables (``profile-rank<R>.txt``). The trace itself is not kept: tens of MB a
70B step.

``HPI_TORCH_PROFILE=python`` also records Python's calls (``with_stack``): the summary's ``python`` lists the
functions the host spent its time in, where the ops alone leave the host idle (a 70B 4-bit ZeRO-3 step whose copy
engine sat idle a third of the time while neither kernels nor host ops ran: benchmarks/results/
2026-12-05-h200-issue20, call 2).

The profiler adds host time to every op it records, so a profiled run is slower where the host bounds it;
compare profiled runs with each other, and step times with unprofiled runs.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from hpi.atomic import write_json, write_text

PROFILE_ENV = "HPI_TORCH_PROFILE"
GAP_FLOOR_US = 100.0  # idle time of the copy engine shorter than this is the copies' own issue rhythm
TOP = 25
# cuda_runtime calls in which the host waits for the device (or a copy): host time the GPU's work did not hide
WAIT_CALLS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy",
              "cudaStreamWaitEvent")

__all__ = ["PROFILE_ENV", "profiling_wanted", "python_stacks_wanted", "profiled", "summarize_trace", "union_us",
           "overlap_us", "gaps_us"]


def profiling_wanted() -> bool:
    return os.environ.get(PROFILE_ENV, "") not in ("", "0")


def python_stacks_wanted() -> bool:
    return os.environ.get(PROFILE_ENV, "") == "python"


@contextmanager
def profiled(out_dir: str, rank: int) -> Iterator[None]:
    """Profile the block (host ops, and CUDA kernels and copies where CUDA runs) when ``HPI_TORCH_PROFILE`` is set;
    write ``profile-rank<R>.json`` and ``.txt`` into ``out_dir`` after it. Without the variable: nothing."""
    if not profiling_wanted():
        yield
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, with_stack=python_stacks_wanted()) as prof:
        yield
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        summary = summarize_trace(json.loads(trace.read_text()).get("traceEvents", []))
    averages = prof.key_averages()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    tables = (f"by device time:\n{averages.table(sort_by=sort, row_limit=40)}\n\n"
              f"by host time:\n{averages.table(sort_by='self_cpu_time_total', row_limit=40)}\n")
    base = Path(out_dir) / f"profile-rank{rank}"
    write_json(base.with_suffix(".json"), summary, indent=1, newline=True)
    write_text(base.with_suffix(".txt"), tables)


def union_us(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: busy time where several overlap."""
    return sum(b - a for a, b in _merged(intervals))


def _merged(intervals: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def overlap_us(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]) -> float:
    """Time both interval sets are busy at once: |A| + |B| - |A u B| of their unions."""
    return union_us(a) + union_us(b) - union_us(list(a) + list(b))


def gaps_us(intervals: Sequence[tuple[float, float]]) -> list[float]:
    """Idle stretches between the merged intervals, in time order."""
    merged = _merged(intervals)
    return [b[0] - a[1] for a, b in zip(merged, merged[1:])]


def _top(events: Sequence[dict[str, Any]], n: int = TOP) -> list[dict[str, Any]]:
    by: dict[str, list[float]] = {}
    for e in events:
        by.setdefault(e["name"], []).append(float(e.get("dur", 0.0)))
    rows = sorted(by.items(), key=lambda kv: -sum(kv[1]))[:n]
    return [{"name": k[:120], "count": len(v), "total_us": round(sum(v), 1), "mean_us": round(sum(v) / len(v), 2)}
            for k, v in rows]


def _spans(events: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    return [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in events]


def summarize_trace(events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the chrome trace of a run says about where its time went (all times in µs of the trace's clock).

    ``h2d``: host-to-device copies (``gpu_memcpy`` events named HtoD): bytes, busy time (union), the rate while
    copying, and the copy engine's idle gaps of at least ``GAP_FLOOR_US`` (count, total, the longest). ``kernels``:
    busy time, its overlap with the copies, and the top kernels by time. ``host``: the span the host ops cover,
    the time in the CUDA runtime calls that wait on the device (``WAIT_CALLS``), and the top host ops by total
    time (nested ops count in their parents too: read it as where, not how much). ``python``: the same for
    Python's calls, where the trace has them (``HPI_TORCH_PROFILE=python``)."""
    complete = [e for e in events if e.get("ph") == "X" and "ts" in e]
    copies = [e for e in complete if e.get("cat") == "gpu_memcpy"]
    h2d = [e for e in copies if "HtoD" in e.get("name", "")]
    kernels = [e for e in complete if e.get("cat") == "kernel"]
    host = [e for e in complete if e.get("cat") in ("cpu_op", "user_annotation")]
    python = [e for e in complete if e.get("cat") == "python_function"]
    runtime = [e for e in complete if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    everything = _spans(complete)
    wall = (max(b for _, b in everything) - min(a for a, _ in everything)) if everything else 0.0
    h2d_spans, kernel_spans = _spans(h2d), _spans(kernels)
    h2d_busy = union_us(h2d_spans)
    h2d_bytes = sum(int((e.get("args") or {}).get("bytes", 0)) for e in h2d)
    gaps = [g for g in gaps_us(h2d_spans) if g >= GAP_FLOOR_US]
    waits = [e for e in runtime if e.get("name", "").startswith(WAIT_CALLS)]
    return {
        "wall_us": round(wall, 1),
        "h2d": {"count": len(h2d), "bytes": h2d_bytes, "busy_us": round(h2d_busy, 1),
                "busy_fraction": round(h2d_busy / wall, 4) if wall else None,
                "bytes_s_while_busy": h2d_bytes / (h2d_busy * 1e-6) if h2d_busy else None,
                "bytes_s_over_wall": h2d_bytes / (wall * 1e-6) if wall else None,
                "streams": sorted({str(e.get("tid")) for e in h2d}),
                "gaps_over_floor": {"floor_us": GAP_FLOOR_US, "count": len(gaps), "total_us": round(sum(gaps), 1),
                                    "longest_us": [round(g, 1) for g in sorted(gaps, reverse=True)[:10]]}},
        "other_copies": _top([e for e in copies if "HtoD" not in e.get("name", "")], 5),
        "kernels": {"count": len(kernels), "busy_us": round(union_us(kernel_spans), 1),
                    "overlap_with_h2d_us": round(overlap_us(kernel_spans, h2d_spans), 1), "top": _top(kernels)},
        "host": {"span_us": round(union_us(_spans(host)), 1), "ops": len(host),
                 "waits_on_device_us": round(sum(float(e.get("dur", 0.0)) for e in waits), 1),
                 "waits": _top(waits, 5), "runtime_top": _top(runtime, 10), "top": _top(host)},
        "python": {"span_us": round(union_us(_spans(python)), 1), "calls": len(python), "top": _top(python)},
    }
