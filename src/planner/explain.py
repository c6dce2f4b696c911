"""Why a plan costs what it costs: what binds it, what each knob would change, and how to fix it.

The binding resource is the largest exposed term of the decode step (and of prefill), named by the
resource behind it: PCIe or NVMe for weight fetch (whichever link is slower), HBM or compute for the
roofline side that wins, the all-reduce, the pipeline send, the bubble, or framework overhead. Knob
effects are not guessed: each variant plan is predicted with the same cost model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from hpi.planner.cost.inputs import Knobs
from hpi.planner.cost.shape import module_table
from hpi.planner.feasibility import plan_problems
from hpi.planner.predict import Estimate, predict_many
from hpi.planner.search import (
    AIO_BLOCK_SIZES,
    AIO_QUEUE_DEPTHS,
    AIO_THREADS,
    MIB,
    nvme_buffer_counts_for,
    nvme_buffer_elems_for,
)
from hpi.planner.specs.model import ModelSpec
from hpi.planner.specs.plan import OFFLOAD_KINDS, WEIGHT_BITS, Plan, decode_graph_blocker


@dataclass(frozen=True)
class Binding:
    phase: str  # "decode" or "prefill"
    resource: str  # PCIe, NVMe, HBM, compute, dequantization, TP all-reduce, dp all-gather, PP send/recv, bubble,
    #                overhead
    seconds: float
    share: float  # of the phase's step time
    detail: str


def _resource(term: str, link: dict[str, float], fused_dequant: bool = False) -> tuple[str, str]:
    if term == "compute_s":
        if link["hbm_s"] >= link["flops_s"]:
            return "HBM", "decode reads every weight and the KV cache once per token: memory-bound"
        return "compute", "enough tokens per forward that the GEMMs are FLOP-bound"
    if term == "weight_fetch_s":
        if link["nvme_s"] > link["h2d_s"]:
            return "NVMe", "weights are read from NVMe every forward; the drive is the slowest hop"
        if link["dp_allgather_s"] > link["h2d_s"]:
            return "dp all-gather", "ZeRO-3 gathers partitions across the dp group every forward"
        return "PCIe", "weights cross host->device every forward and the copy is not hidden behind compute"
    names = {
        "dequant_s": ("dequantization",
                      "8/4-bit weights are dequantized to 16 bits on every use, by one fused kernel on the compute "
                      "stream" if fused_dequant else
                      "8/4-bit weights are dequantized to 16 bits on every use, by a chain of torch ops on the "
                      "compute stream"),
        "kv_fetch_s": ("PCIe (KV cache)", "the offloaded KV cache is copied in every decode step"),
        "tp_allreduce_s": ("TP all-reduce", "two all-reduces per layer; small messages are latency-bound"),
        "pp_p2p_s": ("PP send/recv", "hidden states cross stage boundaries"),
        "overhead_s": ("overhead", "kernel launches, ZeRO-3 hooks and the generate loop"),
    }
    return names[term]


def bindings(est: Estimate) -> list[Binding]:
    out = []
    for phase, exposed, link, step, bubble in (
        ("decode", est.decode_exposed, est.decode_link, est.decode_step_s, est.decode_bubble_s),
        ("prefill", est.prefill_exposed, est.prefill_link, est.prefill_s, est.prefill_bubble_s),
    ):
        term = max(exposed, key=exposed.get)
        resource, detail = _resource(term, link, est.workload.fused_dequant)
        out.append(Binding(phase, resource, exposed[term], exposed[term] / step, detail))
        if step > 0 and bubble / step > 0.2:
            out.append(Binding(phase, "bubble", bubble, bubble / step, "pipeline stages idle; add micro-batches"))
    return out


def memory_headroom(est: Estimate) -> list[tuple[str, float, float]]:
    """(what, used bytes, capacity bytes) for each memory the plan uses, tightest first."""
    hw = est.hardware
    rows = [
        ("GPU memory", est.gpu_peak_bytes, hw.usable_gpu_bytes),
        ("CPU memory", est.cpu_bytes, hw.usable_dram_bytes),
    ]
    if est.pinned_bytes:
        rows.append(("pinned memory", est.pinned_bytes, hw.host.pinnable_bytes))
    if est.nvme_bytes and hw.nvme:
        rows.append(("NVMe", est.nvme_bytes, hw.nvme.capacity_bytes))
    return sorted(rows, key=lambda r: -r[1] / max(r[2], 1.0))


def knob_variants(plan: Plan, model: ModelSpec) -> list[tuple[str, Plan]]:
    """One-knob changes of ``plan`` worth predicting (each a valid Plan)."""
    v: list[tuple[str, dict]] = []
    for b in (plan.batch_size * 2, plan.batch_size // 2):
        v.append((f"batch {b}", {"batch_size": b}))
    v += [(f"{bits}-bit weights", {"weight_bits": bits}) for bits in WEIGHT_BITS if bits != plan.weight_bits]
    for offload in OFFLOAD_KINDS:
        if offload == plan.offload:
            continue
        change: dict = {"offload": offload}
        if offload == "nvme":  # DeepSpeed refuses a buffer smaller than the largest tensor partition
            change["nvme_buffer_elems"] = max(plan.nvme_buffer_elems, nvme_buffer_elems_for(model, plan.tp, plan.dp))
        v.append((f"offload {offload}", change))
    v.append(("pinned memory off" if plan.pin_memory else "pinned memory on", {"pin_memory": not plan.pin_memory}))
    v.append(("KV offload off" if plan.kv_offload else "KV offload on", {"kv_offload": not plan.kv_offload}))
    for tp in (plan.tp * 2, plan.tp // 2):
        v.append((f"tp {tp}", {"tp": tp, "batch_size": max(plan.batch_size, plan.dp)}))
    for pp in (plan.pp * 2, plan.pp // 2):
        v.append((f"pp {pp}", {"pp": pp, "micro_batches": 1}))
    if plan.pp > 1:
        v.append((f"{plan.micro_batches * 2} micro-batches", {"micro_batches": plan.micro_batches * 2}))
    if plan.gathers:
        for bucket in (plan.prefetch_bucket_elems * 4, plan.prefetch_bucket_elems // 4, 0):
            v.append((f"prefetch bucket {bucket:,}", {"prefetch_bucket_elems": bucket}))
        # With NVMe offload the swap buffers, not max live, bound what is in flight (cost.memory.live_param_elems).
        for live in (plan.max_live_elems * 4, plan.max_live_elems // 4) if not plan.offloads_to_nvme else ():
            v.append((f"max live {live:,}", {"max_live_elems": live}))
        for threshold in persistence_steps(plan, model):
            v.append((f"persistence threshold {threshold:,}", {"persistence_threshold_elems": threshold}))
        other = "module" if plan.zero3_leaf == "layer" else "layer"
        if not (other == "layer" and plan.offloads_to_nvme):  # Plan.problems: layer leaves swap with too few buffers
            v.append((f"ZeRO-3 leaves per {other}", {"zero3_leaf": other}))
    if plan.offloads_to_nvme:
        counts = set(nvme_buffer_counts_for(model, plan.tp, plan.dp)) | {plan.nvme_buffer_count * 2}
        for count in sorted(counts - {plan.nvme_buffer_count}):
            v.append((f"{count} NVMe buffers", {"nvme_buffer_count": count}))
        bigger = plan.nvme_buffer_elems * 2
        v.append((f"NVMe buffer {bigger:,} elements", {"nvme_buffer_elems": bigger}))
        for block in sorted(set(AIO_BLOCK_SIZES) - {plan.aio_block_size_bytes}):
            v.append((f"aio block {block // MIB} MiB", {"aio_block_size_bytes": block}))
        for depth in sorted(set(AIO_QUEUE_DEPTHS) - {plan.aio_queue_depth}):
            v.append((f"aio queue depth {depth}", {"aio_queue_depth": depth}))
        for threads in sorted(set(AIO_THREADS) - {plan.aio_threads}):
            v.append((f"{threads} aio thread{'s' if threads > 1 else ''}", {"aio_threads": threads}))
    out = []
    for label, change in v:
        try:
            out.append((label, plan.with_(**change)))
        except ValueError:
            continue  # e.g. batch 0, a batch that the micro-batches no longer divide
    return out


def persistence_steps(plan: Plan, model: ModelSpec) -> list[int]:
    """Persistence thresholds one step either side of the plan's: the next tensor size above it (the smallest
    tensors still gathered become persistent) and 0 (nothing persists); thresholds in between change nothing.
    Sizes are DeepSpeed's ``ds_numel``, which the threshold is compared with: a matrix at 8/4 bits counts its
    stored elements (``Knobs.ds_numel_per_matrix_weight``), so the step names exactly the next tensor to persist."""
    table = module_table(model)
    per_weight = float(Knobs.from_plans([plan]).ds_numel_per_matrix_weight[0])
    stored = [np.ceil(np.asarray(n, dtype=float) * per_weight) for n in table.matrix_tensor_sizes]
    stored += [np.asarray(n, dtype=float) for n in table.vector_tensor_sizes]
    sizes = sorted({int(n) for kind in stored for n in kind})
    above = [n for n in sizes if n > plan.persistence_threshold_elems]
    return ([above[0]] if above else []) + ([0] if plan.persistence_threshold_elems > 0 else [])


@dataclass(frozen=True)
class KnobEffect:
    label: str
    estimate: Estimate
    decode_ratio: float  # variant decode step / current
    throughput_ratio: float
    gpu_delta_bytes: float


def knob_effects(est: Estimate) -> list[KnobEffect]:
    variants = [
        (label, p)
        for label, p in knob_variants(est.plan, est.model)
        if p.world_size >= 1 and not plan_problems(est.model, est.hardware, p)
    ]
    if not variants:
        return []
    labelled = list(zip([label for label, _ in variants],
                        predict_many(est.model, est.hardware, est.workload, [p for _, p in variants])))
    graphs = graphs_variant(est)
    if graphs is not None:
        labelled.append(graphs)
    return [
        KnobEffect(
            label=label,
            estimate=e,
            decode_ratio=e.decode_step_s / est.decode_step_s,
            throughput_ratio=e.throughput_tok_s / est.throughput_tok_s,
            gpu_delta_bytes=e.gpu_peak_bytes - est.gpu_peak_bytes,
        )
        for label, e in labelled
    ]


def graphs_variant(est: Estimate) -> tuple[str, Estimate] | None:
    """The same plan with its decode steps replayed as CUDA graphs (a run condition, ``--cuda-graphs``),
    where the plan allows it and the workload does not already ask for it."""
    if est.workload.decode_graphs or decode_graph_blocker(est.plan, est.model):
        return None
    workload = replace(est.workload, decode_graphs=True)
    return "CUDA graphs (--cuda-graphs)", predict_many(est.model, est.hardware, workload, [est.plan])[0]


def fixes(effects: list[KnobEffect], k: int = 3) -> list[KnobEffect]:
    """For an infeasible plan: the one-knob changes that make it feasible, fastest decode first."""
    ok = [e for e in effects if e.estimate.feasible]
    return sorted(ok, key=lambda e: e.estimate.decode_step_s)[:k]
