"""Prefill's element-wise traffic: the bytes a decoder layer's kernels other than its GEMMs and attention move.

A prefill forward is FLOP-bound in its GEMMs (``cost.compute``), but between them the eager layer runs chains of
element-wise kernels over every token's activations, each reading and writing HBM: transformers' RMSNorm alone
upcasts to fp32, squares, averages, scales and casts back (five kernels, 36 bytes an element), rotary embedding
rotates q and k through five more, the residual adds and the FFN's activation add the rest. They run in series
with the GEMMs on the compute stream, so their time adds:

    t = tokens * bytes_per_token / (hbm_bandwidth * hbm)                      (per module, per forward, per rank)

Bytes per token per rank, for a decoder layer of hidden width h (replicated over TP), q and k widths per rank
(heads * head_dim / tp, k: kv heads per rank), FFN width per rank f (a MoE layer: its k routed experts' and its
shared experts' widths), each chain's bytes an element read plus written, counted on transformers' own eager
layers by ``hpi.executor.traffic`` (``tests/executor/test_traffic.py`` holds this formula to within 2% of the
count for Llama-3-8B, Llama-3-70B at tp 4, Mixtral, DeepSeek-V3's dense and MoE layers and OPT, 3% for BLOOM):

    2 norms * norm_bytes * h  +  2 residual adds * 6 * h  +  20 * (q + k) [rotary]
    +  activation_bytes * f  +  MoE: ROUTED_BYTES_PER_HIDDEN * h * k  +  MLA: its latent norms, rotary and concat

Why prefill only: decode's element-wise kernels are a few rows each, launch- and latency-bound; their fixed cost
and its growth with the rows are ``cost.overhead.layer_device_time`` (measured). Before this term, one
``matmul_prefill`` had to carry both the GEMMs' efficiency and this traffic, which is a larger share of a narrow
layer than of a wide one (the 8B's 591 KB a token against 436 MFLOP, the 70B's 1.16 MB against 1.7 GFLOP; at
tp 4 the 70B's norms and residuals stay whole while its GEMMs split): the 4x H200 records predicted the 70B's
tp 1 prefill 25-30% slow and its tp 4 one 4-5% slow with the same fraction (``validation/fidelity_set.yaml``).

The embedding is a lookup (no chain); the head's final norm runs on every prompt token before transformers keeps
the last position's logits, so the HEAD kind pays one norm.
"""

from __future__ import annotations

import numpy as np

from hpi.planner.cost.inputs import Arrangement
from hpi.planner.cost.phase import Phase
from hpi.planner.cost.shape import DENSE, HEAD, MOE, N_KINDS
from hpi.planner.specs.model import ModelSpec

# Bytes read plus written per element of the chain's tensor, bf16 activations (hpi.executor.traffic counts them):
RMSNORM_BYTES = 36.0  # x.to(fp32) 2+4, pow 4+4, mean 4, x * rsqrt 4+4, .to(bf16) 4+2, weight * x 2+2
LAYERNORM_BYTES = 4.0  # one fused native_layer_norm kernel: read 2, write 2
RESIDUAL_BYTES = 6.0  # a + b: read 2 + 2, write 2
ROTARY_BYTES = 20.0  # x * cos 2+2, -x2 1+1, cat 2+2, rotate_half(x) * sin 2+2, sum 4+2
# DeepSeek's interleaved rotary on halves: four products (2 each), a difference and a sum (3 each), a cat (4)
MLA_ROTARY_BYTES = 18.0
COPY_BYTES = 4.0  # a copy or cat: read 2, write 2
GATED_ACTIVATION_BYTES = 10.0  # act(gate) 2+2, * up 2+2+2
ACTIVATION_BYTES = 4.0  # act(fc1): read 2, write 2
# BLOOM's tanh GELU is written out in element-wise ops (transformers' bloom_gelu_forward): six products (30 bytes),
# two sums (8) and the tanh (4); its block also copies the attention's output once (dropout_add, 4 bytes of h).
TANH_GELU_BYTES = 42.0
BLOOM_COPY_BYTES = 4.0
# hpi.executor.experts, per token an expert serves, an element of h: gather its row (index 2+2), weigh the expert's
# output by the router's fp32 weight (mul 2+4), cast back (4+2), scatter-add into the layer's output (index_add_:
# 2 read, 2+2 of the output's row); and per token of the layer, the output's zeros (2).
ROUTED_BYTES_PER_HIDDEN = 22.0
MOE_OUTPUT_BYTES = 2.0
# DeepSeek-V3's router casts the hidden state to fp32 before its product (2 read, 4 written); Mixtral's stays bf16.
FP32_ROUTER_BYTES = 6.0
FP32_ROUTER_FAMILIES = ("deepseek_v3",)
QUERY_SCALE_BYTES = 4.0  # OPT scales q by head_dim ** -0.5 in its own kernel: read 2, write 2


def _norm_bytes(model: ModelSpec) -> float:
    return RMSNORM_BYTES if model.norm == "rmsnorm" else LAYERNORM_BYTES


def _rotary(model: ModelSpec) -> bool:
    """Whether the family rotates q and k (OPT learns positions, BLOOM biases attention by distance)."""
    return not model.learned_positions and model.family != "bloom"


def _attention_bytes(model: ModelSpec, tp: int) -> float:
    """Per token per rank: the attention block's chains beyond its GEMMs and its attention kernel."""
    heads = model.n_heads / tp
    if model.uses_mla:
        # Latent norms (replicated); the rope parts of q (per head) and of the one shared k_pe rotated; q assembled
        # from its nope and rope parts (cat), k likewise with k_pe broadcast over heads (copies into one buffer:
        # nope read and written, rope written); the attention output made contiguous for o_proj.
        nope, rope, v = model.qk_nope_head_dim, model.qk_rope_head_dim, model.v_head_dim
        latent = (model.q_lora_rank + model.kv_lora_rank) * _norm_bytes(model)
        rotary = MLA_ROTARY_BYTES * (heads + 1) * rope
        assemble = heads * (COPY_BYTES * (nope + rope) + COPY_BYTES * nope + 2.0 * rope)
        return latent + rotary + assemble + COPY_BYTES * heads * v
    q = heads * model.head_dim
    k = model.n_kv_heads / min(tp, model.kv_heads_for_sharding) * model.head_dim  # Arrangement.kv_split's rule
    out = ROTARY_BYTES * (q + k) if _rotary(model) else 0.0
    if model.learned_positions:
        out += QUERY_SCALE_BYTES * q
    if model.family == "bloom":
        out += BLOOM_COPY_BYTES * model.hidden_size
    return out


def _activation_bytes(model: ModelSpec) -> float:
    if model.family == "bloom":
        return TANH_GELU_BYTES
    return GATED_ACTIVATION_BYTES if model.gated_ffn else ACTIVATION_BYTES


def _ffn_bytes(model: ModelSpec, kind: int, tp: int) -> float:
    act = _activation_bytes(model)
    if kind == MOE:
        width = (model.n_experts_active + model.n_shared_experts) * model.moe_ffn_hidden_size
        routing = ROUTED_BYTES_PER_HIDDEN * model.n_experts_active + MOE_OUTPUT_BYTES
        routing += RESIDUAL_BYTES if model.n_shared_experts else 0.0  # shared experts' output + the routed ones'
        routing += FP32_ROUTER_BYTES if model.family in FP32_ROUTER_FAMILIES else 0.0
        return act * width / tp + routing * model.hidden_size
    return act * model.ffn_hidden_size / tp


def bytes_per_token(model: ModelSpec, tp: int) -> np.ndarray:
    """(kinds,) bytes the element-wise chains of one module move per prompt token on one TP rank."""
    h = model.hidden_size
    out = np.zeros(N_KINDS)
    for kind in (DENSE, MOE):
        if kind == MOE and not model.is_moe:
            continue
        out[kind] = (2 * _norm_bytes(model) * h + 2 * RESIDUAL_BYTES * h + _attention_bytes(model, tp)
                     + _ffn_bytes(model, kind, tp))
    out[HEAD] = _norm_bytes(model) * h
    return out


def activation_time(arrangement: Arrangement, phase: Phase) -> np.ndarray:
    """(N, kinds) seconds of one module's element-wise chains in one forward on one rank; 0 in decode (module
    docstring)."""
    if not phase.is_prefill:
        return np.zeros((len(phase.tokens), N_KINDS))
    hw = arrangement.hardware
    rate = hw.gpu.hbm_bandwidth_bytes_s * hw.efficiency.hbm
    return phase.tokens[:, None] * bytes_per_token(arrangement.model, arrangement.tp)[None, :] / rate
