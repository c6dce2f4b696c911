"""Pipeline parallelism: how layers split into stages, what stages send, and how a step composes.

Stages are contiguous runs of decoder layers, the first with the embedding and the last with the LM
head, balanced by stored parameters (what a weight-streaming stage moves each forward): min-max
contiguous partition by bisection on the largest stage (Megatron/DeepSpeed ``partition_balanced``).

A step over ``pp`` stages with ``m`` micro-batches (GPipe-style fill/drain, forward only):
- prefill, one pass:  T = sum_s t_s + (pp-1) * t_p2p + (m-1) * max(max_s t_s, t_p2p)
- decode, steady state: micro-batches keep circulating across steps, so a step takes the longer of
  the slowest stage serving all m micro-batches and one micro-batch's round trip (its next token needs
  its previous one, sent back from the last stage):  T = max(m * max_s t_s, sum_s t_s + pp * t_p2p)
The bubble is the slowest stage's idle time, T - m * max_s t_s; it is a consequence of the sum, not a
term added to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from hpi.planner.cost.collectives import COMPUTE_BYTES
from hpi.planner.cost.inputs import Arrangement
from hpi.planner.cost.phase import Phase
from hpi.planner.cost.shape import DENSE, EMBED, HEAD, MOE, module_table, stored_elements
from hpi.planner.specs.model import ModelSpec


def _greedy_parts(weights: np.ndarray, cap: float) -> list[int] | None:
    """Cut points of a left-to-right greedy split with each part <= cap, or None if an item exceeds it."""
    cuts, running = [], 0.0
    for i, w in enumerate(weights):
        if w > cap:
            return None
        if running + w > cap:
            cuts.append(i)
            running = 0.0
        running += w
    return cuts


def balanced_stage_sizes(weights: np.ndarray, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous non-empty runs of ``weights`` minimising the heaviest run."""
    n = len(weights)
    if not 1 <= parts <= n:
        raise ValueError(f"pp({parts}) must be between 1 and the number of layers({n})")
    lo, hi = float(weights.max()), float(weights.sum())
    for _ in range(60):
        mid = (lo + hi) / 2
        cuts = _greedy_parts(weights, mid)
        if cuts is not None and len(cuts) + 1 <= parts:
            hi = mid
        else:
            lo = mid
    cuts = _greedy_parts(weights, hi) or []
    bounds = [0, *cuts, n]
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    # Fewer runs than stages: split the largest runs (never raises the maximum).
    while len(sizes) < parts:
        i = max(range(len(sizes)), key=lambda j: sizes[j])
        sizes[i : i + 1] = [sizes[i] - sizes[i] // 2, sizes[i] // 2]
    return sizes


@lru_cache(maxsize=256)
def stage_layer_sizes(model: ModelSpec, pp: int) -> tuple[int, ...]:
    """Decoder layers on each stage, balanced by stored parameters including embedding and head."""
    stored = stored_elements(module_table(model))
    kinds = [MOE if model.is_moe and i >= model.first_dense_layers else DENSE for i in range(model.n_layers)]
    weights = np.array([stored[k] for k in kinds])
    weights[0] += stored[EMBED]
    weights[-1] += stored[HEAD]
    return tuple(balanced_stage_sizes(weights, pp))


@lru_cache(maxsize=256)
def stage_module_counts(model: ModelSpec, pp: int) -> np.ndarray:
    """(pp, kinds) how many modules of each kind each stage holds."""
    counts = np.zeros((pp, 4))
    start = 0
    for stage, size in enumerate(stage_layer_sizes(model, pp)):
        layers = range(start, start + size)
        moe = sum(1 for i in layers if model.is_moe and i >= model.first_dense_layers)
        counts[stage, MOE] = moe
        counts[stage, DENSE] = size - moe
        start += size
    counts[0, EMBED] = 1
    counts[-1, HEAD] = 1
    counts.setflags(write=False)
    return counts


def p2p_time(arrangement: Arrangement, phase: Phase) -> np.ndarray:
    """(N,) seconds to send one micro-batch's hidden states from one stage to the next."""
    if arrangement.pp <= 1:
        return np.zeros_like(phase.tokens)
    link, eff = arrangement.placement.pp_link, arrangement.hardware.efficiency
    n_bytes = phase.tokens * arrangement.table.hidden_size * COMPUTE_BYTES
    return eff.p2p_latency_s + link.latency_s + n_bytes / link.bandwidth_bytes_s


@dataclass(frozen=True)
class StepComposition:
    """How stage times combine into one step; weights say how many times each piece is on the critical path."""

    step_s: np.ndarray  # (N,)
    stage_sum_weight: np.ndarray  # (N,) times the sum over stages counts
    slowest_stage_weight: np.ndarray  # (N,) times the slowest stage counts (beyond the sum)
    slowest_stage: np.ndarray  # (N,) index of the slowest stage
    p2p_exposed_s: np.ndarray  # (N,)
    bubble_s: np.ndarray  # (N,)


def compose_step(stage_s: np.ndarray, p2p_s: np.ndarray, micro_batches: np.ndarray, phase: Phase) -> StepComposition:
    """Combine (N, pp) stage times into a step, per the rules in this module's docstring."""
    pp = stage_s.shape[1]
    slowest = np.argmax(stage_s, axis=1)
    t_max = stage_s[np.arange(len(slowest)), slowest]
    t_sum = stage_s.sum(axis=1)
    if phase.is_prefill:
        fill = t_sum + (pp - 1) * p2p_s
        steady_is_stage = t_max >= p2p_s
        extra = micro_batches - 1
        step = fill + extra * np.maximum(t_max, p2p_s)
        sum_w = np.ones_like(t_sum)
        max_w = np.where(steady_is_stage, extra, 0.0)
        p2p_exposed = (pp - 1) * p2p_s + np.where(steady_is_stage, 0.0, extra * p2p_s)
    else:
        round_trip = t_sum + (pp * p2p_s if pp > 1 else 0.0)
        stage_bound = micro_batches * t_max >= round_trip
        step = np.maximum(micro_batches * t_max, round_trip)
        sum_w = np.where(stage_bound, 0.0, 1.0)
        max_w = np.where(stage_bound, micro_batches, 0.0)
        p2p_exposed = np.where(stage_bound, 0.0, pp * p2p_s if pp > 1 else 0.0)
    bubble = step - micro_batches * t_max
    return StepComposition(step, sum_w, max_w, slowest, p2p_exposed, np.maximum(bubble, 0.0))
