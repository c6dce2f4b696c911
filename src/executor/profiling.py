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
2026-12-05-h200-issue20, call 2). Inclusive time only names the outer frames (``_call_impl``, the worker's main), so
the summary also ranks functions by self time, and ``h2d.copy_gap_attribution`` says what the host ran (innermost
Python frame, innermost host op) while the copy engine sat idle (benchmarks/results/2026-12-05-h100-issue20).

The profiler adds host time to every op it records, so a profiled run is slower where the host bounds it;
compare profiled runs with each other, and step times with unprofiled runs.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from hpi.atomic import write_json, write_text

PROFILE_ENV = "HPI_TORCH_PROFILE"
GAP_FLOOR_US = 100.0  # idle time of the copy engine shorter than this is the copies' own issue rhythm
TOP = 25
TEXT_TOP = 10  # rows of each table in the text summary: the JSON has TOP
# cuda_runtime calls in which the host waits for the device (or a copy): host time the GPU's work did not hide
WAIT_CALLS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy",
              "cudaStreamWaitEvent")

# the host's own calls, nested on their thread; user_annotation ranges are left out: they span whole phases and would
# claim the copy gaps as their own self time, hiding the ops that ran in them
HOST_OP_CATEGORIES = ("cpu_op", "cuda_runtime", "cuda_driver")

__all__ = ["PROFILE_ENV", "profiling_wanted", "python_stacks_wanted", "profiled", "summarize_trace", "summary_text",
           "union_us", "overlap_us", "gaps_us"]


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
    tables = (f"{summary_text(summary)}\n\nby device time:\n{averages.table(sort_by=sort, row_limit=40)}\n\n"
              f"by host time:\n{averages.table(sort_by='self_cpu_time_total', row_limit=40)}\n")
    base = Path(out_dir) / f"profile-rank{rank}"
    write_json(base.with_suffix(".json"), summary, indent=1, newline=True)
    write_text(base.with_suffix(".txt"), tables)


Windows = tuple[np.ndarray, np.ndarray]  # disjoint (starts, ends) in time order


def union_us(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: busy time where several overlap."""
    return _union_length(*_columns_of(intervals))


def _union_length(starts: np.ndarray, ends: np.ndarray) -> float:
    merged_starts, merged_ends = _merged_arrays(starts, ends)
    return float(np.sum(merged_ends - merged_starts))


def _columns_of(intervals: Sequence[tuple[float, float]]) -> Windows:
    table = np.asarray(intervals, dtype=float).reshape(-1, 2)
    return table[:, 0], table[:, 1]


def _merged_arrays(starts: np.ndarray, ends: np.ndarray) -> Windows:
    """The union of intervals as disjoint ones in time order (touching ones joined); numpy, as traces hold 10^6."""
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(ends) if len(ends) else ends  # the latest end so far: where the union has got to
    opens = np.ones(len(starts), dtype=bool)
    opens[1:] = starts[1:] > reach[:-1]
    first = np.flatnonzero(opens)
    last = np.append(first[1:] - 1, len(starts) - 1) if len(first) else first
    return starts[first], reach[last]


def overlap_us(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]) -> float:
    """Time both interval sets are busy at once: |A| + |B| - |A u B| of their unions."""
    return union_us(a) + union_us(b) - union_us(list(a) + list(b))


def gaps_us(intervals: Sequence[tuple[float, float]]) -> list[float]:
    """Idle stretches between the merged intervals, in time order."""
    starts, ends = _gap_windows(*_columns_of(intervals))
    return (ends - starts).tolist()


def _gap_windows(starts: np.ndarray, ends: np.ndarray, floor_us: float = 0.0) -> Windows:
    """The idle stretches between the merged intervals that last at least ``floor_us``, as windows."""
    busy_starts, busy_ends = _merged_arrays(starts, ends)
    idle_starts, idle_ends = busy_ends[:-1], busy_starts[1:]
    long_enough = idle_ends - idle_starts >= floor_us
    return idle_starts[long_enough], idle_ends[long_enough]


def _time_before(windows: Windows, t: np.ndarray) -> np.ndarray:
    """Window time before each instant of ``t``: its difference at an interval's two ends is the interval's time
    inside the windows, for any number of intervals at the cost of a sort."""
    starts, ends = windows
    if not len(starts):
        return np.zeros(len(t))
    lengths = ends - starts
    before_window = np.concatenate(([0.0], np.cumsum(lengths)))
    last_started = np.searchsorted(starts, t, side="right") - 1  # the last window that began at or before t
    at = np.maximum(last_started, 0)
    into_it = np.clip(t - starts[at], 0.0, lengths[at])
    return np.where(last_started >= 0, before_window[at] + into_it, 0.0)


def _inside_us(windows: Windows, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Each interval's time inside the windows."""
    return _time_before(windows, ends) - _time_before(windows, starts)


def _covered_us(windows: Windows, starts: np.ndarray, ends: np.ndarray) -> float:
    """Window time covered by any of the intervals: their union's time inside the windows."""
    return float(np.sum(_inside_us(windows, *_merged_arrays(starts, ends))))


@dataclass
class _Calls:
    """Complete events of some categories with each one's innermost enclosing event on its own thread: what self
    (exclusive) time needs. ``names[name_code[i]]`` names event i; ``parent[i]`` is -1 for an outermost one."""
    names: list[str]
    name_code: np.ndarray
    start: np.ndarray
    end: np.ndarray
    parent: np.ndarray

    def exclusive(self, inclusive: np.ndarray) -> np.ndarray:
        """Each call's ``inclusive`` amount less its direct children's: its self part."""
        nested = self.parent >= 0
        children = np.bincount(self.parent[nested], weights=inclusive[nested], minlength=len(inclusive))
        return np.maximum(inclusive - children, 0.0)  # why: a child rounded a hair past its parent's end


def _calls(events: Sequence[dict[str, Any]]) -> _Calls:
    threads: dict[tuple[Any, Any], int] = {}
    names: dict[str, int] = {}
    n = len(events)
    thread = np.fromiter((threads.setdefault((e.get("pid"), e.get("tid")), len(threads)) for e in events),
                         dtype=np.int64, count=n)
    name_code = np.fromiter((names.setdefault(e.get("name", ""), len(names)) for e in events), dtype=np.int64, count=n)
    start = np.fromiter((float(e["ts"]) for e in events), dtype=float, count=n)
    end = start + np.fromiter((float(e.get("dur", 0.0)) for e in events), dtype=float, count=n)
    return _Calls(list(names), name_code, start, end, _parents(thread, start, end))


def _parents(thread: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Index of each call's innermost enclosing call on its own thread (-1: none): one sweep over the calls sorted by
    thread, then start, the longer first, keeping a stack of the calls that may still enclose the next."""
    order = np.lexsort((start - end, start, thread))
    parent = [-1] * len(start)
    open_calls: list[int] = []
    open_ends: list[float] = []
    current_thread = None
    for i, call_thread, call_end in zip(order.tolist(), thread[order].tolist(), end[order].tolist()):
        if call_thread != current_thread:
            open_calls, open_ends, current_thread = [], [], call_thread
        # a call that ends before this one does cannot enclose it, nor any later call (they start after this one)
        while open_ends and open_ends[-1] < call_end:
            open_calls.pop()
            open_ends.pop()
        if open_calls:
            parent[i] = open_calls[-1]
        open_calls.append(i)
        open_ends.append(call_end)
    return np.asarray(parent, dtype=np.int64)


def _ranked(calls: _Calls, amount: np.ndarray, n: int = TOP) -> list[tuple[str, int, float]]:
    """(name, calls, total) of the ``n`` names with the most ``amount``, counting only calls with some."""
    some = amount > 0
    totals = np.bincount(calls.name_code[some], weights=amount[some], minlength=len(calls.names))
    counts = np.bincount(calls.name_code[some], minlength=len(calls.names))
    best = np.argsort(-totals, kind="stable")[:n]
    return [(calls.names[k], int(counts[k]), float(totals[k])) for k in best if counts[k]]


def _self_top(calls: _Calls) -> list[dict[str, Any]]:
    """Names by self time: where the host's time went, each moment counted once on its thread."""
    return [{"name": name[:120], "count": count, "total_us": round(total, 1), "mean_us": round(total / count, 2)}
            for name, count, total in _ranked(calls, calls.exclusive(calls.end - calls.start))]


def _in_gaps_top(calls: _Calls, gaps: Windows, gap_total: float) -> list[dict[str, Any]]:
    """Names by self time inside the copy gaps: the innermost call running while the copy engine sat idle."""
    in_gaps = calls.exclusive(_inside_us(gaps, calls.start, calls.end))
    return [{"name": name[:120], "count": count, "in_gaps_us": round(total, 1),
             "fraction_of_gaps": round(total / gap_total, 4)} for name, count, total in _ranked(calls, in_gaps)]


def _copy_gap_attribution(gaps: Windows, python: _Calls, host_ops: _Calls, kernels: Windows) -> dict[str, Any]:
    """What ran during the copy engine's idle gaps: the share of gap time each kind of recorded work covers (on any
    thread, outer Python frames included) and the calls that ran in them by self time."""
    gap_total = float(np.sum(gaps[1] - gaps[0]))
    if not gap_total:
        return {"gap_us": 0.0, "covered_fraction": None, "python_self": [], "host_ops_self": []}
    anything = (np.concatenate((python.start, host_ops.start, kernels[0])),
                np.concatenate((python.end, host_ops.end, kernels[1])))
    covered = {"host_ops": _covered_us(gaps, host_ops.start, host_ops.end),
               "python": _covered_us(gaps, python.start, python.end), "kernels": _covered_us(gaps, *kernels),
               "nothing_recorded": gap_total - _covered_us(gaps, *anything)}
    return {"gap_us": round(gap_total, 1),
            "covered_fraction": {kind: round(us / gap_total, 4) for kind, us in covered.items()},
            "python_self": _in_gaps_top(python, gaps, gap_total),
            "host_ops_self": _in_gaps_top(host_ops, gaps, gap_total)}


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
    copying, the copy engine's idle gaps of at least ``GAP_FLOOR_US`` (count, total, the longest) and
    ``copy_gap_attribution``: what the host ran during those gaps (see ``_copy_gap_attribution``). ``kernels``:
    busy time, its overlap with the copies, and the top kernels by time. ``host``: the span the host ops cover,
    the time in the CUDA runtime calls that wait on the device (``WAIT_CALLS``), and the top host ops by total
    time (nested ops count in their parents too: read it as where, not how much) and by self time (``self_top``:
    less the ops nested in them on their thread). ``python``: the same for Python's calls, where the trace has them
    (``HPI_TORCH_PROFILE=python``)."""
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
    gap_windows = _gap_windows(*_columns_of(h2d_spans), floor_us=GAP_FLOOR_US)
    gaps = (gap_windows[1] - gap_windows[0]).tolist()
    waits = [e for e in runtime if e.get("name", "").startswith(WAIT_CALLS)]
    python_calls = _calls(python)
    host_ops = _calls([e for e in complete if e.get("cat") in HOST_OP_CATEGORIES])
    return {
        "wall_us": round(wall, 1),
        "h2d": {"count": len(h2d), "bytes": h2d_bytes, "busy_us": round(h2d_busy, 1),
                "busy_fraction": round(h2d_busy / wall, 4) if wall else None,
                "bytes_s_while_busy": h2d_bytes / (h2d_busy * 1e-6) if h2d_busy else None,
                "bytes_s_over_wall": h2d_bytes / (wall * 1e-6) if wall else None,
                "streams": sorted({str(e.get("tid")) for e in h2d}),
                "gaps_over_floor": {"floor_us": GAP_FLOOR_US, "count": len(gaps), "total_us": round(sum(gaps), 1),
                                    "longest_us": [round(g, 1) for g in sorted(gaps, reverse=True)[:10]]},
                "copy_gap_attribution": _copy_gap_attribution(gap_windows, python_calls, host_ops,
                                                              _columns_of(kernel_spans))},
        "other_copies": _top([e for e in copies if "HtoD" not in e.get("name", "")], 5),
        "kernels": {"count": len(kernels), "busy_us": round(union_us(kernel_spans), 1),
                    "overlap_with_h2d_us": round(overlap_us(kernel_spans, h2d_spans), 1), "top": _top(kernels)},
        "host": {"span_us": round(union_us(_spans(host)), 1), "ops": len(host),
                 "waits_on_device_us": round(sum(float(e.get("dur", 0.0)) for e in waits), 1),
                 "waits": _top(waits, 5), "runtime_top": _top(runtime, 10), "top": _top(host),
                 "self_top": _self_top(host_ops)},
        "python": {"span_us": round(_union_length(python_calls.start, python_calls.end), 1),
                   "calls": len(python), "top": _top(python), "self_top": _self_top(python_calls)},
    }


def _table_lines(title: str, rows: list[dict[str, Any]], amount: str) -> list[str]:
    lines = [f"{title} (top {TEXT_TOP}):"]
    for row in rows[:TEXT_TOP]:
        share = f" {row['fraction_of_gaps']:6.1%}" if "fraction_of_gaps" in row else ""
        lines.append(f"  {row[amount]:>14,.1f} us{share} {row['count']:>9,d} calls  {row['name']}")
    return lines if rows else lines + ["  (none)"]


def summary_text(summary: dict[str, Any]) -> str:
    """The summary's copy gaps and who ran in them, short, for a reader of ``profile-rank<R>.txt``."""
    h2d, gaps = summary["h2d"], summary["h2d"]["gaps_over_floor"]
    attribution = h2d["copy_gap_attribution"]
    lines = [f"wall {summary['wall_us']:,.1f} us; {h2d['count']} HtoD copies busy {h2d['busy_us']:,.1f} us; "
             f"{gaps['count']} copy gaps >= {gaps['floor_us']:.0f} us idle {gaps['total_us']:,.1f} us"]
    if attribution["covered_fraction"]:
        lines.append("share of the copy gaps covered by: " + ", ".join(
            f"{kind} {share:.1%}" for kind, share in attribution["covered_fraction"].items()))
    lines += _table_lines("python in the copy gaps, by self time", attribution["python_self"], "in_gaps_us")
    lines += _table_lines("host ops in the copy gaps, by self time", attribution["host_ops_self"], "in_gaps_us")
    lines += _table_lines("python over the run, by self time", summary["python"]["self_top"], "total_us")
    return "\n".join(lines)
