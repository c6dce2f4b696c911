"""The one place that says how the cost terms overlap and add up.

Per module (a decoder layer, the embedding or the head), one forward on one rank (FlexGen's per-layer rule):

    busy    = compute + tp_allreduce + dequant          (the GPU's compute stream: all-reduces sit between
                                                          GEMMs, each 8/4-bit weight is dequantized before its
                                                          GEMM; compute = roofline + the kernels' fixed cost,
                                                          cost.overhead.layer_device_time, + prefill's
                                                          element-wise chains, cost.activations)
    host    = (overhead + tp collective issue)          (kernel launches incl. dequant's, Python, ZeRO-3
              * (1 + drift)                               hooks, c10d calls; drift: waiting for the slowest
                                                          TP rank at each collective, cost.collectives)
    fetch   = max(h2d, nvme) + dp_allgather             (the copy engines: host/NVMe -> GPU, then gather;
                                                          h2d + nvme with too few NVMe buffers to pipeline them,
                                                          cost.streaming.nvme_overlap)
              where h2d carries the weights and, in decode with KV offload, the layer's KV cache;
              with DeepSpeed's host fetch wait, or a     (the host waits for each fetch, so the copy engine
              routed layer leaf beyond the bucket:        idles while it runs the hooks and launches)
              fetch + host
    f       = prefetch_overlap                          (share of the shorter of busy and fetch hidden)
    device  = max(busy, fetch) + (1 - f) * min(busy, fetch)
    module  = max(device, host)

- Overlap does not depend on the prefetch bucket. With hpi's stream-ordered fetch the host issues every
  copy long before the GPU needs it; with DeepSpeed's host wait the copy of the next module still runs
  while the GPU computes this one (the host waits for copies, not for compute). Measured: the 33B (1x H100)
  and 70B (4x H200) prefill at bs 16 / 32 took the fetch time alone although compute was as long
  (1.19 s for 1.20 s of copies and 1.1 s of FLOPs; 2.55 s for 2.55 s of copies) with DeepSpeedExamples'
  buckets (2 h^2, smaller than one FFN matrix), and the 2x H200 8B offload step did not move with the
  bucket (5e7, 2 h^2, 4e8: 0.39-0.415 s, SUMMARY.md). What the bucket changes is memory (cost.memory), and
  where the queue runs deep, once per forward: DeepSpeed makes each module's compute wait for every copy queued
  before its hook, so with max live several layers ahead the compute trails the copies by that many layers and the
  pipeline's fill or drain exposes them (``cost.prefetch_lag``; the 8B's compute per layer is too short to show it).
  One exception: a routed-expert layer gathered as one ZeRO-3 leaf larger than the bucket, whose host reads the
  router's counts mid-layer before it can issue the next leaf's copy (``routing_waits_for_leaf``): its host time
  joins its fetch in series, as with DeepSpeed's host wait below.
- The fetch wait (``Workload.fetch_wait``): DeepSpeed's stock wait synchronizes the host with the copy
  stream at every fetch, so each copy and the host's work for the module run in series (1x H100, 8B,
  bs 1: 0.531 s per step with the host wait, 0.371 s stream-ordered, same knobs, same run). hpi's copy-ordered wait
  (``event``, ``streaming.copy_ordered``) bounds the host by each parameter's own copy instead of every copy queued,
  so the host's hooks and launches run beside the module's copies rather than between its leaves' copies:
  ``module = max(sum over leaves of device, host)`` (``host_beside_module``), and no queue lags (``cost.prefetch_lag``).
- Dequantization (``cost.dequant``) is busy time, whichever kernels do it: DeepSpeed's chain of torch element-wise
  ops and one fused kernel (hpi's, ``Workload.fused_dequant``, or DeepSpeed's fp16 4-bit one) both run on the compute
  stream between a module's copy and its GEMM, and ZeRO-3 queues the copies of the next modules on its own stream
  meanwhile (the host waits for copies, never for the compute stream), so a module's dequantization hides behind
  those copies where they are the longer, like its GEMMs, and only what is longer than them adds. They differ in
  bytes and rate only (cost.dequant: 17 bytes an element for DeepSpeed's 4-bit bf16 chain at ``dequant_hbm``,
  2.56 for hpi's kernel at ``fused_dequant_hbm``). Measured on one H200, Llama-3-70B shape 4-bit CPU offload
  (39.7 GB of copies a step, 0.72 s at the pinned ceiling; benchmarks/results/2026-12-04-h200-fused, SUMMARY.md):
  DeepSpeed's chain, which its ``dequant_bench`` times at 0.33 of the HBM rate (call2/dequant-bench.jsonl; 0.85 s
  for the 70B's weights), took 0.961-0.977 s a step in five of six runs (call2/records-70b.json,
  call4/records-70b-b32-*.json): the chain and the GEMMs, not the copies plus the chain (1.6 s); hpi's kernel
  (0.19 s) left the copies' time, 0.751-0.812 s. On the 1x H100 (benchmarks/results/2026-11-22-h100/SUMMARY.md) the
  8B's 8/4-bit steps (0.355-0.384 s) took what its 16-bit one does although copies and chain together take at most
  0.27 s at these rates: the host binds there (``module = max(device, host)``), not the chain; its measured host
  time is about twice the profile's (0.19 s), which no placement of the chain makes up. A MoE layer dequantizes
  only the experts its tokens chose, beside the copies of all of them (Mixtral-8x22B 4-bit on one H200,
  benchmarks/results/2026-12-03-h200-moe2: batch 1 predicted 1.64 s for 1.652 measured; batch 16 1.88 s for 2.397,
  a decode step slower than that run's own prefill, 2.216 s, which no device term here accounts for).
  In the breakdown it is dequantization, like the rest of busy time is compute and all-reduce.

A decode step replayed as a CUDA graph (``cost.overhead.graphed_forwards``) has no host time per module and
no drift: ``module = device``.

The host launches work asynchronously and runs ahead of the GPU until the next synchronization, so host
time and device time overlap: a module costs the larger of the two (eager decode of a GPU-resident model is
host-bound: 21.7 ms measured for an 8B step on an H200 whose HBM needs 4.7 ms; and a host-bound tiny
model under ZeRO-3 showed the hook overhead that the 8B model's 0.4 s of streaming hides; 2x H200
records, 2026-11-22). Stages sum their modules plus one ``step_overhead`` per forward on every stage (the
executor synchronizes after each stage forward, so it adds; a graphed forward's is ``graphed_step_overhead_s``);
a step composes the stages (``cost.pipeline.compose_step``). Exposed time is attributed to the component that
is on the critical path: busy time counts as compute, all-reduce and dequantization, the rest of the
device time as weight or KV fetch (split by their link times), or, for the host's share of a host-waited
fetch, overhead; host time beyond the device time as overhead; the TP drift's share of either as all-reduce
time. So each phase's breakdown sums to its step time exactly.

Totals (DeepSpeedExamples ZeRO-Inference definitions):
    prefill_s = ttft_s = prefill step;  total_s = prefill_s + (gen_len - 1) * decode_step_s
    throughput_tok_s = batch * gen_len / total_s
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpi.planner.cost.activations import activation_time
from hpi.planner.cost.collectives import dp_allgather_time, tp_collective_host_time, tp_collective_time, tp_drift
from hpi.planner.cost.compute import roofline_sides
from hpi.planner.cost.dequant import dequant_host_time, dequant_time
from hpi.planner.cost.inputs import Arrangement, Knobs
from hpi.planner.cost.memory import MemoryResult, memory
from hpi.planner.cost.overhead import (
    compiled_forwards,
    graphed_forwards,
    layer_device_time,
    module_overhead_time,
    skinny_forwards,
    step_overhead_time,
)
from hpi.planner.cost.phase import Phase, decode_phase, prefill_phase
from hpi.planner.cost.pipeline import compose_step, p2p_time
from hpi.planner.cost.prefetch_lag import lag_time
from hpi.planner.cost.streaming import (
    copy_ordered,
    fetched_elems_per_rank,
    fetches_weights,
    h2d_bandwidth,
    kv_transfer_bytes,
    kv_transfer_time,
    nvme_overlap,
    weight_stream_bytes,
    weight_stream_time,
)

EXPOSED_PARTS = (
    "compute_s", "dequant_s", "tp_allreduce_s", "weight_fetch_s", "kv_fetch_s", "pp_p2p_s", "overhead_s",
)  # fmt: skip
LINK_PARTS = (
    "compute_s", "flops_s", "hbm_s", "dequant_s", "tp_allreduce_s", "h2d_s", "nvme_s", "dp_allgather_s", "kv_h2d_s",
    "pp_p2p_s", "host_s",
)  # fmt: skip


@dataclass(frozen=True)
class PhaseResult:
    step_s: np.ndarray  # (N,)
    exposed: dict[str, np.ndarray]  # EXPOSED_PARTS, each (N,); they sum to step_s
    link: dict[str, np.ndarray]  # LINK_PARTS: busy time of each resource on the slowest stage's rank per step
    bubble_s: np.ndarray
    h2d_bytes: np.ndarray  # (N,) bytes the slowest stage's rank copies host->device per step
    h2d_bandwidth_bytes_s: np.ndarray  # (N,) the achieved rate the model assumed for those copies

    @property
    def bubble_ratio(self) -> np.ndarray:
        return np.divide(self.bubble_s, self.step_s, out=np.zeros_like(self.step_s), where=self.step_s > 0)


def leaf_elems(arrangement: Arrangement, knobs: Knobs) -> np.ndarray:
    """(N, kinds, J) elements each matrix-holding ZeRO-3 leaf module gathers per TP rank, at each plan's leaf
    granularity (``Arrangement.by_leaf``; 0-padded)."""
    return arrangement.by_leaf(knobs, lambda t: t.leaf_sharded / arrangement.tp + t.leaf_replicated)


def routing_waits_for_leaf(arrangement: Arrangement, knobs: Knobs) -> np.ndarray:
    """(N, kinds) whether a routed-expert layer gathered as one ZeRO-3 leaf (``Plan.zero3_leaf`` layer) waits for its
    whole copy before the next layer's copy can start: its leaf holds more elements than the prefetch bucket.

    The router's counts are read to the host once a layer (``hpi.executor.experts``), after the layer's attention,
    which waits for the leaf's copy. A bucket that holds the next leaf (DeepSpeed's prefetch counts whole
    parameters until the bucket is full) queues the next copy at the leaf's own fetch, before that read; a smaller
    one queues only the next leaf's first parameters, and the rest is issued at the next leaf's fetch, after the
    read and the launches of this layer's experts: copy and compute take turns. Measured, Mixtral-8x22B 4-bit from
    pinned memory, fused dequantization (benchmarks/results/2026-12-05-issue20-leaf-agreement, SUMMARY.md): at
    DeepSpeed's 5e7 bucket layer leaves took 1.674 / 1.899 s a step (batch 1 / 16, one H100) against 1.583 / 1.768 s
    with per-module leaves; at a 3e9 bucket (a 2.5 G-element layer ahead) 1.596 / 1.696 s (one H200, whose
    per-module steps at 5e7 took 1.714 / 2.246 s). Priced so, the H100's layer-leaf steps are predicted +1% / -11%
    (-8% / -19% without the wait).
    A dense layer has no such read: the 8B's 218 M-element layer leaves streamed at 0.91 of pinned at the 5e7 bucket
    (benchmarks/results/2026-12-05-h200-leaf)."""
    routed = arrangement.table.routed[None, :]
    leaf = leaf_elems(arrangement, knobs).sum(axis=2)  # a layer leaf is its module's one leaf
    bucket = knobs.zero3_weights(knobs.prefetch_bucket_elems)  # ds_numel, as weight elements (Knobs)
    return knobs.zero3_leaf_layer[:, None] & routed & (leaf > bucket[:, None])


def prefetch_overlap(arrangement: Arrangement, knobs: Knobs) -> np.ndarray:
    """(N, kinds) f in the module rule: share of the shorter of busy and fetch that overlaps the longer.

    The copy of the next module runs while this one computes whatever the prefetch bucket (see the module
    docstring), so f is the profile's ``prefetch_overlap`` for every plan and module kind, but 0 where too few
    NVMe swap buffers leave none free for the next read while a module computes (``nvme_overlap``)."""
    _, beside_compute = nvme_overlap(arrangement, knobs)
    return np.where(beside_compute[:, None], arrangement.hardware.efficiency.prefetch_overlap, 0.0) * np.ones((1, 4))


def host_waits_for_fetch(arrangement: Arrangement, knobs: Knobs) -> np.ndarray:
    """(N, kinds) whether the host synchronizes with each ZeRO-3 fetch of these modules: DeepSpeed's stock wait in
    every gathering plan, and a routed-expert layer leaf beyond the prefetch bucket (``routing_waits_for_leaf``)."""
    stock = fetches_weights(arrangement, knobs) & (arrangement.workload.fetch_wait == "host")
    return stock[:, None] | routing_waits_for_leaf(arrangement, knobs)


def leaf_shares(arrangement: Arrangement, knobs: Knobs) -> tuple[np.ndarray, np.ndarray]:
    """(weight shares, host shares), each (N, kinds, J): how a module's work splits over the leaf modules
    the rule is applied to one at a time.

    ZeRO-3 fetches leaf module by leaf module, and its fetch queue bounds how far the host runs ahead of
    the copies (with hpi's stream-ordered wait too, hpi.executor.zero3), so where a plan gathers weights the
    overlap rule holds per matrix-holding leaf module: its share of the copies, compute and dequantization
    goes by its weights, and the host's hooks and launches split evenly among the leaves. A small leaf
    then shows its hooks between the copies: the 1x H100 8B decode streamed at 0.84 of pinned while the
    33B, whose every leaf copies longer than its hooks take, streamed at 1.00 (SUMMARY.md). Without
    gathering the host runs ahead freely and the whole module is one leaf. With ``Plan.zero3_leaf`` layer a
    decoder layer is one leaf (``shape.leaf_module``): its copies, compute and host time are one span."""
    elems = leaf_elems(arrangement, knobs)
    total = elems.sum(axis=2, keepdims=True)
    weights = np.divide(elems, total, out=np.zeros_like(elems), where=total > 0)
    leaves = (elems > 0).sum(axis=2, keepdims=True)
    hosts = np.divide((elems > 0).astype(float), leaves, out=np.zeros_like(elems), where=leaves > 0)
    whole = np.zeros_like(elems)
    whole[:, :, 0] = 1.0
    per_leaf = fetches_weights(arrangement, knobs)[:, None, None]
    return np.where(per_leaf, weights, whole), np.where(per_leaf, hosts, whole)


def host_beside_module(device: np.ndarray, parts: np.ndarray, host_base: np.ndarray, drift: np.ndarray,
                       where: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(module time, parts), each (N, kinds[, C]): where the host's time is not paired with each leaf's copy, a module
    costs the larger of its leaves' device time (``device``, the rule applied per leaf without host) and its host
    time; the host's excess is overhead, its drift's share all-reduce, as in ``_module_rule``.

    Under the copy-ordered wait (``streaming.copy_ordered``) the host is bounded by the copies two parameters behind
    the one it waits for, while the prefetches queued beyond them keep the copy engine busy: its hooks and launches
    run beside the copies instead of between them. Measured, one H100, same run (benchmarks/results/
    2026-12-06-event-wait): the 8B 16-bit from pinned memory at DeepSpeed's default knobs 0.336 s a step stream-
    ordered (0.88 of pinned), 0.292 s copy-ordered (1.01). Not for a routed-expert layer (the caller's ``where``):
    its host waits for the router's counts mid-layer, so the host is in step with the compute there."""
    host = host_base * (1.0 + drift)
    module = np.where(where, np.maximum(device, host), device)
    exposed_host = module - device
    exposed_drift = np.minimum(exposed_host, host - host_base)
    parts = parts.copy()
    parts[..., EXPOSED_PARTS.index("tp_allreduce_s")] += exposed_drift
    parts[..., EXPOSED_PARTS.index("overhead_s")] += exposed_host - exposed_drift
    return module, parts


def _module_rule(busy, fetch_links, host_base, drift, t_kv, in_series, f):
    """The module rule (module docstring) on arrays of any shape: (module time, exposed parts with the
    EXPOSED_PARTS in the last axis, p2p left 0, compute, dequantization and all-reduce filled in by the caller)."""
    host = host_base * (1.0 + drift)
    host_in_fetch = np.where(in_series & (fetch_links > 0), host, 0.0)
    fetch = fetch_links + host_in_fetch
    device = np.maximum(busy, fetch) + (1.0 - f) * np.minimum(busy, fetch)
    module = np.maximum(device, host)
    exposed_fetch = device - busy
    exposed_host = module - device

    def share(part: np.ndarray, whole: np.ndarray) -> np.ndarray:
        part, whole = np.broadcast_arrays(part, whole)
        return np.divide(part, whole, out=np.zeros(whole.shape), where=whole > 0)

    # Of the exposed fetch: KV copies, the host's hooks and launches waited in series, the drift, weights.
    host_share = share(host_in_fetch, fetch)
    drift_share = host_share * share(drift, 1.0 + drift)  # of the host time waited in series
    host_share = host_share - drift_share
    kv_share = share(t_kv, fetch)
    weight_share = 1.0 - kv_share - host_share - drift_share
    # Host time beyond the device's: the drift first (it is what TP adds to the host's time), then overhead.
    exposed_drift = np.minimum(exposed_host, host - host_base)
    zeros = np.zeros_like(module)
    parts = np.stack(
        [zeros, zeros, exposed_fetch * drift_share + exposed_drift, exposed_fetch * weight_share,
         exposed_fetch * kv_share, zeros, exposed_host - exposed_drift + exposed_fetch * host_share], axis=-1
    )
    return module, parts


def phase_result(arrangement: Arrangement, knobs: Knobs, phase: Phase, bpw: np.ndarray) -> PhaseResult:
    t_flops, t_hbm = roofline_sides(arrangement, knobs, phase)
    compiled = compiled_forwards(arrangement, knobs, phase)
    skinny = skinny_forwards(arrangement, knobs, phase)
    # The kernels' fixed cost and prefill's element-wise chains run in series with the roofline.
    compute = (np.maximum(t_flops, t_hbm) + layer_device_time(arrangement, compiled, phase, skinny)
               + activation_time(arrangement, phase))
    tp_coll = tp_collective_time(arrangement, phase)
    t_dequant = dequant_time(arrangement, knobs, phase)  # on the compute stream like the GEMMs (module docstring)
    overhead = module_overhead_time(arrangement, knobs) + dequant_host_time(arrangement, knobs)

    stream_bytes = weight_stream_bytes(arrangement, knobs, phase, bpw)
    kv_bytes = kv_transfer_bytes(arrangement, knobs, phase)
    t_h2d_weights, t_nvme = weight_stream_time(arrangement, knobs, stream_bytes)
    t_kv = kv_transfer_time(arrangement, knobs, kv_bytes)
    t_h2d = t_h2d_weights + t_kv  # one link carries both
    fetched = fetched_elems_per_rank(arrangement, knobs, phase)
    t_gather = dp_allgather_time(arrangement, knobs, fetched * bpw)

    busy = compute + tp_coll + t_dequant
    graphed = graphed_forwards(arrangement, knobs, phase)[:, None]  # (N, 1): one launch per step, no host per module
    host_base = np.where(graphed, 0.0, overhead + tp_collective_host_time(arrangement)[None, :])
    drift = np.where(graphed, 0.0, tp_drift(arrangement)[None, :])  # (N, kinds)
    host = host_base * (1.0 + drift)
    pipelined, _ = nvme_overlap(arrangement, knobs)
    fetch_links = np.where(pipelined[:, None], np.maximum(t_h2d, t_nvme), t_h2d + t_nvme) + t_gather
    in_series = host_waits_for_fetch(arrangement, knobs)
    f = prefetch_overlap(arrangement, knobs)[:, :, None]
    # The rule per leaf module (leaf_shares), summed back to the module; parts (N, kinds, C). Under the
    # copy-ordered wait the host pairs with the whole module instead (host_beside_module).
    w, hw = leaf_shares(arrangement, knobs)
    # ... but not a routed-expert layer: its host reads the router's counts mid-layer (hpi.executor.experts), in step
    # with the compute, so its hooks still fall between its leaves' copies
    routed = arrangement.table.routed[None, :]
    per_module_host = copy_ordered(arrangement, knobs)[:, None] & ~in_series & ~routed

    def leaf(x: np.ndarray, shares: np.ndarray = w) -> np.ndarray:
        return x[:, :, None] * shares

    leaf_host = np.where(per_module_host[:, :, None], 0.0, leaf(host_base, hw))
    module, parts = _module_rule(leaf(busy), leaf(fetch_links), leaf_host, drift[:, :, None], leaf(t_kv),
                                 in_series[:, :, None], f)
    module, parts = host_beside_module(module.sum(axis=2), parts.sum(axis=2), host_base, drift, per_module_host)
    parts[..., EXPOSED_PARTS.index("compute_s")] = compute
    parts[..., EXPOSED_PARTS.index("tp_allreduce_s")] += tp_coll
    parts[..., EXPOSED_PARTS.index("dequant_s")] = t_dequant
    counts = arrangement.stage_counts
    stage_parts = np.einsum("nkc,pk->npc", parts, counts)
    # The layers' compute behind the copies queued ahead of it (cost.prefetch_lag): exposed once per forward.
    stage_parts[:, :, EXPOSED_PARTS.index("weight_fetch_s")] += lag_time(arrangement, knobs, fetched, fetch_links,
                                                                         busy, host)
    step_overhead = step_overhead_time(arrangement, graphed[:, 0])  # (N,)
    stage_parts[:, :, EXPOSED_PARTS.index("overhead_s")] += step_overhead[:, None]
    stage_s = stage_parts.sum(axis=-1)

    p2p = p2p_time(arrangement, phase)
    comp = compose_step(stage_s, p2p, knobs.micro_batches, phase)
    rows = np.arange(knobs.n)
    slowest_parts = stage_parts[rows, comp.slowest_stage]
    total_parts = (comp.stage_sum_weight[:, None] * stage_parts.sum(axis=1)
                   + comp.slowest_stage_weight[:, None] * slowest_parts)
    total_parts[:, EXPOSED_PARTS.index("pp_p2p_s")] += comp.p2p_exposed_s
    exposed = {name: total_parts[:, i] for i, name in enumerate(EXPOSED_PARTS)}

    slowest_counts = counts[comp.slowest_stage]  # (N, kinds)
    pp = arrangement.pp
    per_step = knobs.micro_batches  # the slowest stage runs every micro-batch once per step

    def on_slowest(per_module: np.ndarray) -> np.ndarray:
        return (per_module * slowest_counts).sum(axis=1) * per_step

    link = {
        "compute_s": on_slowest(compute),
        "flops_s": on_slowest(t_flops),
        "hbm_s": on_slowest(t_hbm),
        "dequant_s": on_slowest(t_dequant),
        "tp_allreduce_s": on_slowest(tp_coll),
        "h2d_s": on_slowest(t_h2d),
        "nvme_s": on_slowest(t_nvme),
        "dp_allgather_s": on_slowest(t_gather),
        "kv_h2d_s": on_slowest(t_kv),
        "pp_p2p_s": p2p * knobs.micro_batches * (pp - 1 + (0 if phase.is_prefill else 1)) * (pp > 1),
        "host_s": on_slowest(host) + step_overhead * per_step,
    }
    return PhaseResult(
        step_s=comp.step_s,
        exposed=exposed,
        link=link,
        bubble_s=comp.bubble_s,
        h2d_bytes=on_slowest(stream_bytes + kv_bytes),
        h2d_bandwidth_bytes_s=h2d_bandwidth(arrangement, knobs),
    )


@dataclass(frozen=True)
class Evaluation:
    """Every figure of N plans sharing one arrangement, as arrays."""

    arrangement: Arrangement
    knobs: Knobs
    prefill: PhaseResult
    decode: PhaseResult
    memory: MemoryResult

    @property
    def prefill_s(self) -> np.ndarray:
        return self.prefill.step_s

    @property
    def ttft_s(self) -> np.ndarray:
        return self.prefill.step_s

    @property
    def decode_step_s(self) -> np.ndarray:
        return self.decode.step_s

    @property
    def total_s(self) -> np.ndarray:
        return self.prefill_s + (self.arrangement.workload.gen_len_tokens - 1) * self.decode_step_s

    @property
    def throughput_tok_s(self) -> np.ndarray:
        return self.knobs.batch_size * self.arrangement.workload.gen_len_tokens / self.total_s


def evaluate(arrangement: Arrangement, knobs: Knobs) -> Evaluation:
    bpw = knobs.bytes_per_weight(arrangement.table.fetch_matrix_fraction)  # what is gathered, not what is stored
    return Evaluation(
        arrangement=arrangement,
        knobs=knobs,
        prefill=phase_result(arrangement, knobs, prefill_phase(arrangement, knobs), bpw),
        decode=phase_result(arrangement, knobs, decode_phase(arrangement, knobs), bpw),
        memory=memory(arrangement, knobs),
    )
