"""Mixtral in the executor (routed experts one nn.Linear per projection, hpi.executor.experts): greedy tokens
identical to transformers' own ``generate`` on one rank, with the experts' FFN width split over TP 2, under
ZeRO-3 CPU offload, both, and PP 2; the same from a checkpoint saved with Mixtral's per-expert names
(``block_sparse_moe.experts.<e>.w1``), read slice-wise. The reference loads that checkpoint through
transformers' own ``from_pretrained``, which fuses the experts itself. fp32, a tiny Mixtral config (4 experts,
top 2), DeepSpeed on its CPU accelerator with gloo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from hpi.executor.experts import RoutedExperts  # noqa: E402
from hpi.executor.launch import launch  # noqa: E402
from hpi.executor.modeling import ShardSpec, build_stage, load_hf_config  # noqa: E402
from hpi.executor.spec import RunSpec  # noqa: E402
from hpi.executor.tp import shard_index  # noqa: E402
from hpi.executor.weights import INDEX_NAME, full_state_dict, param_table, write_checkpoint  # noqa: E402
from hpi.executor.worker import prompt_batch  # noqa: E402
from hpi.planner.specs.plan import Plan  # noqa: E402
from hpi.planner.specs.workload import Workload  # noqa: E402
from tests.executor.test_modeling import hf_generate  # noqa: E402

CONFIG = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
    "num_experts_per_tok": 2, "vocab_size": 512, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "sliding_window": None, "router_jitter_noise": 0.0, "torch_dtype": "float32",
}
WORKLOAD = Workload(prompt_len_tokens=10, gen_len_tokens=6)
BATCH = 2
LAYOUTS = {
    "one-rank": Plan(batch_size=BATCH),
    "tp2": Plan(tp=2, batch_size=BATCH),
    "zero3-cpu-offload": Plan(offload="cpu", pin_memory=False, batch_size=BATCH),
    "tp2-zero3-cpu-offload": Plan(tp=2, offload="cpu", pin_memory=False, batch_size=BATCH),
    "pp2": Plan(pp=2, batch_size=BATCH),
    # each decoder layer one ZeRO-3 leaf: attention, router and all 4 experts gathered at once
    "zero3-cpu-offload-layer-leaves": Plan(offload="cpu", pin_memory=False, batch_size=BATCH, zero3_leaf="layer"),
}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral") / "config.json"
    path.write_text(json.dumps(CONFIG))
    return str(path)


def _spec(plan: Plan, model: str, out_dir, **kw) -> RunSpec:
    return RunSpec(plan=plan, model=model, workload=WORKLOAD, device="cpu", dtype="fp32", out_dir=str(out_dir), **kw)


@pytest.fixture(scope="module")
def checkpoint(model_path, tmp_path_factory) -> str:
    """The seed-0 random model saved as Mixtral stores it: each expert's w1 / w2 / w3 apart, in several files."""
    config = load_hf_config(model_path)
    return str(write_checkpoint(full_state_dict(config, seed=0, dtype=torch.float32), config,
                                tmp_path_factory.mktemp("mixtral-ckpt"), shard_size_bytes=2**18))


@pytest.fixture(scope="module")
def reference_tokens(model_path, checkpoint) -> list[list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = prompt_batch(_spec(Plan(batch_size=BATCH), model_path, "unused"), CONFIG["vocab_size"]).ids
    return hf_generate(model, ids, WORKLOAD.gen_len_tokens).tolist()


def test_checkpoint_names_are_mixtrals_per_expert_ones(model_path, checkpoint):
    names = set(param_table(load_hf_config(model_path)))
    assert {"model.layers.1.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.experts.3.w1.weight",
            "model.layers.1.block_sparse_moe.experts.3.w2.weight",
            "model.layers.1.block_sparse_moe.experts.3.w3.weight"} <= names
    assert not any("gate_up_proj" in n or ".mlp." in n for n in names)
    index = json.loads((Path(checkpoint) / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == names
    assert len(set(index["weight_map"].values())) >= 2


def test_expert_projections_split_their_ffn_width():
    heads = dict(n_heads=4, n_kv_heads=2, head_dim=16)
    expert = "model.layers.0.block_sparse_moe.experts.2"
    w1 = shard_index(f"{expert}.w1.weight", (96, 64), tp_rank=1, tp_size=2, **heads)
    w3 = shard_index(f"{expert}.w3.weight", (96, 64), tp_rank=1, tp_size=2, **heads)
    w2 = shard_index(f"{expert}.w2.weight", (64, 96), tp_rank=1, tp_size=2, **heads)
    assert (w1.dim, w1.start, w1.stop) == (w3.dim, w3.start, w3.stop) == (0, 48, 96)
    assert (w2.dim, w2.start, w2.stop) == (1, 48, 96)
    assert shard_index("model.layers.0.block_sparse_moe.gate.weight", (4, 64), tp_rank=1, tp_size=2,
                       **heads) is None  # the router is whole on every rank


def test_tp2_shards_hold_half_of_every_expert(model_path):
    config = load_hf_config(model_path)
    stage = build_stage(config, ShardSpec.whole(2, tp_rank=0, tp_size=2), dtype=torch.float32, device="meta")
    shapes = {n: tuple(p.shape) for n, p in stage.named_parameters() if ".mlp." in n and n.startswith("layers.0.")}
    assert shapes["layers.0.mlp.gate.weight"] == (4, 64)
    for e in range(4):
        assert shapes[f"layers.0.mlp.experts.{e}.gate_proj.weight"] == (48, 64)
        assert shapes[f"layers.0.mlp.experts.{e}.up_proj.weight"] == (48, 64)
        assert shapes[f"layers.0.mlp.experts.{e}.down_proj.weight"] == (64, 48)
    assert len(shapes) == 1 + 4 * 3
    assert stage.hf_name("layers.1.mlp.experts.2.down_proj.weight") == (
        "model.layers.1.block_sparse_moe.experts.2.w2.weight")


def test_experts_are_linears_deepspeed_quantizes_each_a_zero3_leaf(model_path):
    from deepspeed.inference.quantization.utils import WEIGHT_QUANTIZATION_LAYERS
    from deepspeed.utils import z3_leaf_module

    config = load_hf_config(model_path)
    stage = build_stage(config, ShardSpec.whole(2), dtype=torch.float32, device="meta")
    experts = stage.layers[0].mlp.experts
    assert isinstance(experts, RoutedExperts) and all(z3_leaf_module(expert) for expert in experts)
    matrices = [(n, m) for n, m in stage.named_modules() if getattr(getattr(m, "weight", None), "ndim", 0) >= 2]
    unquantized = [n for n, m in matrices if type(m) not in WEIGHT_QUANTIZATION_LAYERS]
    assert unquantized == ["layers.0.mlp.gate", "layers.1.mlp.gate"]  # only the routers (4 x 64) stay 16-bit


def test_routed_experts_compute_what_transformers_fused_experts_do():
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = load_hf_config_from_dict()
    fused = MixtralExperts(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        fused.gate_up_proj.normal_(0.0, 0.1, generator=gen)
        fused.down_proj.normal_(0.0, 0.1, generator=gen)
    ours = RoutedExperts(4, 64, 96, "silu")
    with torch.no_grad():
        for e, expert in enumerate(ours):
            expert.gate_proj.weight.copy_(fused.gate_up_proj[e, :96])
            expert.up_proj.weight.copy_(fused.gate_up_proj[e, 96:])
            expert.down_proj.weight.copy_(fused.down_proj[e])
        hidden = torch.randn(7, 64, generator=gen)
        index = torch.tensor([[0, 2], [2, 0], [1, 2], [0, 1], [2, 1], [0, 2], [1, 0]])  # expert 3: no token
        weights = torch.rand(7, 2, generator=gen)
        assert torch.allclose(ours(hidden, index, weights), fused(hidden, index, weights), rtol=0, atol=1e-6)


def load_hf_config_from_dict():
    return transformers.MixtralConfig(**{k: v for k, v in CONFIG.items() if k != "architectures"})


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_transformers(name, model_path, reference_tokens, tmp_path):
    record = launch(_spec(LAYOUTS[name], model_path, tmp_path), timeout_s=300).to_json()
    assert record["tokens"] == reference_tokens
    assert record["model"]["params_total"] > record["model"]["params_active"]  # top-2 of 4 experts
    if LAYOUTS[name].zero3_leaf == "layer":  # DeepSpeed hooked the layers, not their modules
        assert all(r["zero3_hooked_modules"] <= CONFIG["num_hidden_layers"] + 6 for r in record["ranks"])


@pytest.mark.parametrize("plan", [Plan(tp=2, batch_size=BATCH),
                                  Plan(tp=2, offload="cpu", pin_memory=False, batch_size=BATCH)],
                         ids=["tp2", "tp2-zero3-cpu-offload"])
def test_a_per_expert_checkpoint_loads_slice_wise(plan, model_path, checkpoint, reference_tokens, tmp_path):
    record = launch(_spec(plan, model_path, tmp_path, checkpoint=checkpoint), timeout_s=300).to_json()
    assert record["tokens"] == reference_tokens


def test_four_bit_experts_stream_packed_bytes(tmp_path):
    """DeepSpeed quantizes the experts (nn.Linear): a 4-bit forward streams about (0.5 + 8/64) / 4 of the fp32
    one (half a byte a weight, an fp32 scale and minimum per group of 64). Fused 3-D experts stayed at full width
    (hpi.executor.experts). Expert FFN width 128: a multiple of the quantization group."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**CONFIG, "intermediate_size": 128}))
    per_step = {}
    for bits in (16, 4):
        plan = Plan(offload="cpu", pin_memory=False, batch_size=BATCH, weight_bits=bits, persistence_threshold_elems=0)
        record = launch(_spec(plan, str(path), tmp_path / str(bits)), timeout_s=300)
        per_step[bits] = record.transfers.h2d.bytes_per_step
    assert per_step[4] / per_step[16] == pytest.approx((0.5 + 8 / 64) / 4, rel=0.05)
