"""The architecture of a decoder-only language model, and the counts derived from it.

One frozen record holds the numbers a HuggingFace ``config.json`` states; every parameter, byte and FLOP
count the cost model needs is a property derived from them, broken into named parts that add up to the
total (``params_by_part``), in the spirit of nanochat's accounting.

Conventions (checked against the HF modelling code of each family):
- gated FFN (Llama/Mistral/Qwen2/Mixtral/DeepSeek): gate, up and down projections, 3·h·f weights;
  plain FFN (OPT/BLOOM): fc1 and fc2, 2·h·f weights.
- MLA attention (DeepSeek-V3, Kimi-K2): q_a (h·q_lora), q_a norm, q_b (q_lora·H·(d_nope+d_rope)),
  kv_a (h·(kv_lora+d_rope)), kv_a norm, kv_b (kv_lora·H·(d_nope+d_v)), o (H·d_v·h).
- MoE layers hold ``n_experts`` routed experts of width ``moe_ffn_hidden_size``, ``n_shared_experts``
  always-active experts of the same width, and a router of ``n_experts·h`` weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FAMILIES = ("llama", "mistral", "qwen2", "opt", "bloom", "mixtral", "deepseek_v3")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    tied_embeddings: bool = False
    gated_ffn: bool = True
    norm: str = "rmsnorm"  # "rmsnorm": weight only; "layernorm": weight and bias
    qkv_bias: bool = False
    out_bias: bool = False
    ffn_bias: bool = False
    learned_positions: int = 0  # rows of a learned absolute position table (OPT: max_pos + 2)
    embedding_norm: bool = False  # BLOOM's word_embeddings_layernorm
    # Mixture of experts (0 experts = dense model)
    n_experts: int = 0
    n_experts_active: int = 0
    n_shared_experts: int = 0
    moe_ffn_hidden_size: int = 0
    first_dense_layers: int = 0  # DeepSeek's first_k_dense_replace
    # Multi-head latent attention (all zero = standard attention)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    checkpoint_dtype_bytes: int = 2
    published_params_total: float | None = field(default=None, compare=False)
    published_params_active: float | None = field(default=None, compare=False)
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model {self.name}: family {self.family!r} is not one of {', '.join(FAMILIES)}")
        for name in ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "head_dim", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model {self.name}: {name} = {getattr(self, name)} must be > 0")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model {self.name}: n_heads({self.n_heads}) % n_kv_heads({self.n_kv_heads}) != 0: "
                "grouped-query attention needs whole groups"
            )
        if self.is_moe and not (0 < self.n_experts_active <= self.n_experts):
            raise ValueError(
                f"model {self.name}: need 0 < n_experts_active({self.n_experts_active}) <= n_experts({self.n_experts})"
            )
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"model {self.name}: norm {self.norm!r} must be 'rmsnorm' or 'layernorm'")

    # ---- shape predicates -------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def uses_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.first_dense_layers if self.is_moe else 0

    @property
    def n_dense_layers(self) -> int:
        return self.n_layers - self.n_moe_layers

    # ---- per-layer parameter counts ---------------------------------------------------------------
    @property
    def _norm_params(self) -> int:
        return self.hidden_size * (2 if self.norm == "layernorm" else 1)

    @property
    def attention_params(self) -> int:
        h = self.hidden_size
        if self.uses_mla:
            qk_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
            # Projections only: the q_a / kv_a RMSNorms are counted in layer_norm_params.
            q = (
                h * self.q_lora_rank + self.q_lora_rank * self.n_heads * qk_dim
                if self.q_lora_rank
                else h * self.n_heads * qk_dim
            )
            kv = h * (self.kv_lora_rank + self.qk_rope_head_dim)
            kv += self.kv_lora_rank * self.n_heads * (self.qk_nope_head_dim + self.v_head_dim)
            return q + kv + self.n_heads * self.v_head_dim * h
        q_dim = self.n_heads * self.head_dim
        kv_dim = self.n_kv_heads * self.head_dim
        weights = h * (q_dim + 2 * kv_dim) + q_dim * h
        biases = (q_dim + 2 * kv_dim if self.qkv_bias else 0) + (h if self.out_bias else 0)
        return weights + biases

    def _ffn_params(self, width: int) -> int:
        h = self.hidden_size
        if self.gated_ffn:
            return 3 * h * width + (2 * width + h if self.ffn_bias else 0)
        return 2 * h * width + (width + h if self.ffn_bias else 0)

    @property
    def dense_ffn_params(self) -> int:
        return self._ffn_params(self.ffn_hidden_size)

    @property
    def expert_params(self) -> int:
        """One routed (or shared) expert."""
        return self._ffn_params(self.moe_ffn_hidden_size) if self.is_moe else 0

    @property
    def router_params(self) -> int:
        return self.n_experts * self.hidden_size if self.is_moe else 0

    @property
    def layer_norm_params(self) -> int:
        """Per-layer norms: pre-attention and pre-FFN, plus MLA's two low-rank norms."""
        mla = (self.q_lora_rank if self.q_lora_rank else 0) + self.kv_lora_rank if self.uses_mla else 0
        return 2 * self._norm_params + mla

    @property
    def dense_layer_params(self) -> int:
        mla_norms = self.layer_norm_params - 2 * self._norm_params
        return self.attention_params + self.dense_ffn_params + 2 * self._norm_params + mla_norms

    @property
    def moe_layer_params(self) -> int:
        if not self.is_moe:
            return 0
        mla_norms = self.layer_norm_params - 2 * self._norm_params
        experts = (self.n_experts + self.n_shared_experts) * self.expert_params
        return self.attention_params + experts + self.router_params + 2 * self._norm_params + mla_norms

    @property
    def moe_layer_active_params(self) -> int:
        """Parameters one token touches in an MoE layer: attention, router, shared and k routed experts."""
        if not self.is_moe:
            return 0
        return self.moe_layer_params - (self.n_experts - self.n_experts_active) * self.expert_params

    def layer_params(self, index: int) -> int:
        return self.moe_layer_params if self.is_moe and index >= self.first_dense_layers else self.dense_layer_params

    # ---- whole-model counts -----------------------------------------------------------------------
    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab_size * self.hidden_size

    @property
    def params_by_part(self) -> dict[str, int]:
        """Named parts that sum to ``params_total`` (a test holds this)."""
        h = self.hidden_size
        n_moe, n_dense = self.n_moe_layers, self.n_dense_layers
        return {
            "embedding": self.embedding_params,
            "position_embedding": self.learned_positions * h,
            "embedding_norm": self._norm_params if self.embedding_norm else 0,
            "attention": self.n_layers * self.attention_params,
            "dense_ffn": n_dense * self.dense_ffn_params,
            "routed_experts": n_moe * self.n_experts * self.expert_params,
            "shared_experts": n_moe * self.n_shared_experts * self.expert_params,
            "router": n_moe * self.router_params,
            "layer_norms": self.n_layers * self.layer_norm_params,
            "final_norm": self._norm_params,
            "lm_head": self.lm_head_params,
        }

    @property
    def params_total(self) -> int:
        return sum(self.params_by_part.values())

    @property
    def params_active(self) -> int:
        """Parameters one token touches (all of them for a dense model)."""
        inactive = self.n_moe_layers * (self.n_experts - self.n_experts_active) * self.expert_params
        return self.params_total - inactive

    @property
    def params_outside_layers(self) -> int:
        """Embeddings, position table, embedding norm, final norm and LM head."""
        return (self.params_total - self.n_dense_layers * self.dense_layer_params
                - self.n_moe_layers * self.moe_layer_params)

    # ---- attention and KV cache -------------------------------------------------------------------
    @property
    def kv_cache_elems_per_token_per_layer(self) -> int:
        """Elements of K and V one token adds to one layer's cache.

        MLA is counted as transformers' DeepseekV3 attention caches it, since that is the runtime we
        execute: the compressed latent, kv_lora_rank + qk_rope_head_dim (576 for DeepSeek-V3), one "head"
        shared by all query heads. transformers 5.23 holds [batch, 1, seq, kv_lora_rank] and
        [batch, 1, seq, qk_rope_head_dim] per layer and re-expands K/V with kv_b_proj every step; 4.x cached
        the decompressed per-head n_heads·(d_nope + d_rope + d_v) (40960 for DeepSeek-V3). A test in
        tests/planner/test_catalog.py reads the cache of a tiny model to keep this in step.
        """
        if self.uses_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.n_kv_heads * self.head_dim

    @property
    def attention_qk_dim(self) -> int:
        """Per-head width of the query·key product."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.uses_mla else self.head_dim

    @property
    def attention_v_dim(self) -> int:
        return self.v_head_dim if self.uses_mla else self.head_dim

    @property
    def kv_heads_for_sharding(self) -> int:
        """Heads whose K/V a tensor-parallel split divides (MLA's cached latent is one head: replicated)."""
        return 1 if self.uses_mla else self.n_kv_heads
