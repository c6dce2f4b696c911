"""Compute time of one forward of each module: a roofline of FLOPs against HBM bytes.

t = max(FLOPs / (peak_bf16 * eff_matmul[phase]),  bytes_read / (HBM_bw * eff_hbm))       (Williams et al. 2009)

- FLOPs: 2 per weight per token for the weights a token uses (its k routed experts, not all of them;
  none for the embedding, a lookup),
  plus attention 2*H*(d_qk + d_v) per query token per attended key, split across TP ranks, plus for MLA
  in decode the re-expansion of every cached latent through kv_b_proj. The LM head
  runs on the last position only in prefill (transformers' ``logits_to_keep``).
- Bytes: every weight the forward touches is read once in 16 bit (the embedding: only the rows looked
  up). Decode also reads the KV cache of every sequence in the micro-batch. Dequantizing an 8/4-bit
  weight before its GEMM is its own term (``cost.dequant``), which ``cost.estimate`` adds to the compute
  stream's busy time.
"""

from __future__ import annotations

import numpy as np

from hpi.planner.cost.inputs import COMPUTE_BYTES, Arrangement, Knobs
from hpi.planner.cost.phase import Phase
from hpi.planner.cost.shape import EMBED, HEAD


def expected_experts_touched(n_experts: np.ndarray, k: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Distinct routed experts hit when ``tokens`` tokens each pick k of E experts, uniformly at random.

    E * (1 - (1 - k/E)^T): the balls-in-bins expectation. Real routers are skewed, so this is an upper bound
    on the experts a forward touches, and therefore on what ZeRO-3 must fetch for it.
    """
    e = np.maximum(n_experts, 1.0)
    return np.where(n_experts > 0, e * (1.0 - (1.0 - k / e) ** tokens), 0.0)


def active_elems_per_rank(arrangement: Arrangement) -> np.ndarray:
    """(kinds,) weight elements one token multiplies with, per TP rank."""
    t = arrangement.table
    return t.sharded / arrangement.tp + t.replicated + t.experts_active * t.expert_sharded / arrangement.tp


def touched_elems_per_rank(arrangement: Arrangement, tokens: np.ndarray) -> np.ndarray:
    """(N, kinds) weight elements one forward of ``tokens`` tokens reads, per TP rank."""
    t = arrangement.table
    touched = expected_experts_touched(t.n_experts[None, :], t.experts_active[None, :], tokens[:, None])
    return t.sharded / arrangement.tp + t.replicated + touched * t.expert_sharded / arrangement.tp


def stored_elems_per_rank(arrangement: Arrangement) -> np.ndarray:
    """(kinds,) elements a TP rank holds of one module before ZeRO-3 partitioning (a tied head: its norm)."""
    t = arrangement.table
    tp = arrangement.tp
    return (t.sharded - t.tied_sharded) / tp + t.replicated + t.n_experts * t.expert_sharded / tp


def flops(arrangement: Arrangement, phase: Phase) -> np.ndarray:
    t = arrangement.table
    weight_tokens = np.repeat(phase.tokens[:, None], 4, axis=1)
    weight_tokens[:, HEAD] = phase.sequences
    weight_tokens[:, EMBED] = 0.0  # a lookup, not a matmul
    matmul = 2.0 * weight_tokens * active_elems_per_rank(arrangement)
    tp = arrangement.tp
    attention = t.is_layer * phase.tokens[:, None] * (t.attn_flops_per_ctx_token / tp) * phase.attn_ctx_tokens
    # MLA re-expands each sequence's cached latents every decode step (prefill expands each token once,
    # which the kv_b_proj weight FLOPs above already count).
    expand = t.is_layer * phase.sequences[:, None] * phase.kv_read_tokens * t.kv_expand_flops_per_cached_token / tp
    return matmul + attention + expand


def hbm_bytes(arrangement: Arrangement, knobs: Knobs, phase: Phase) -> np.ndarray:
    t = arrangement.table
    touched = touched_elems_per_rank(arrangement, phase.tokens)
    weights = touched * COMPUTE_BYTES
    weights[:, EMBED] = phase.tokens * t.hidden_size * COMPUTE_BYTES  # the rows looked up
    kv = t.is_layer * phase.sequences[:, None] * phase.kv_read_tokens * t.kv_elems_per_token / arrangement.kv_split
    return weights + kv * COMPUTE_BYTES


def roofline_sides(arrangement: Arrangement, knobs: Knobs, phase: Phase) -> tuple[np.ndarray, np.ndarray]:
    """(FLOP-bound seconds, HBM-bound seconds), each (N, kinds), of one forward of one module."""
    gpu, eff = arrangement.hardware.gpu, arrangement.hardware.efficiency
    matmul_eff = eff.matmul_prefill if phase.is_prefill else eff.matmul_decode
    t_flops = flops(arrangement, phase) / (gpu.bf16_flops * matmul_eff)
    t_bytes = hbm_bytes(arrangement, knobs, phase) / (gpu.hbm_bandwidth_bytes_s * eff.hbm)
    return t_flops, t_bytes


def compute_time(arrangement: Arrangement, knobs: Knobs, phase: Phase) -> np.ndarray:
    """(N, kinds) seconds of one forward of one module on one rank."""
    return np.maximum(*roofline_sides(arrangement, knobs, phase))
