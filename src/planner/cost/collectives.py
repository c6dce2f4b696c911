"""Collective communication on the placement's links: alpha-beta (Hockney) cost of NCCL rings.

Ring all-reduce over p ranks moves 2(p-1)/p of the message over the slowest link and takes 2(p-1) hops:
    t_allreduce(n bytes) = alpha + 2(p-1) * link_latency + 2(p-1)/p * n / (link_bw * eff_collective)
All-gather is half of that (one pass of the ring): (p-1) hops and (p-1)/p * n bytes.
(Thakur, Rabenseifner & Gropp 2005; NCCL's bus-bandwidth convention.)

- Tensor parallel: two all-reduces of the hidden states per decoder layer (after attention and after the
  FFN, Megatron-LM's column/row split), one all-gather of the vocabulary-sharded logits at the head.
- ZeRO-3 partition (dp > 1): one all-gather of each fetched module's parameters over the dp group.
Decode-sized messages are latency-bound (design.md: 37 us for 8 KB over NVLink), which alpha captures.

Issuing a collective also costs host time (torch.distributed's dispatch, NCCL's enqueue, a rank waiting
for its peers to arrive): ``collective_host_overhead_s`` per call, on the host side of the module rule
(``cost.estimate``). Host-bound decode pays it in full: on the 2x H200 records TP 2 doubled a resident
8B decode step although its all-reduces take microseconds on the GPU (SUMMARY.md, 2026-11-22).
"""

from __future__ import annotations

import numpy as np

from planner.cost.inputs import COMPUTE_BYTES, Knobs, Layout
from planner.cost.phase import Phase
from planner.cost.shape import HEAD
from planner.specs.placement import Link


def allreduce_time(n_bytes: np.ndarray, ranks: int, link: Link, alpha_s: float, bw_eff: float) -> np.ndarray:
    if ranks <= 1:
        return np.zeros_like(n_bytes)
    hops = 2 * (ranks - 1)
    return alpha_s + hops * link.latency_s + (hops / ranks) * n_bytes / (link.bandwidth_bytes_s * bw_eff)


def allgather_time(n_bytes: np.ndarray, ranks: int, link: Link, alpha_s: float, bw_eff: float) -> np.ndarray:
    if ranks <= 1:
        return np.zeros_like(n_bytes)
    hops = ranks - 1
    return alpha_s + hops * link.latency_s + (hops / ranks) * n_bytes / (link.bandwidth_bytes_s * bw_eff)


def tp_collective_time(layout: Layout, phase: Phase) -> np.ndarray:
    """(N, kinds) seconds of TP collectives in one forward of one module."""
    eff = layout.hardware.efficiency
    link = layout.placement.tp_link
    hidden_bytes = phase.tokens * layout.table.hidden_size * COMPUTE_BYTES
    per_layer = 2.0 * allreduce_time(hidden_bytes, layout.tp, link, eff.allreduce_latency_s, eff.collective_bandwidth)
    out = layout.table.is_layer * per_layer[:, None]
    logits_bytes = phase.sequences * layout.table.vocab_size * COMPUTE_BYTES
    out[:, HEAD] = allgather_time(logits_bytes, layout.tp, link, eff.allreduce_latency_s, eff.collective_bandwidth)
    return out


def tp_collective_calls(layout: Layout) -> np.ndarray:
    """(kinds,) TP collectives one forward of one module issues: two per layer, one at the head."""
    if layout.tp <= 1:
        return np.zeros(len(layout.table.is_layer))
    calls = 2.0 * layout.table.is_layer
    calls[HEAD] = 1.0
    return calls


def tp_collective_host_time(layout: Layout) -> np.ndarray:
    """(kinds,) host seconds to issue one module's TP collectives."""
    return tp_collective_calls(layout) * layout.hardware.efficiency.collective_host_overhead_s


def dp_allgather_time(layout: Layout, knobs: Knobs, fetched_bytes: np.ndarray) -> np.ndarray:
    """(N, kinds) seconds to all-gather one module's ZeRO-3 partitions over the dp group.

    ``fetched_bytes`` are the whole TP shard's bytes (before the 1/dp split) of what the forward gathers.
    """
    if layout.dp <= 1:
        return np.zeros_like(fetched_bytes)
    eff = layout.hardware.efficiency
    t = allgather_time(fetched_bytes, layout.dp, layout.placement.dp_link, eff.allreduce_latency_s, eff.collective_bandwidth)
    return np.where(fetched_bytes > 0, t, 0.0)
