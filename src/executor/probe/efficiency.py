"""The profile's ``efficiency:`` figures from the probe's timings: ``hbm``, ``layer_device_overhead_s`` and
``graphed_step_overhead_s`` from real decoder layers (else a GEMV and a tiny kernel), and
``allreduce_latency_s``, ``collective_host_overhead_s`` and ``collective_bandwidth`` from the all-reduces of
the largest group."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import yaml

from hpi.executor.probe.collectives import GRAPHED_CALLS, GRAPHED_MAX_BYTES, size_words
from hpi.executor.probe.figures import q
from hpi.executor.probe.kernels import fit_layer_cost

__all__ = ["HOST_BOUND_RATIO", "layer_figures", "eager_figures", "kernel_efficiency", "collective_efficiency"]

HOST_BOUND_RATIO = 1.25  # eager over graphed time (an all-reduce, a decoder layer) beyond which the host bound it


def layer_figures(layers: Mapping[str, Any], copy: float, gemv_bytes_s: float | None, date: str) -> dict[str, Any]:
    """hbm, layer_device_overhead_s and graphed_step_overhead_s from real decoder layers timed in graphed decode, and
    layer_overhead_s and step_overhead_s from the same layers timed eager (``eager_figures``) where that was timed."""
    shapes = layers["shapes"]
    fit = fit_layer_cost([(s["layer_bytes"], s["layer_s"]) for s in shapes], copy, gemv_bytes_s)
    lo = min(layers["counts"])
    # What a step costs beyond its layers and the LM head's read: the graph's launch, the host's sampling,
    # input copies and the synchronization after each forward (cost.overhead.step_overhead_time). An eager
    # step also launches the embedding, norm and head: step_overhead_s stays the prior's for that.
    step = float(np.median([s["step_s"][str(lo)] - lo * s["layer_s"] - s["head_bytes"] / fit.read_bytes_s
                            for s in shapes]))
    timed = "; ".join(f"{s['model']} {s['layer_s'] * 1e6:.0f} us for {s['layer_bytes'] / 1e6:,.0f} MB" for s in shapes)
    how = {"fit": "a line through", "ceiling": "the rate held at the copy ceiling (the line's was faster) over",
           "given": f"the {'GEMV' if gemv_bytes_s else 'copy'}'s read rate over"}[fit.how]
    where = (f"real decoder layers in graphed decode at batch 1 ({layers['counts'][0]} and {layers['counts'][1]} "
             f"layers, difference per layer): {timed}; {how} these, {date}")
    return {
        **eager_figures(shapes, lo, fit.read_bytes_s, date),
        "hbm": q(fit.read_bytes_s / copy, "probed", f"{fit.read_bytes_s / 1e12:.2f} TB/s against the device copy's "
                 f"{copy / 1e12:.2f} TB/s, from {where}"),
        "layer_device_overhead_s": q(fit.fixed_s, "probed", f"fixed device time per layer, from {where}"),
        "graphed_step_overhead_s": q(max(0.0, step), "probed", f"graphed step at {lo} layers less its layers and LM "
                                     f"head read (median over {len(shapes)} shape(s)), {date}"),
    }


def eager_figures(shapes: Sequence[Mapping[str, Any]], lo: int, read_bytes_s: float, date: str) -> dict[str, Any]:
    """layer_overhead_s and step_overhead_s from the same layers timed on the executor's eager decode path.

    An eager layer costs the larger of its host time (Python, dispatch, launches) and its device time
    (cost.overhead, cost.estimate). Where eager is clearly slower than graphed (``HOST_BOUND_RATIO``) the host
    bound it, and the eager time per layer is the host's: ``layer_overhead_s``, the median over such shapes. The
    eager step at ``lo`` layers less those layers and the LM head's read is ``step_overhead_s`` (the embedding,
    norm and head launches, sampling, the synchronization after each forward). Where no shape was host-bound
    the host time is only bounded by the device's, and nothing is written: the prior stays."""
    bound = [s for s in shapes if s.get("eager_layer_s") and s["eager_layer_s"] > HOST_BOUND_RATIO * s["layer_s"]]
    if not bound:
        return {}
    host_s = float(np.median([s["eager_layer_s"] for s in bound]))
    step = float(np.median([s["eager_step_s"][str(lo)] - lo * s["eager_layer_s"] - s["head_bytes"] / read_bytes_s
                            for s in bound]))
    timed = "; ".join(f"{s['model']} {s['eager_layer_s'] * 1e6:,.0f} us eager vs {s['layer_s'] * 1e6:,.0f} us graphed"
                      for s in bound)
    where = f"real decoder layers in eager decode at batch 1, per layer (host-bound: {timed}), {date}"
    return {"layer_overhead_s": q(host_s, "probed", f"host time per decoder layer, the median of {where}"),
            "step_overhead_s": q(max(0.0, step), "probed", f"eager step at {lo} layers less those layers' host time "
                                 f"and the LM head's read, from {where}")}


def kernel_efficiency(doc: Mapping[str, Any]) -> dict[str, Any]:
    """hbm, layer_device_overhead_s (and graphed_step_overhead_s) from real decoder layers timed in graphed decode,
    where the probe timed them; else hbm from a GEMV's read rate over the HBM copy ceiling and
    layer_device_overhead_s as KERNELS_PER_LAYER times a tiny kernel's time in a CUDA graph."""
    from hpi.planner.cost.dequant import KERNELS_PER_LAYER

    kernels, copy = doc.get("kernels") or {}, (doc.get("hbm") or {}).get("bytes_s")
    if kernels.get("layers") and copy:
        return layer_figures(kernels["layers"], copy, kernels.get("gemv_bytes_s"), doc["date"])
    out: dict[str, Any] = {}
    if kernels.get("gemv_bytes_s") and copy:
        rows, cols = kernels["gemv_shape"]
        ratio = kernels["gemv_bytes_s"] / copy
        out["hbm"] = q(min(1.0, ratio), "probed", f"bf16 GEMV [1, {cols}] x [{cols}, {rows}] reads "
                       f"{kernels['gemv_bytes_s'] / 1e12:.2f} TB/s against the device copy's {copy / 1e12:.2f} TB/s"
                       f"{' (clipped to 1)' if ratio > 1 else ''}, {doc['date']}")
    if kernels.get("tiny_kernel_s"):
        per_kernel = kernels["tiny_kernel_s"]
        out["layer_device_overhead_s"] = q(KERNELS_PER_LAYER * per_kernel, "probed",
                                           f"{KERNELS_PER_LAYER:.0f} kernels a decoder layer x {per_kernel * 1e6:.2f} "
                                           f"us, a tiny kernel's time in a CUDA graph of {kernels['tiny_kernels']}, "
                                           f"{doc['date']}")
    return out


def _latency(by_size: Mapping[int, float]) -> tuple[float, int]:
    """(seconds, size) of one collective's fixed cost: the least time over the latency-bound sizes (up to
    ``GRAPHED_MAX_BYTES``). Time cannot fall as a message grows, so a small size measured slower than a
    larger one was disturbed: the 4x H200 probe of 2026-11-22 timed 8 KB at 185 us and 1 MB at 37 us over
    4 GPUs, and its CUDA-graphed 70B TP 4 decode (4x H200 run 4) spent about 45-63 us per all-reduce."""
    small = ({size: t for size, t in by_size.items() if size <= GRAPHED_MAX_BYTES}
             or {min(by_size): by_size[min(by_size)]})
    size = min(small, key=small.get)
    return small[size], size


def _us_table(results: Mapping[str, Mapping[str, float]]) -> str:
    return "; ".join(f"{g} GPUs: " + ", ".join(f"{size_words(int(s))} {t * 1e6:,.0f} us"
                                               for s, t in sorted(r.items(), key=lambda kv: int(kv[0])))
                     for g, r in sorted(results.items(), key=lambda kv: int(kv[0])) if r)


def collective_efficiency(doc: Mapping[str, Any], profile: Mapping[str, Any]) -> dict[str, Any]:
    """allreduce_latency_s, collective_bandwidth and collective_host_overhead_s from the NCCL figures of the
    largest group.

    alpha is the GPU's time per latency-bound all-reduce: the CUDA-graphed figure where the probe has one
    (no host between calls), else the eager loop's. Where the eager loop is clearly slower than the graph
    (``HOST_BOUND_RATIO``), the host issued the calls no faster than the eager time per call, which becomes
    ``collective_host_overhead_s`` (the host side of the cost model's module rule, cost.collectives)."""
    nccl = doc.get("nccl") or {}
    results = nccl.get("seconds") or {}  # {"k": {"bytes": seconds}}
    if not results:
        return {}
    date = doc["date"]
    k = max(int(g) for g in results)
    by_size = {int(size): float(t) for size, t in results[str(k)].items()}
    graphed = {int(size): float(t) for size, t in ((nccl.get("graphed_seconds") or {}).get(str(k)) or {}).items()}
    largest = max(by_size)
    eager_s, eager_size = _latency(by_size)
    tables = f"eager: {_us_table(results)}"
    if graphed:
        tables += f"; CUDA-graphed: {_us_table(nccl['graphed_seconds'])}"
    out: dict[str, Any] = {}
    if graphed:
        alpha_s, alpha_size = _latency(graphed)
        out["allreduce_latency_s"] = q(alpha_s, "probed", f"NCCL all-reduce, {k} GPUs, bf16, {size_words(alpha_size)}, "
                                       f"{nccl.get('graphed_calls', GRAPHED_CALLS)} captured as one CUDA graph "
                                       f"(NCCL_NVLS_ENABLE=0), {date}; {tables}")
        if eager_s > HOST_BOUND_RATIO * alpha_s:
            out["collective_host_overhead_s"] = q(
                eager_s, "probed", f"eager NCCL all-reduce loop, {k} GPUs, {size_words(eager_size)}: one call every "
                f"{eager_s * 1e6:,.0f} us where the GPU needs {alpha_s * 1e6:,.0f} us (graphed): host-bound, {date}")
    else:
        out["allreduce_latency_s"] = q(eager_s, "probed", f"NCCL all-reduce, {k} GPUs, bf16, least time up to "
                                       f"{size_words(GRAPHED_MAX_BYTES)} ({size_words(eager_size)}; "
                                       f"NCCL_NVLS_ENABLE=0), {date}; {tables}")
    busbw = largest / by_size[largest] * 2 * (k - 1) / k
    link = _group_link_bytes_s(profile, k)
    if link and largest >= (16 << 20):
        ratio = min(1.0, busbw / link)
        out["collective_bandwidth"] = q(ratio, "probed", f"NCCL all-reduce {size_words(largest)}, {k} GPUs: bus "
                                        f"bandwidth {busbw / 1e9:.0f} GB/s over the profile's ring link of "
                                        f"{link / 1e9:.0f} GB/s per direction"
                                        f"{' (clipped to 1)' if busbw > link else ''}, {date}")
    return out


def _group_link_bytes_s(profile: Mapping[str, Any], k: int) -> float | None:
    """The ring link the cost model sees for the first k GPUs: compiled by the planner from this very profile."""
    from hpi.planner.profiles import load_profile
    from hpi.planner.topology import build_topology

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{profile['name']}.yaml"
        path.write_text(yaml.safe_dump(dict(profile), sort_keys=False))
        topology = build_topology(load_profile(str(path)))
        return topology.group_link(topology.gpus[:k]).bandwidth_bytes_s if len(topology.gpus) >= k else None
