"""Weight streaming: what ZeRO-3 moves from CPU RAM or NVMe to the GPU for one forward of a module.

- ZeRO-3 gathers a module's parameters before its forward and frees them after, except tensors smaller
  than ``stage3_param_persistence_threshold``, which stay on every GPU. A layer's experts are one fused
  module (``cost.shape.EXPERTS_GATHERED_WHOLE``): all are gathered, not only those the router picks.
- With offload, each rank of a dp (ZeRO partition) group holds 1/dp of each TP shard in host memory or on
  NVMe: it copies its 1/dp over its own PCIe link, then the group all-gathers (``cost.collectives``).
  Without offload but with dp > 1 only the all-gather remains.
- Host->device bandwidth is the placement's per-GPU share while the ranks that work at once stream (the
  topology graph splits shared switches and uplinks), pinned or pageable, times DeepSpeed's achieved
  fraction. A pipeline with m micro-batches has min(m, pp) stages working at once (one at m = 1: the
  stages take turns), so fewer GPUs share the host links: on the 4x H200 (one host uplink, 42 GB/s per
  GPU with all four copying, 55 alone) tp 2 x pp 2 with one micro-batch streamed 50 GB/s per GPU, pp 4
  with four micro-batches 43.5.
- NVMe reads run at the rate the plan's aio block size, queue depth and threads reach on the drive (``cost.aio``,
  from the probe's read grid).
- NVMe goes NVMe -> pinned staging buffers -> GPU; with enough buffers DeepSpeed pipelines the two, so the
  slower of the two hops sets the pace. Each swapped partition of a module holds its own buffer from its read
  until the module is released after its forward, so with p partitions per module (``shape.swaps_per_module``)
  reads, copies and compute of consecutive modules all overlap from 3p buffers; below that the next read waits
  for the copy (the hops add up), and below 2p it also waits for the compute (``nvme_overlap``).
- A KV cache offloaded to the CPU (transformers' OffloadedCache) is copied in layer by layer each decode
  step over the same host->device link.
"""

from __future__ import annotations

import numpy as np

from hpi.planner.cost.aio import aio_read_efficiency, aio_read_factor
from hpi.planner.cost.compute import touched_elems_per_rank
from hpi.planner.cost.inputs import COMPUTE_BYTES, Arrangement, Knobs
from hpi.planner.cost.phase import Phase
from hpi.planner.cost.shape import EXPERTS_GATHERED_WHOLE, swaps_per_module
from hpi.planner.specs.plan import gathers_weights, orders_copies


def fetches_weights(arrangement: Arrangement, knobs: Knobs) -> np.ndarray:
    """(N,) whether ZeRO-3 gathers parameters per forward (``Plan.gathers``: offloaded, or partitioned over
    dp > 1)."""
    return gathers_weights(knobs.offloaded, arrangement.dp)


def copy_ordered(arrangement: Arrangement, knobs: Knobs) -> np.ndarray:
    """(N,) whether each gathered parameter's reads wait for its own copy only (``Workload.fetch_wait`` event,
    ``hpi.executor.zero3.copy_ordered_fetch``): a plan that gathers where the executor installs that wait
    (``specs.plan.orders_copies``: dp 1, not NVMe); elsewhere it keeps the stream wait."""
    event = arrangement.workload.fetch_wait == "event"
    return fetches_weights(arrangement, knobs) & orders_copies(knobs.offload_nvme, arrangement.dp) & event


def persistent_parts(arrangement: Arrangement, knobs: Knobs) -> tuple[np.ndarray, np.ndarray]:
    """(matrix elements, other elements), each (N, kinds), of the tensors at most the persistence threshold (kept whole
    on every GPU). DeepSpeed compares ``ds_numel``: a quantized matrix's is its weight elements times
    ``Knobs.ds_numel_per_matrix_weight``; it persists as stored (packed, with its scales)."""
    t, threshold = arrangement.table, knobs.persistence_threshold_elems
    out = []
    limits = ((t.matrix_tensor_sizes, knobs.zero3_weights(threshold)), (t.vector_tensor_sizes, threshold))
    for sizes_of, limit in limits:
        part = np.zeros((knobs.n, 4))
        for kind, sizes in enumerate(sizes_of):
            if len(sizes):
                cumulative = np.concatenate([[0.0], np.cumsum(sizes)])
                # DeepSpeed keeps ds_numel <= threshold (mark_persistent_parameters): inclusive.
                part[:, kind] = cumulative[np.searchsorted(sizes, limit, side="right")]
        out.append(part)
    return out[0], out[1]


def persistent_elems(arrangement: Arrangement, knobs: Knobs) -> np.ndarray:
    """(N, kinds) elements of tensors at most the persistence threshold (``persistent_parts``)."""
    matrices, others = persistent_parts(arrangement, knobs)
    return matrices + others


def fetched_elems_per_rank(arrangement: Arrangement, knobs: Knobs, phase: Phase) -> np.ndarray:
    """(N, kinds) elements gathered for one forward, per TP rank, before dividing by dp."""
    t = arrangement.table
    if EXPERTS_GATHERED_WHOLE:  # the fused experts module is gathered whole, routed-to or not
        tp = arrangement.tp
        touched = np.broadcast_to(t.sharded / tp + t.replicated + t.n_experts * t.expert_sharded / tp, (knobs.n, 4))
    else:
        touched = touched_elems_per_rank(arrangement, phase.tokens)
    persistent = persistent_elems(arrangement, knobs)
    fetched = np.maximum(touched - persistent, 0.0)
    return np.where(fetches_weights(arrangement, knobs)[:, None], fetched, 0.0)


def concurrent_stages(arrangement: Arrangement, knobs: Knobs) -> np.ndarray:
    """(N,) pipeline stages that stream at once: min(micro-batches, pp)."""
    return np.minimum(knobs.micro_batches, arrangement.pp).astype(int)


def link_rate(arrangement: Arrangement, knobs: Knobs, name: str) -> np.ndarray:
    """(N,) the placement's per-GPU ``name`` rate (h2d_pinned, h2d_pageable, nvme_read) for each plan's
    number of stages streaming at once."""
    return np.asarray(arrangement.placement.rates_with_stages(name))[concurrent_stages(arrangement, knobs) - 1]


def h2d_bandwidth(arrangement: Arrangement, knobs: Knobs, pinned: np.ndarray | None = None) -> np.ndarray:
    """(N,) achieved host->device bytes/s per GPU; weights from NVMe come through pinned staging buffers."""
    eff = arrangement.hardware.efficiency
    if pinned is None:
        pinned = knobs.pin_memory | knobs.offload_nvme
    return np.where(pinned, link_rate(arrangement, knobs, "h2d_pinned") * eff.h2d_stream_pinned,
                    link_rate(arrangement, knobs, "h2d_pageable") * eff.h2d_stream_pageable)


def weight_stream_bytes(arrangement: Arrangement, knobs: Knobs, phase: Phase,
                        bytes_per_weight: np.ndarray) -> np.ndarray:
    """(N, kinds) bytes one rank copies from host memory or NVMe for one forward of one module."""
    fetched = fetched_elems_per_rank(arrangement, knobs, phase) / arrangement.dp
    return np.where(knobs.offloaded[:, None], fetched * bytes_per_weight, 0.0)


def weight_stream_time(arrangement: Arrangement, knobs: Knobs,
                       stream_bytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(PCIe seconds, NVMe seconds), each (N, kinds); the streaming time is their max."""
    t_h2d = stream_bytes / h2d_bandwidth(arrangement, knobs)[:, None]
    # The topology shares the drive's sequential rate among the ranks reading at once; the plan's aio settings
    # scale it by what the probe's read grid says they reach (1 without a grid) and by the share of that DeepSpeed
    # reaches (cost.aio).
    nvme_bw = (link_rate(arrangement, knobs, "nvme_read")[:, None] * aio_read_factor(arrangement, knobs)
               * aio_read_efficiency(arrangement, knobs)[:, None])
    t_nvme = np.where(knobs.offload_nvme[:, None], stream_bytes / np.maximum(nvme_bw, 1e-9), 0.0)
    return t_h2d, t_nvme


# NVMe swap buffers per partition a module swaps in (``nvme_overlap``): the read of the module after next, the
# copy of the next one and the compute of this one each hold one; without the first the hops add up, without the
# first two the reads wait for compute too.
NVME_BUFFERS_PIPELINED = 3
NVME_BUFFERS_OVERLAP_COMPUTE = 2


def nvme_overlap(arrangement: Arrangement, knobs: Knobs) -> tuple[np.ndarray, np.ndarray]:
    """((N,) NVMe reads overlap the host->device copies, (N,) they overlap compute), by the swap buffer count
    against the partitions one module swaps in (module docstring); True for plans that do not offload to NVMe."""
    a = arrangement
    per_module = swaps_per_module(a.model, a.tp, a.dp)
    nvme, count = knobs.offload_nvme, knobs.nvme_buffer_count
    pipelined = count >= NVME_BUFFERS_PIPELINED * per_module
    return ~nvme | pipelined, ~nvme | (count >= NVME_BUFFERS_OVERLAP_COMPUTE * per_module)


def kv_transfer_bytes(arrangement: Arrangement, knobs: Knobs, phase: Phase) -> np.ndarray:
    """(N, kinds) KV-cache bytes copied host->device for one forward (decode with KV offload only)."""
    if phase.is_prefill:
        return np.zeros((knobs.n, 4))  # prefill writes the cache device->host: the other direction
    t = arrangement.table
    per_layer = phase.sequences * phase.kv_read_tokens * t.kv_elems_per_token / arrangement.kv_split * COMPUTE_BYTES
    return np.where(knobs.kv_offload[:, None], t.is_layer * per_layer[:, None], 0.0)


def kv_transfer_time(arrangement: Arrangement, knobs: Knobs, kv_bytes: np.ndarray) -> np.ndarray:
    """The offloaded KV cache lives in pinned memory only when pin_memory is set (as memory counts it)."""
    return kv_bytes / h2d_bandwidth(arrangement, knobs, pinned=knobs.pin_memory)[:, None]
