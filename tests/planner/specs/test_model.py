"""ModelSpec's counts, built by hand (no catalogue): named parts that add up, exact figures worked out
on paper, and the validation rules."""

from __future__ import annotations

import dataclasses

import pytest

from hpi.planner.specs.model import ModelSpec


def llama_3_8b() -> ModelSpec:
    return ModelSpec(
        name="llama-3-8b", family="llama", n_layers=32, hidden_size=4096, n_heads=32, n_kv_heads=8,
        head_dim=128, ffn_hidden_size=14336, vocab_size=128256, max_position_embeddings=8192,
    )  # fmt: skip


def tiny_mla(**changes) -> ModelSpec:
    """DeepSeek-V3 in miniature: 1 dense layer then 2 MoE layers, 8 routed + 1 shared expert, top 2."""
    fields = dict(
        name="tiny-mla", family="deepseek_v3", n_layers=3, hidden_size=64, n_heads=4, n_kv_heads=4,
        head_dim=12, ffn_hidden_size=96, vocab_size=100, max_position_embeddings=64, n_experts=8,
        n_experts_active=2, n_shared_experts=1, moe_ffn_hidden_size=16, first_dense_layers=1,
        q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
    )  # fmt: skip
    return ModelSpec(**{**fields, **changes})


SHAPES = {
    "llama": llama_3_8b(),
    "opt": ModelSpec(
        name="opt", family="opt", n_layers=2, hidden_size=32, n_heads=4, n_kv_heads=4, head_dim=8,
        ffn_hidden_size=64, vocab_size=100, max_position_embeddings=64, tied_embeddings=True, gated_ffn=False,
        norm="layernorm", qkv_bias=True, out_bias=True, ffn_bias=True, learned_positions=66,
    ),
    "bloom": ModelSpec(
        name="bloom", family="bloom", n_layers=2, hidden_size=32, n_heads=4, n_kv_heads=4, head_dim=8,
        ffn_hidden_size=128, vocab_size=100, max_position_embeddings=2048, tied_embeddings=True,
        gated_ffn=False, norm="layernorm", qkv_bias=True, out_bias=True, ffn_bias=True, embedding_norm=True,
    ),
    "mixtral": ModelSpec(
        name="mixtral", family="mixtral", n_layers=2, hidden_size=32, n_heads=4, n_kv_heads=2, head_dim=8,
        ffn_hidden_size=48, vocab_size=100, max_position_embeddings=64, n_experts=4, n_experts_active=2,
        moe_ffn_hidden_size=48,
    ),
    "mla": tiny_mla(),
    "mla_no_q_lora": tiny_mla(q_lora_rank=0, first_dense_layers=0, n_shared_experts=2),
}  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES)
def test_parts_add_up(shape: str) -> None:
    model = SHAPES[shape]
    assert sum(model.params_by_part.values()) == model.params_total


@pytest.mark.parametrize("shape", SHAPES)
def test_layers_plus_outside_make_the_total(shape: str) -> None:
    model = SHAPES[shape]
    in_layers = sum(model.layer_params(i) for i in range(model.n_layers))
    assert in_layers + model.params_outside_layers == model.params_total
    assert model.params_outside_layers == (
        model.params_by_part["embedding"] + model.params_by_part["position_embedding"]
        + model.params_by_part["embedding_norm"] + model.params_by_part["final_norm"] + model.params_by_part["lm_head"]
    )  # fmt: skip


def test_llama_3_8b_exact() -> None:
    model = llama_3_8b()
    h, v = 4096, 128256
    assert model.params_total == 8_030_261_248
    assert model.attention_params == h * (4096 + 2 * 1024) + 4096 * h  # q, k, v (8 KV heads of 128), o
    assert model.dense_ffn_params == 3 * h * 14336
    assert model.params_by_part["embedding"] == model.params_by_part["lm_head"] == v * h
    assert model.params_by_part["layer_norms"] == 32 * 2 * h and model.params_by_part["final_norm"] == h


def test_llama_3_70b_exact() -> None:
    model = dataclasses.replace(llama_3_8b(), n_layers=80, hidden_size=8192, n_heads=64, ffn_hidden_size=28672)
    assert model.params_total == 70_553_706_496


def test_mla_attention_counts_projections_and_norms_once() -> None:
    model = tiny_mla()
    # q_a 64x24, q_b 24x(4*12), kv_a 64x(16+4), kv_b 16x(4*(8+8)), o (4*8)x64: the shapes transformers builds.
    assert model.attention_params == 64 * 24 + 24 * 48 + 64 * 20 + 16 * 64 + 32 * 64
    # pre-attention and pre-FFN RMSNorms plus the q_a (24) and kv_a (16) RMSNorms.
    assert model.layer_norm_params == 2 * 64 + 24 + 16
    assert model.dense_layer_params == model.attention_params + model.dense_ffn_params + model.layer_norm_params
    no_q_lora = tiny_mla(q_lora_rank=0)
    assert no_q_lora.attention_params == 64 * 48 + 64 * 20 + 16 * 64 + 32 * 64
    assert no_q_lora.layer_norm_params == 2 * 64 + 16


def test_moe_counts() -> None:
    model = tiny_mla()
    expert = 3 * 64 * 16
    assert model.expert_params == expert and model.router_params == 8 * 64
    assert (model.n_dense_layers, model.n_moe_layers) == (1, 2)
    assert model.params_by_part["routed_experts"] == 2 * 8 * expert
    assert model.params_by_part["shared_experts"] == 2 * 1 * expert
    assert model.params_active == model.params_total - 2 * (8 - 2) * expert
    assert model.moe_layer_active_params == model.moe_layer_params - 6 * expert
    assert [model.layer_params(i) for i in range(3)] == [model.dense_layer_params] + [model.moe_layer_params] * 2


def test_biases_and_learned_positions() -> None:
    opt = SHAPES["opt"]
    h, f = 32, 64
    assert opt.attention_params == 4 * h * h + 4 * h
    assert opt.dense_ffn_params == 2 * h * f + f + h
    assert opt.params_by_part["position_embedding"] == 66 * h and opt.params_by_part["lm_head"] == 0
    assert opt.layer_norm_params == 2 * 2 * h  # weight and bias, twice
    assert SHAPES["bloom"].params_by_part["embedding_norm"] == 2 * h


def test_dense_model_is_all_active() -> None:
    assert llama_3_8b().params_active == llama_3_8b().params_total


def test_kv_cache_elements() -> None:
    assert llama_3_8b().kv_cache_elems_per_token_per_layer == 2 * 8 * 128
    assert llama_3_8b().kv_heads_for_sharding == 8
    mla = tiny_mla()
    assert mla.kv_cache_elems_per_token_per_layer == 16 + 4  # the latent and the shared rope key
    assert mla.kv_heads_for_sharding == 1
    assert (mla.attention_qk_dim, mla.attention_v_dim) == (12, 8)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"family": "gpt2"}, "family 'gpt2'"),
        ({"n_kv_heads": 3}, "n_heads(32) % n_kv_heads(3) != 0"),
        ({"n_layers": 0}, "n_layers = 0 must be > 0"),
        ({"norm": "batchnorm"}, "norm 'batchnorm'"),
        ({"n_experts": 4, "n_experts_active": 5, "moe_ffn_hidden_size": 8}, "n_experts_active(5) <= n_experts(4)"),
    ],
)
def test_validation(changes: dict, words: str) -> None:
    with pytest.raises(ValueError, match=r".*") as info:
        dataclasses.replace(llama_3_8b(), **changes)
    assert words in str(info.value)


def test_spec_is_frozen_and_hashable() -> None:
    model = llama_3_8b()
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.n_layers = 1  # type: ignore[misc]
    assert hash(model) == hash(llama_3_8b())
