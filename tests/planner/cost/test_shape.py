"""cost.shape: the four module kinds as lists of tensors, and the per-kind table every cost term reads.

Expectations are worked out by hand from the shapes (see each test) or from ModelSpec's own named
parts, which test_catalog.py checks against transformers.
"""

from __future__ import annotations

import numpy as np
import pytest

from hpi.planner.catalog import load_model, model_names
from hpi.planner.cost.pipeline import stage_module_counts
from hpi.planner.cost.shape import (
    DENSE,
    EMBED,
    HEAD,
    MOE,
    largest_swapped_partition,
    module_table,
    module_tensors,
    stored_elements,
    swapped_partitions,
    swaps_per_module,
)

CATALOGUE = model_names()
TIED = [n for n in CATALOGUE if load_model(n).tied_embeddings]
assert TIED, "the catalogue should hold tied-embedding models (OPT, BLOOM)"
UNTIED = [n for n in CATALOGUE if not load_model(n).tied_embeddings]


def numel(tensors, **match) -> int:
    return sum(t.numel for t in tensors if all(getattr(t, k) == v for k, v in match.items()))


# ---- module tensors add up to ModelSpec's parts ---------------------------------------------------


@pytest.mark.parametrize("name", CATALOGUE)
def test_module_tensors_sum_to_modelspec_parts(name: str) -> None:
    m = load_model(name)
    parts = m.params_by_part
    dense = module_tensors(m, DENSE)
    assert numel(dense) == m.dense_layer_params
    moe = module_tensors(m, MOE)
    if m.is_moe:
        # Routed experts are listed once: the module holds n_experts copies of them.
        assert numel(moe, expert=False) + m.n_experts * numel(moe, expert=True) == m.moe_layer_params
        assert numel(moe, expert=True) == m.expert_params
    else:
        assert moe == []
    assert numel(module_tensors(m, EMBED)) == parts["embedding"] + parts["position_embedding"] + parts["embedding_norm"]
    # The head always lists the V x h matrix (a tied head is fetched and multiplied with again).
    assert numel(module_tensors(m, HEAD)) == parts["final_norm"] + m.vocab_size * m.hidden_size


@pytest.mark.parametrize("name", CATALOGUE)
def test_table_agrees_with_module_tensors(name: str) -> None:
    m = load_model(name)
    t = module_table(m)
    for kind in range(4):
        ts = module_tensors(m, kind)
        n_routed = m.n_experts if kind == MOE else 0
        assert t.sharded[kind] == numel(ts, tp_sharded=True, expert=False)
        assert t.replicated[kind] == numel(ts, tp_sharded=False, expert=False)
        assert t.expert_sharded[kind] == numel(ts, expert=True)
        # Each projection of each routed expert is its own parameter (hpi.executor.experts).
        apart = sorted(x.numel for x in ts for _ in range(n_routed if x.expert else 1))
        assert sorted([*t.matrix_tensor_sizes[kind], *t.vector_tensor_sizes[kind]]) == apart
        assert t.largest_tensor[kind] == max(apart, default=0)
    # Every routed-expert tensor is a TP-sharded matrix (or its bias).
    for x in module_tensors(m, MOE):
        if x.expert:
            assert x.tp_sharded and (x.matrix or m.ffn_bias)


@pytest.mark.parametrize("name", CATALOGUE)
@pytest.mark.parametrize("pp", [1, 2, 4])
def test_stored_elements_times_stage_counts_is_params_total(name: str, pp: int) -> None:
    m = load_model(name)
    counts = stage_module_counts(m, pp)
    assert (counts @ stored_elements(module_table(m))).sum() == m.params_total


@pytest.mark.parametrize("name", TIED)
def test_tied_head_stores_only_its_norm(name: str) -> None:
    """A tied LM head re-uses the embedding: its V x h matrix is fetched again but stored once, in EMBED."""
    m = load_model(name)
    t = module_table(m)
    assert stored_elements(t)[HEAD] == m.params_by_part["final_norm"]
    assert stored_elements(t)[EMBED] >= m.vocab_size * m.hidden_size
    assert t.tied_sharded[HEAD] == m.vocab_size * m.hidden_size
    assert t.sharded[HEAD] == m.vocab_size * m.hidden_size  # still fetched and multiplied with
    assert list(t.tied_sharded[:HEAD]) == [0, 0, 0]


@pytest.mark.parametrize("name", UNTIED)
def test_untied_head_is_stored(name: str) -> None:
    m = load_model(name)
    t = module_table(m)
    assert stored_elements(t)[HEAD] == m.vocab_size * m.hidden_size + m.params_by_part["final_norm"]
    assert t.tied_sharded[HEAD] == 0


# ---- hand numbers ---------------------------------------------------------------------------------


def test_dense_split_by_hand(kit) -> None:
    """h=1024, 8 heads x 128, 2 KV heads, f=4096, V=32000."""
    t = module_table(kit.toy_dense())
    attention = 1024 * 1024 + 2 * 1024 * 256 + 1024 * 1024  # q, k, v, o
    ffn = 3 * 1024 * 4096
    assert t.sharded[DENSE] == attention + ffn == 15_204_352
    assert t.replicated[DENSE] == 2 * 1024  # two RMSNorms
    assert t.expert_sharded[DENSE] == 0 and t.n_experts[DENSE] == 0
    assert t.sharded[EMBED] == 0 and t.replicated[EMBED] == 32000 * 1024  # the embedding is replicated
    assert t.sharded[HEAD] == 32000 * 1024 and t.replicated[HEAD] == 1024  # head column-sharded, norm not
    assert t.largest_tensor[DENSE] == 1024 * 4096
    assert t.largest_tensor[EMBED] == t.largest_tensor[HEAD] == 32000 * 1024
    # ZeRO-3 gathers a leaf module at a time: gate, up and down are separate modules of h*f each.
    assert t.largest_gather[DENSE] == 1024 * 4096
    assert t.largest_gather[EMBED] == t.largest_gather[HEAD] == 32000 * 1024
    assert list(t.is_layer) == [1, 1, 0, 0]
    np.testing.assert_allclose(t.matrix_fraction[DENSE], 15_204_352 / (15_204_352 + 2048))
    assert t.matrix_fraction[EMBED] == 1.0
    np.testing.assert_allclose(t.matrix_fraction[HEAD], 32000 * 1024 / (32000 * 1024 + 1024))
    assert t.attn_flops_per_ctx_token == 2 * 8 * (128 + 128)
    assert t.kv_elems_per_token == 2 * 2 * 128
    assert t.kv_shard_limit == 2
    assert t.kv_expand_flops_per_cached_token == 0.0
    assert (t.hidden_size, t.vocab_size) == (1024, 32000)


def test_biases_column_sharded_row_replicated(kit) -> None:
    """OPT-style: column-parallel biases (q, k, v, fc1) split with their matrix; row-parallel ones
    (o, fc2) and the LayerNorms' weight and bias are replicated."""
    m = kit.toy_dense(
        name="toy-opt", family="opt", n_layers=2, hidden_size=32, n_heads=4, n_kv_heads=4, head_dim=8,
        ffn_hidden_size=64, vocab_size=100, max_position_embeddings=64, tied_embeddings=True, gated_ffn=False,
        norm="layernorm", qkv_bias=True, out_bias=True, ffn_bias=True, learned_positions=66,
    )  # fmt: skip
    t = module_table(m)
    sharded = 3 * 32 * 32 + 3 * 32 + 32 * 32 + 32 * 64 + 64 + 64 * 32  # qkv w+b, o w, fc1 w+b, fc2 w
    replicated = 32 + 32 + 2 * (32 + 32)  # o bias, fc2 bias, two LayerNorms (weight + bias)
    assert (t.sharded[DENSE], t.replicated[DENSE]) == (sharded, replicated) == (8352, 192)
    assert t.sharded[DENSE] + t.replicated[DENSE] == m.dense_layer_params
    # Embedding and learned positions are replicated matrices.
    assert t.replicated[EMBED] == 100 * 32 + 66 * 32 and t.sharded[EMBED] == 0
    # The head: LayerNorm (replicated) + the tied matrix (listed, sharded, but not stored).
    assert t.replicated[HEAD] == 64 and t.sharded[HEAD] == 100 * 32
    assert stored_elements(t)[HEAD] == 64  # only the final LayerNorm
    # The matrix fraction counts biases and norms as vectors.
    vectors = 3 * 32 + 64 + 32 + 32 + 128
    np.testing.assert_allclose(t.matrix_fraction[DENSE], 1 - vectors / 8544)


def test_mla_and_moe_by_hand(kit) -> None:
    """h=256, 4 heads, q_lora 96, kv_lora 64, d_nope 32, d_rope 16, d_v 32; 8 experts of width 128 + 1 shared."""
    m = kit.toy_mla()
    t = module_table(m)
    attn_sharded = 96 * 4 * 48 + 64 * 4 * (32 + 32) + 4 * 32 * 256  # q_b, kv_b, o
    attn_replicated = 256 * 96 + 96 + 256 * (64 + 16) + 64  # q_a, q_a norm, kv_a (with the rope key), kv_a norm
    assert (attn_sharded, attn_replicated) == (67_584, 45_216)
    expert = 3 * 256 * 128
    assert t.sharded[DENSE] == attn_sharded + 3 * 256 * 512
    assert t.replicated[DENSE] == attn_replicated + 2 * 256
    assert t.sharded[MOE] == attn_sharded + expert  # the shared expert is split like a dense FFN
    assert t.replicated[MOE] == attn_replicated + 8 * 256 + 2 * 256  # router, norms
    assert t.expert_sharded[MOE] == expert
    assert (t.n_experts[MOE], t.experts_active[MOE]) == (8, 2)
    assert stored_elements(t)[MOE] == m.moe_layer_params
    # Each expert's projection is its own parameter, each expert its own leaf module holding all three.
    assert t.largest_tensor[MOE] == 256 * 128
    assert t.largest_gather[MOE] == expert
    assert t.largest_gather[DENSE] == 256 * 512
    assert t.attn_flops_per_ctx_token == 2 * 4 * (48 + 32)
    assert t.kv_elems_per_token == 64 + 16  # the cached latent and rope key
    assert t.kv_shard_limit == 1  # one latent "head": replicated across TP
    assert t.kv_expand_flops_per_cached_token == 2 * 64 * 4 * (32 + 32)
    # q_a and kv_a are replicated matrices: quantizable but not split.
    names = {x.name: x for x in module_tensors(m, DENSE)}
    assert names["q_a_proj.weight"].matrix and not names["q_a_proj.weight"].tp_sharded
    assert names["kv_a_proj_with_mqa.weight"].matrix and not names["kv_a_proj_with_mqa.weight"].tp_sharded
    assert names["q_b_proj.weight"].tp_sharded


def test_mla_without_q_lora_uses_a_sharded_q_proj(kit) -> None:
    m = kit.toy_mla(q_lora_rank=0)
    names = {x.name: x for x in module_tensors(m, DENSE)}
    assert "q_a_proj.weight" not in names
    assert names["q_proj.weight"].numel == 256 * 4 * 48 and names["q_proj.weight"].tp_sharded
    assert stored_elements(module_table(m))[DENSE] == m.dense_layer_params


def test_deepseek_v3_catalogue_figures() -> None:
    m = load_model("deepseek-v3")
    t = module_table(m)
    assert t.kv_elems_per_token == 576
    assert t.kv_expand_flops_per_cached_token == 2 * 512 * 128 * (128 + 128)
    assert t.attn_flops_per_ctx_token == 2 * 128 * (192 + 128)
    assert (t.n_experts[MOE], t.experts_active[MOE]) == (256, 8)


def test_mixtral_experts() -> None:
    m = load_model("mixtral-8x7b")
    t = module_table(m)
    assert t.expert_sharded[MOE] == 3 * 4096 * 14336
    assert t.replicated[MOE] == 8 * 4096 + 2 * 4096  # router + norms
    assert t.sharded[MOE] == m.attention_params  # no shared expert
    assert t.largest_tensor[MOE] == 4096 * 14336  # one expert's projection
    # DeepSpeed's default leaf classes make MixtralSparseMoeBlock one leaf: the router and every expert at once
    assert t.largest_gather[MOE] == 8 * 3 * 4096 * 14336 + 8 * 4096
    assert t.sharded[DENSE] + t.replicated[DENSE] == m.dense_layer_params  # listed even if unused
    counts = stage_module_counts(m, 1)
    assert counts[0, DENSE] == 0 and counts[0, MOE] == 32


def test_swapped_partitions_are_the_parameters_deepspeed_swaps() -> None:
    """hpi holds each routed expert as a ZeRO-3 leaf module of three projections (hpi.executor.experts): fetching a
    DeepSeek expert swaps in its 3 partitions at once. A Mixtral layer's MoE block is one leaf (DeepSpeed's default
    leaf classes): fetching it swaps in all 8 experts' 24 partitions of 4096 x 14336 (the router, 64 KB, stays in
    CPU memory). The largest partition is the embedding (32000 x 4096); norms (16 KB) are below DeepSpeed's 1 MiB."""
    m = load_model("mixtral-8x7b")
    block = [(module, e) for module, e in swapped_partitions(m, 1, 1) if module.startswith("moe_layer.moe_block")]
    assert block == [("moe_layer.moe_block", 4096 * 14336)] * 24
    assert largest_swapped_partition(m, 1, 1) == 32000 * 4096
    assert largest_swapped_partition(m, 2, 2) == 32000 * 4096 / 2  # replicated over TP, split over dp
    assert swaps_per_module(m, 1, 1) == 24
    deepseek = load_model("deepseek-v3")
    experts = [(m, e) for m, e in swapped_partitions(deepseek, 1, 1) if m.startswith("moe_layer.experts")]
    assert sorted(experts) == sorted((f"moe_layer.experts.{e}", 7168 * 2048) for e in range(256) for _ in range(3))
    assert swaps_per_module(deepseek, 1, 1) == 3
    llama = load_model("llama-3-70b")
    assert largest_swapped_partition(llama, 2, 1) == 128256 * 8192  # the embedding is replicated over TP
    assert swaps_per_module(llama, 1, 1) == 1
    assert not any("layernorm" in module or module.endswith(".norm") for module, _ in swapped_partitions(llama, 1, 1))


def test_unknown_kind_raises(kit) -> None:
    with pytest.raises(ValueError, match="unknown module kind"):
        module_tensors(kit.toy_dense(), 7)


# ---- ZeRO-3 leaf granularity (Plan.zero3_leaf) -------------------------------------------------------------


def test_layer_leaves_gather_each_decoder_layer_whole() -> None:
    """With each decoder layer one leaf, its every parameter is one gather (a Mixtral layer's eight experts too);
    the embedding and head kinds keep their modules, and what is stored does not change."""
    llama = load_model("llama-3-8b")
    module, layer = module_table(llama), module_table(llama, "layer")
    whole = llama.dense_layer_params
    assert module.largest_gather[DENSE] == 4096 * 14336  # one MLP projection at a time
    assert layer.largest_gather[DENSE] == layer.last_gather[DENSE] == whole
    assert layer.leaf_sharded[DENSE, 0] + layer.leaf_replicated[DENSE, 0] == whole  # the norms inside it too
    assert not layer.leaf_sharded[DENSE, 1:].any() and (module.leaf_sharded[DENSE] > 0).sum() == 7
    assert len(layer.module_largest_matrix[DENSE]) == 1 and len(module.module_largest_matrix[DENSE]) == 9
    assert layer.module_largest_matrix[DENSE][0] == 4096 * 14336 and layer.module_largest_vector[DENSE][0] == 4096
    assert sorted(module.module_largest_vector[DENSE]) == [0] * 7 + [4096] * 2  # the norms hold no matrix
    for kind in (EMBED, HEAD):
        assert layer.largest_gather[kind] == module.largest_gather[kind]
    np.testing.assert_array_equal(stored_elements(layer), stored_elements(module))
    mixtral = module_table(load_model("mixtral-8x7b"), "layer")
    assert mixtral.largest_gather[MOE] == load_model("mixtral-8x7b").moe_layer_params  # every expert at once
    with pytest.raises(ValueError, match="zero3 leaf 'block' is not one of module, layer"):
        module_table(llama, "block")
