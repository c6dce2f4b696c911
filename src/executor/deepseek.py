"""DeepSeek-V3 and Kimi-K2 in the stage builder: what differs from the Llama layout.

transformers' ``DeepseekV3DecoderLayer`` runs as it is (MLA attention, its yarn rotary with interleaved pairs,
the router with ``e_score_correction_bias`` and grouped top-k, shared and routed experts); this module only
says how a rank's config and weights differ from the whole model's:

- Multi-head latent attention splits by heads. ``q_b_proj`` (or ``q_proj`` without a query LoRA) and
  ``kv_b_proj`` are column-parallel: their outputs are viewed ``[heads, ...]`` (``DeepseekV3Attention``:
  ``view(b, s, -1, qk_head_dim)`` and ``view(b, s, -1, nope + v)``), so an even dim-0 cut holds whole heads.
  ``o_proj`` is row-parallel. ``q_a_proj``, ``kv_a_proj_with_mqa`` and the two latent norms are replicated:
  every head of every rank reads the whole latent.
- The cache holds the latent (``kv_a_layernorm(kv_nope)`` [b, 1, s, kv_lora_rank] and the rotated shared key
  [b, 1, s, qk_rope_head_dim]) and re-expands K/V through ``kv_b_proj`` each step, as transformers does; the
  planner counts the same (``hpi.planner.specs.model.ModelSpec.kv_cache_elems_per_token_per_layer``).
- Layers below ``first_k_dense_replace`` hold a dense MLP, the rest a mixture of experts. transformers decides
  by the layer index it is built with, and a stage builds its layers with local indices, so a stage's config
  moves the boundary by the stage's first layer (``stage_dense_layers``).
- The dense MLP and the shared experts split like Llama's MLP (gate/up column, down row). The routed experts
  are ``hpi.executor.experts.RoutedExperts`` (one ``nn.Linear`` per projection per expert, under the names
  DeepSeek's checkpoints store: ``mlp.experts.<e>.gate_proj.weight``), each splitting its FFN width. The MoE
  block's output is all-reduced once (``hpi.executor.tp.all_reduce_output``), so the shared experts' down
  projection, like each routed expert's, stays a plain partial-sum Linear inside it.
- The router's ``e_score_correction_bias`` is a buffer in transformers, yet a weight of the checkpoint
  (``WEIGHT_BUFFERS``): it is read with the parameters but not counted as one, as transformers counts.

Kimi-K2 is DeepSeek-V3's architecture (its config names ``DeepseekV3ForCausalLM``) under ``model_type``
``kimi_k2``, which transformers does not register: it is read as a DeepSeek-V3 config (``MODEL_TYPE_ALIASES``).
"""

from __future__ import annotations

__all__ = ["MODEL_TYPE", "MODEL_TYPE_ALIASES", "WEIGHT_BUFFERS", "check_tp", "shard_widths", "stage_dense_layers"]

MODEL_TYPE = "deepseek_v3"
MODEL_TYPE_ALIASES = {"kimi_k2": MODEL_TYPE}
WEIGHT_BUFFERS = ("e_score_correction_bias",)


def check_tp(config, tp_size: int) -> None:
    """Refuse a TP degree MLA and the experts cannot be split by, quoting the failing equation (the heads
    and the dense MLP width are checked with every family's, ``hpi.executor.tp.check_tp``)."""
    moe = config.moe_intermediate_size
    if moe % tp_size:
        raise ValueError(f"deepseek_v3: moe_intermediate_size({moe}) % tp({tp_size}) != 0: the routed and shared "
                         "experts cannot be split evenly; choose a tp that divides it")


def shard_widths(cfg, config, tp_size: int) -> None:
    """Set ``cfg``'s per-rank expert width (in place); the heads and the dense width are set as for Llama.
    The shared experts are ``moe_intermediate_size * n_shared_experts`` wide, so they split with it."""
    check_tp(config, tp_size)
    cfg.moe_intermediate_size = config.moe_intermediate_size // tp_size


def stage_dense_layers(cfg, config, layer_start: int) -> None:
    """Move ``cfg``'s dense/MoE boundary to local layer indices (in place): global layer ``layer_start + j``
    is dense exactly when ``layer_start + j < first_k_dense_replace``."""
    cfg.first_k_dense_replace = max(0, config.first_k_dense_replace - layer_start)
