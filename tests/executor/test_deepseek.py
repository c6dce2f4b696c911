"""DeepSeek-V3 (MLA, a dense first layer, shared + routed experts) in the executor: greedy tokens identical to
transformers' own ``DeepseekV3ForCausalLM.generate`` on one rank, under ZeRO-3 CPU offload, TP 2 and PP 2; a
checkpoint saved with DeepSeek's per-expert names (``mlp.experts.<e>.gate_proj.weight``) read slice-wise under
TP 2; heads cut whole; the built stages' parameter count is the planner's.

The reference loads the seed-0 checkpoint through transformers' own ``from_pretrained``, which fuses the experts
itself. fp32, a reduced config of DeepSeek-V3's structure (3 layers, the first dense; 8 routed experts in 2
groups, top-2 from 1 group, 1 shared expert; query LoRA; yarn rotary with interleaved pairs), DeepSpeed on its
CPU accelerator with gloo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from transformers import DynamicCache  # noqa: E402

from hpi.executor.experts import RoutedExperts  # noqa: E402
from hpi.executor.launch import launch  # noqa: E402
from hpi.executor.modeling import ShardSpec, build_stage, load_hf_config  # noqa: E402
from hpi.executor.spec import RunSpec  # noqa: E402
from hpi.executor.tp import RowParallelLinear, shard_index  # noqa: E402
from hpi.executor.weights import (  # noqa: E402
    INDEX_NAME,
    CheckpointReader,
    full_state_dict,
    param_table,
    write_checkpoint,
)
from hpi.executor.worker import prompt_batch  # noqa: E402
from hpi.planner.catalog import load_model  # noqa: E402
from hpi.planner.specs.plan import Plan  # noqa: E402
from hpi.planner.specs.workload import Workload  # noqa: E402
from tests.executor.test_modeling import hf_generate  # noqa: E402

CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 64,
    "intermediate_size": 96, "moe_intermediate_size": 16, "num_hidden_layers": 3, "first_k_dense_replace": 1,
    "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 16,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8, "n_shared_experts": 1,
    "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
    "vocab_size": 512, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float32",
}
# No query LoRA (a plain q_proj, as DeepSeek-V2-Lite), one expert group, two shared experts.
NO_Q_LORA = {**CONFIG, "q_lora_rank": None, "n_group": 1, "topk_group": 1, "n_shared_experts": 2}
HEADS = dict(n_heads=4, n_kv_heads=4, head_dim=8)
WORKLOAD = Workload(prompt_len_tokens=10, gen_len_tokens=5)
BATCH = 2
STREAMED = dict(offload="cpu", pin_memory=False, persistence_threshold_elems=64)  # every matrix is fetched per use
LAYOUTS = {
    "zero3-cpu-offload": Plan(batch_size=BATCH, **STREAMED),
    "tp2": Plan(tp=2, batch_size=BATCH),
    "pp2": Plan(pp=2, batch_size=BATCH, micro_batches=2),
    "tp2-zero3-cpu-offload": Plan(tp=2, batch_size=BATCH, **STREAMED),
    # each decoder layer one ZeRO-3 leaf: its attention, router, shared and every routed expert gathered at once
    "zero3-cpu-offload-layer-leaves": Plan(batch_size=BATCH, zero3_leaf="layer", **STREAMED),
}


def _write(tmp_path_factory, name: str, config: dict) -> str:
    path = tmp_path_factory.mktemp(name) / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return _write(tmp_path_factory, "deepseek", CONFIG)


def _saved(tmp_path_factory, name: str, config: dict) -> str:
    """The seed-0 random model of ``config`` saved as DeepSeek stores it (each expert apart), in several files."""
    hf = load_hf_config(_write(tmp_path_factory, name, config))
    return str(write_checkpoint(full_state_dict(hf, seed=0, dtype=torch.float32), hf,
                                tmp_path_factory.mktemp(f"{name}-ckpt"), shard_size_bytes=2**17))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    return {"q-lora": _saved(tmp_path_factory, "q-lora", CONFIG),
            "no-q-lora": _saved(tmp_path_factory, "no-q-lora", NO_Q_LORA)}


def _spec(plan: Plan, model: str, out_dir, **kw) -> RunSpec:
    return RunSpec(plan=plan, model=model, workload=WORKLOAD, device="cpu", dtype="fp32", out_dir=str(out_dir), **kw)


def _reference_model(checkpoint: str):
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference_tokens(model_path, checkpoints) -> list[list[int]]:
    model = _reference_model(checkpoints["q-lora"])
    ids = prompt_batch(_spec(Plan(batch_size=BATCH), model_path, "unused"), CONFIG["vocab_size"]).ids
    return hf_generate(model, ids, WORKLOAD.gen_len_tokens).tolist()


def test_checkpoint_names_are_deepseeks_per_expert_ones(model_path, checkpoints):
    names = set(param_table(load_hf_config(model_path)))
    assert {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.layers.2.mlp.experts.7.gate_proj.weight", "model.layers.2.mlp.experts.7.up_proj.weight",
            "model.layers.2.mlp.experts.7.down_proj.weight", "model.layers.1.mlp.shared_experts.down_proj.weight",
            "model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"} <= names
    assert not any("gate_up_proj" in n or "layers.0.mlp.experts" in n for n in names)
    index = json.loads((Path(checkpoints["q-lora"]) / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == names
    assert len(set(index["weight_map"].values())) >= 2


# ---- tensor-parallel cuts ---------------------------------------------------------------------------
def test_q_b_and_kv_b_are_cut_by_whole_heads():
    """Rows of q_b_proj are [head, qk_nope + qk_rope], of kv_b_proj [head, qk_nope + v]: rank 1 of 2 holds
    heads 2 and 3 whole."""
    for name, per_head in (("q_b_proj", 24), ("kv_b_proj", 32), ("q_proj", 24)):
        full = torch.arange(4)[:, None].expand(4, per_head).reshape(4 * per_head, 1).expand(4 * per_head, 16)
        part = shard_index(f"model.layers.0.self_attn.{name}.weight", tuple(full.shape), tp_rank=1, tp_size=2,
                           **HEADS)
        cut = part.apply(full)
        assert cut.shape == (2 * per_head, 16)
        assert cut[:, 0].unique().tolist() == [2, 3]  # whole heads 2 and 3
        assert (cut[:per_head] == 2).all() and (cut[per_head:] == 3).all()
    o = shard_index("model.layers.0.self_attn.o_proj.weight", (64, 64), tp_rank=1, tp_size=2, **HEADS)
    assert (o.dim, o.start, o.stop) == (1, 32, 64)  # row-parallel: heads 2-3 of the v_head_dim * heads inputs


@pytest.mark.parametrize("name", ["self_attn.q_a_proj.weight", "self_attn.q_a_layernorm.weight",
                                  "self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_layernorm.weight",
                                  "mlp.gate.weight", "mlp.gate.e_score_correction_bias"])
def test_the_latent_and_the_router_are_whole_on_every_rank(name):
    assert shard_index(f"model.layers.1.{name}", (24, 64), tp_rank=1, tp_size=2, **HEADS) is None


def test_tp2_stage_shapes(model_path):
    """Rank 0 of 2: half the heads and half of every FFN width; the dense MLP's down projection all-reduces
    itself, the shared experts' does not (the MoE block's output is all-reduced once)."""
    config = load_hf_config(model_path)
    stage = build_stage(config, ShardSpec.whole(3, tp_rank=0, tp_size=2), dtype=torch.float32, device="meta")
    shapes = {n: tuple(p.shape) for n, p in stage.named_parameters() if n.startswith(("layers.0.", "layers.1."))}
    assert shapes["layers.0.self_attn.q_a_proj.weight"] == (32, 64)
    assert shapes["layers.0.self_attn.q_b_proj.weight"] == (2 * 24, 32)
    assert shapes["layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (16 + 8, 64)
    assert shapes["layers.0.self_attn.kv_b_proj.weight"] == (2 * 32, 16)
    assert shapes["layers.0.self_attn.o_proj.linear.weight"] == (64, 2 * 16)
    assert shapes["layers.0.mlp.gate_proj.weight"] == (48, 64)
    for e in range(8):
        assert shapes[f"layers.1.mlp.experts.{e}.gate_proj.weight"] == (8, 64)
        assert shapes[f"layers.1.mlp.experts.{e}.up_proj.weight"] == (8, 64)
        assert shapes[f"layers.1.mlp.experts.{e}.down_proj.weight"] == (64, 8)
    assert shapes["layers.1.mlp.shared_experts.down_proj.weight"] == (64, 8)
    assert shapes["layers.1.mlp.gate.weight"] == (8, 64)
    assert isinstance(stage.layers[0].mlp.down_proj, RowParallelLinear)
    assert type(stage.layers[1].mlp.shared_experts.down_proj) is torch.nn.Linear
    assert isinstance(stage.layers[1].mlp.experts, RoutedExperts)
    assert type(stage.layers[1].mlp.experts[3].down_proj) is torch.nn.Linear
    assert isinstance(stage.layers[1].self_attn.o_proj, RowParallelLinear)


def test_a_tp_the_experts_cannot_split_is_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**CONFIG, "moe_intermediate_size": 18}))
    with pytest.raises(ValueError, match=r"moe_intermediate_size\(18\) % tp\(4\) != 0"):
        build_stage(load_hf_config(str(path)), ShardSpec.whole(3, 0, 4), device="meta")


# ---- one process: logits against transformers --------------------------------------------------------
def _forward_steps(stages, ids: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], list[DynamicCache]]:
    """Prefill ``ids`` through the stages, then ``steps`` greedy one-token steps over each stage's cache: the
    logits of each forward, and the caches."""
    caches = [DynamicCache() for _ in stages]
    out, x, pos = [], ids, torch.arange(ids.shape[1])
    for _ in range(steps + 1):
        h = x
        for stage, cache in zip(stages, caches):
            h = stage(h, cache, pos)
        out.append(h)
        x, pos = h.argmax(-1, keepdim=True), pos[-1:] + 1
    return out, caches


@pytest.mark.parametrize("variant,split", [("q-lora", [3]), ("q-lora", [1, 2]), ("q-lora", [2, 1]),
                                           ("no-q-lora", [1, 2])])
def test_stages_match_transformers_with_the_latent_cache(checkpoints, variant, split):
    """Prefill and decode steps through the latent cache, on one stage and on pipeline splits on either side of
    the first MoE layer (a stage's local layer 0 may be global layer 1 or 2: both MoE); seeded weights."""
    config = load_hf_config(None, checkpoints[variant])
    reference = _reference_model(checkpoints[variant])
    stages = [build_stage(config, ShardSpec.for_stage(split, i), dtype=torch.float32) for i in range(len(split))]
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, caches = _forward_steps(stages, ids, steps=3)
        cache, x = DynamicCache(config=config), ids
        for logits in ours:
            want = reference(x, cache=cache, use_cache=True).logits[:, -1].float()
            torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
            x = want.argmax(-1, keepdim=True)
    kinds = [type(layer.mlp).__name__ for stage in stages for layer in stage.layers]
    assert kinds == ["DeepseekV3MLP", "DeepseekV3MoE", "DeepseekV3MoE"]
    assert stages[-1].layers[-1].self_attn.kv_b_proj.weight.shape == (4 * 32, 16)
    assert (stages[0].layers[0].self_attn.q_proj is None) == (variant == "q-lora")
    assert len(stages[0].layers) == split[0]
    # The cache holds the latent: kv_a_layernorm(kv) [b, 1, s, kv_lora_rank] and the rotated shared key
    # [b, 1, s, qk_rope_head_dim], as many elements per token and layer as the planner counts.
    layer = caches[0].layers[0]
    assert tuple(layer.keys.shape) == (2, 1, 9 + 3, 16) and tuple(layer.values.shape) == (2, 1, 9 + 3, 8)
    assert load_model(checkpoints[variant]).kv_cache_elems_per_token_per_layer == 16 + 8


# ---- the planner's view -------------------------------------------------------------------------------
def _sharded_total(config, tp: int, split: list[int]) -> int:
    """Parameters of every rank of every stage, built on the meta device: sharded ones summed over ranks,
    replicated ones once per stage."""
    table = param_table(config)
    heads = dict(n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads,
                 head_dim=config.head_dim)
    total = 0
    for i in range(len(split)):
        for r in range(tp):
            stage = build_stage(config, ShardSpec.for_stage(split, i, r, tp), device="meta")
            for pname, p in stage.named_parameters():
                hf = stage.hf_names[pname]
                cut = shard_index(hf, table[hf].shape, tp_rank=r, tp_size=tp, **heads)
                if cut is None:
                    total += p.numel() if r == 0 else 0
                else:  # less the vocab padding of the LM head
                    total += p.numel() // cut.padded * (cut.stop - cut.start)
    return total


def test_reduced_config_count_is_the_planners_and_transformers(model_path, checkpoints):
    config = load_hf_config(model_path)
    planner = load_model(model_path).params_total
    assert planner == sum(p.numel() for p in _reference_model(checkpoints["q-lora"]).parameters()) == 179_280
    assert _sharded_total(config, 1, [3]) == planner
    assert _sharded_total(config, 2, [1, 2]) == planner


def test_a_tp_ranks_layers_hold_what_the_planners_module_table_says(model_path):
    """Per TP rank (tp 2): a dense layer holds sharded / tp + replicated elements of the planner's DENSE kind,
    an MoE layer also n_experts routed experts of expert_sharded / tp each (hpi.planner.cost.shape)."""
    from hpi.planner.cost.shape import DENSE, MOE, module_table

    table = module_table(load_model(model_path))
    stage = build_stage(load_hf_config(model_path), ShardSpec.whole(3, 1, 2), device="meta")
    held = [sum(p.numel() for p in layer.parameters()) for layer in stage.layers]
    assert held[0] == table.sharded[DENSE] / 2 + table.replicated[DENSE]
    routed = table.n_experts[MOE] * table.expert_sharded[MOE] / 2
    assert held[1] == held[2] == table.sharded[MOE] / 2 + table.replicated[MOE] + routed


@pytest.mark.parametrize("name,tp", [("deepseek-v3", 8), ("kimi-k2", 8)])
def test_catalogue_shards_add_up_to_the_planner_count(name, tp):
    config = load_hf_config(name)
    n = config.num_hidden_layers
    assert _sharded_total(config, tp, [n // 2, n - n // 2]) == load_model(name).params_total


def test_kimi_k2_is_read_as_deepseek_v3():
    config = load_hf_config("kimi-k2")
    assert (config.model_type, config.n_routed_experts, config.first_k_dense_replace) == ("deepseek_v3", 384, 1)
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["rope_theta"] == 50000.0


# ---- real ranks: tokens against transformers' generate -----------------------------------------------
def test_one_rank_matches_transformers(model_path, reference_tokens, tmp_path):
    record = launch(_spec(Plan(batch_size=BATCH), model_path, tmp_path), timeout_s=300).to_json()
    assert record["tokens"] == reference_tokens
    assert record["model"]["params_total"] == 179_280 > record["model"]["params_active"]


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_transformers(name, model_path, reference_tokens, tmp_path):
    plan = LAYOUTS[name]
    record = launch(_spec(plan, model_path, tmp_path), timeout_s=300).to_json()
    assert record["tokens"] == reference_tokens
    assert record["world_size"] == plan.world_size
    if plan.is_offloaded:
        assert record["h2d"]["bytes_per_step"] > 0  # ZeRO-3 really streamed the weights
    if plan.zero3_leaf == "layer":  # DeepSpeed hooked the layers, not their modules: one each, and six outside them
        assert all(r["zero3_hooked_modules"] <= CONFIG["num_hidden_layers"] + 6 for r in record["ranks"])


def test_checkpoint_loads_slice_wise_into_tp2(model_path, checkpoints, reference_tokens, tmp_path):
    """MLA layers and per-expert weights from a safetensors checkpoint of several files, each TP rank reading
    its slices."""
    record = launch(_spec(Plan(tp=2, batch_size=BATCH), model_path, tmp_path, checkpoint=checkpoints["q-lora"]),
                    timeout_s=300).to_json()
    assert record["tokens"] == reference_tokens


def test_a_quantized_checkpoint_is_refused_by_the_reader(model_path, tmp_path):
    """FP8 blocks copied into 16-bit weights would lose their scales: the reader refuses, whoever calls it."""
    config = load_hf_config(model_path)
    config.quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    with pytest.raises(NotImplementedError, match="quantization_config"):
        CheckpointReader(tmp_path, config)


# Every matrix's input width a multiple of 64 per rank at tp 1 and 2 (DeepSpeed's quantization group size).
QUANTIZABLE = {**CONFIG, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 128,
               "num_hidden_layers": 2, "q_lora_rank": 64, "kv_lora_rank": 64, "qk_nope_head_dim": 32,
               "qk_rope_head_dim": 16, "v_head_dim": 32, "n_routed_experts": 4, "n_group": 1, "topk_group": 1,
               "vocab_size": 1024}


def test_4_bit_runs_stream_packed_bytes_and_split_over_tp2(tmp_path):
    """DeepSpeed quantizes every nn.Linear as it is built (hpi.executor.experts: the routed experts too); the
    weights are not the seeded ones, so this checks the run and the bytes streamed, not the tokens."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(QUANTIZABLE))

    def run(out: str, **plan):
        plan = Plan(offload="cpu", pin_memory=False, batch_size=BATCH, persistence_threshold_elems=0, **plan)
        return launch(_spec(plan, str(path), tmp_path / out), timeout_s=300)

    full, packed = run("w16").transfers.h2d.bytes_per_step, run("w4", weight_bits=4).transfers.h2d.bytes_per_step
    # fp32 model: 4 bytes a weight; 4-bit: 0.5 + (scale + min) 2 x 4 bytes / 64. Norms and the router stay fp32.
    assert packed / full == pytest.approx((0.5 + 8 / 64) / 4, rel=0.05)
    split = run("w4-tp2", weight_bits=4, tp=2)
    assert all(len(t) == WORKLOAD.gen_len_tokens for t in split.output.tokens)


# ---- refused before anything starts -------------------------------------------------------------------
@pytest.mark.parametrize("argv,why", [
    (("serve", "--model", "deepseek-v3"), "hpi serve cannot serve deepseek-v3 yet: its latent attention (MLA)"),
    (("serve", "--model", "kimi-k2"), "hpi serve cannot serve kimi-k2 yet"),
    (("run", "--model", "deepseek-v3", "--cuda-graphs"), "deepseek-v3's expert routing synchronizes the host"),
    (("run", "--model", "deepseek-v3", "--checkpoint", "{fp8}"), "stores FP8 block-quantized weights"),
])
def test_what_cannot_run_is_refused_in_one_line(argv, why, tmp_path, capsys):
    from hpi.cli.app import main

    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    (fp8 / "config.json").write_text(json.dumps({**CONFIG, "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}))
    argv = [a.replace("{fp8}", str(fp8)) for a in argv]
    assert main([*argv, "--device", "cpu", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert why in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
