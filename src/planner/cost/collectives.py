"""Collective communication on the placement's links: alpha-beta (Hockney) cost of NCCL rings.

Ring all-reduce over p ranks moves 2(p-1)/p of the message over the slowest link and takes 2(p-1) hops:
    t_allreduce(n bytes) = alpha + 2(p-1) * link_latency + 2(p-1)/p * n / (link_bw * eff_collective)
All-gather is half of that (one pass of the ring): (p-1) hops and (p-1)/p * n bytes.
(Thakur, Rabenseifner & Gropp 2005; NCCL's bus-bandwidth convention.)

- Tensor parallel: two all-reduces of the hidden states per decoder layer (after attention and after the
  FFN, Megatron-LM's column/row split), one all-gather of the vocabulary-sharded logits at the head.
- ZeRO-3 partition (dp > 1): one all-gather of each fetched module's parameters over the dp group.
Decode-sized messages are latency-bound (docs/measured-facts.md: 37 us for 8 KB over NVLink), which alpha captures.

Issuing a collective also costs host time (torch.distributed's dispatch, NCCL's enqueue):
``collective_host_overhead_s`` per call, on the host side of the module rule (``cost.estimate``).

Host-bound TP decode pays a second, larger cost: the ranks' Python launch streams drift apart, and each
all-reduce makes every rank wait for the slowest one to arrive. On the 4x H200 (70B, resident, bs 1,
2026-11-22) TP 2 / TP 4 took 130 / 136 ms per step against 53 ms on one GPU and 57 ms for PP 2, and the
compute streams spent 72-105 ms of each step inside 160 all-reduces, ~0.45 ms each, where an 8 KB NCCL
all-reduce back to back takes 35 us (2 GPUs) / 185 us (4 GPUs); on the 2x H200 TP 2 doubled the 8B step
(43.4 vs 21.7 ms), and with DeepSpeed's host fetch wait (the copies on the host's critical path too) TP 2
made an 8B offload step slower than one GPU's (0.465 vs 0.415 s). Model: a rank's time between two
collectives varies in proportion to the host work in it (Python and launches; the DMA copies a host fetch
wait also puts there are steady), so the wait for the slowest rank is a share of that host time:
``collective_drift_factor`` at tp 2, growing with the group as the expected maximum of tp independent
drifts, E[max of tp N(0,1)] / E[max of 2 N(0,1)] (1, 1.5, 1.8, 2.5 for tp 2, 3, 4, 8). Summed over a
module's collectives, the module's host time grows by that factor (``tp_drift``); ``cost.estimate``
applies it where the host is on the critical path and reports it as all-reduce time. The prior 1 says the
drift is as large as the host work between two collectives (2x H200, resident 8B: 0.33 ms lost per
all-reduce against ~0.3 ms of launches between).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from hpi.planner.cost.inputs import COMPUTE_BYTES, Arrangement, Knobs
from hpi.planner.cost.phase import Phase
from hpi.planner.cost.shape import HEAD
from hpi.planner.specs.placement import Link


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


def tp_collective_time(arrangement: Arrangement, phase: Phase) -> np.ndarray:
    """(N, kinds) seconds of TP collectives in one forward of one module."""
    eff = arrangement.hardware.efficiency
    link = arrangement.placement.tp_link
    hidden_bytes = phase.tokens * arrangement.table.hidden_size * COMPUTE_BYTES
    per_layer = 2.0 * allreduce_time(hidden_bytes, arrangement.tp, link, eff.allreduce_latency_s,
                                     eff.collective_bandwidth)
    out = arrangement.table.is_layer * per_layer[:, None]
    logits_bytes = phase.sequences * arrangement.table.vocab_size * COMPUTE_BYTES
    out[:, HEAD] = allgather_time(logits_bytes, arrangement.tp, link, eff.allreduce_latency_s, eff.collective_bandwidth)
    return out


def tp_collective_calls(arrangement: Arrangement) -> np.ndarray:
    """(kinds,) TP collectives one forward of one module issues: two per layer, one at the head."""
    if arrangement.tp <= 1:
        return np.zeros(len(arrangement.table.is_layer))
    calls = 2.0 * arrangement.table.is_layer
    calls[HEAD] = 1.0
    return calls


@lru_cache(maxsize=64)
def expected_max_normal(n: int) -> float:
    """E[max of n independent standard normals] (0 for n = 1; 1/sqrt(pi) for n = 2), by quadrature."""
    if n <= 1:
        return 0.0
    from math import erf, sqrt

    # E[max] = integral over x > 0 of (1 - F^n) minus integral over x < 0 of F^n (F: the normal CDF)
    x = np.linspace(0.0, 12.0, 12001)
    cdf_pos = 0.5 * (1.0 + np.vectorize(erf)(x / sqrt(2.0)))
    cdf_neg = 1.0 - cdf_pos  # F(-x)
    y = (1.0 - cdf_pos**n) - cdf_neg**n
    return float(np.sum((y[1:] + y[:-1]) / 2.0 * np.diff(x)))  # trapezoid rule


def drift_growth(tp: int) -> float:
    """How the wait for the slowest of tp ranks grows with tp, relative to tp 2 (0 for tp 1)."""
    return expected_max_normal(tp) / expected_max_normal(2)


def tp_drift(arrangement: Arrangement) -> np.ndarray:
    """(kinds,) how much longer TP makes a module's host chain: waiting for the slowest rank at each of its
    collectives, ``collective_drift_factor`` x ``drift_growth(tp)`` (0 for modules without collectives)."""
    factor = arrangement.hardware.efficiency.collective_drift_factor * drift_growth(arrangement.tp)
    return np.where(tp_collective_calls(arrangement) > 0, factor, 0.0)


def tp_collective_host_time(arrangement: Arrangement) -> np.ndarray:
    """(kinds,) host seconds to issue one module's TP collectives."""
    return tp_collective_calls(arrangement) * arrangement.hardware.efficiency.collective_host_overhead_s


def dp_allgather_time(arrangement: Arrangement, knobs: Knobs, fetched_bytes: np.ndarray) -> np.ndarray:
    """(N, kinds) seconds to all-gather one module's ZeRO-3 partitions over the dp group.

    ``fetched_bytes`` are the whole TP shard's bytes (before the 1/dp split) of what the forward gathers.
    """
    if arrangement.dp <= 1:
        return np.zeros_like(fetched_bytes)
    eff = arrangement.hardware.efficiency
    t = allgather_time(fetched_bytes, arrangement.dp, arrangement.placement.dp_link, eff.allreduce_latency_s,
                       eff.collective_bandwidth)
    return np.where(fetched_bytes > 0, t, 0.0)
