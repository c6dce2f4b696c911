"""Pinned host memory as torch allocates it: every pinned partition rounded up to a power of two.

DeepSpeed pins each offloaded parameter partition on its own (``tensor.pin_memory()``), and torch's CUDA
caching host allocator rounds every pinned block up to the next power of two so blocks can be reused. A
partition of 117 MB (a Mixtral-8x7B expert projection, 14336 x 4096 bf16) takes a 128 MB block; a 4-bit
Llama-70B attention projection of 37.7 MB takes 64 MB. Measured on one H200 (2026-12-03,
benchmarks/results/2026-12-03-h200-moe): Mixtral-8x22B at 4 bits held 79.10 GB of pinned partitions in a
96.4 GB resident set, Mixtral-8x7B at 16 bits 93.40 GB in 107.8 GB; the rounding accounts for most of
the difference (``pinned_rounding_bytes``).

A partition is what ZeRO-3 keeps of a parameter on one rank: its TP shard (the embedding is replicated)
split 1/dp, stored at the plan's bits (matrices: bits/8 a weight plus the group scales; vectors 16-bit).
Parameters at or below the persistence threshold stay on the GPU and pin nothing.
"""

from __future__ import annotations

import numpy as np

from hpi.planner.cost.inputs import Arrangement, Knobs
from hpi.planner.cost.shape import MOE, N_KINDS, held_parameters, module_tensors, tp_split


def _power_of_two_ceiling(nbytes: np.ndarray) -> np.ndarray:
    return np.where(nbytes > 0, 2.0 ** np.ceil(np.log2(np.maximum(nbytes, 1.0))), 0.0)


def pinned_rounding_bytes(arrangement: Arrangement, knobs: Knobs) -> np.ndarray:
    """(N, kinds) bytes one module of each kind pins beyond its partitions' own bytes, on one rank, where the
    plan pins offloaded weights (offload cpu with pin_memory); 0 elsewhere."""
    model, tp, dp = arrangement.model, arrangement.tp, arrangement.dp
    threshold = knobs.persistence_threshold_elems[:, None]
    matrix_threshold = knobs.zero3_weights(knobs.persistence_threshold_elems)[:, None]  # ds_numel (Knobs)
    out = np.zeros((knobs.n, N_KINDS))
    for kind in range(N_KINDS):
        tensors = [t for t in module_tensors(model, kind) if not t.tied]
        if not tensors:
            continue
        numel = np.array([t.numel for t in tensors], dtype=np.float64)
        split = np.array([tp_split(t, kind, tp) for t in tensors], dtype=np.float64)
        n_routed = model.n_experts if kind == MOE else 0
        copies = np.array([held_parameters(t, n_routed)[1] for t in tensors], dtype=np.float64)
        matrix = np.array([t.matrix for t in tensors])
        per_weight = knobs.bytes_per_weight(matrix.astype(np.float64))  # (N, T)
        exact = np.ceil(numel / split / dp)[None, :] * per_weight  # (N, T)
        # DeepSpeed persists ds_numel <= threshold (the TP shard; a quantized matrix's as stored)
        offloaded = (numel / split)[None, :] > np.where(matrix[None, :], matrix_threshold, threshold)
        waste = np.where(offloaded, _power_of_two_ceiling(exact) - exact, 0.0)
        out[:, kind] = waste @ copies
    pinned = knobs.offload_cpu & knobs.pin_memory
    return np.where(pinned[:, None], out, 0.0)
