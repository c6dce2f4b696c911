"""Mixtral (transformers' fused experts) in the executor: greedy tokens identical to transformers' own
``generate`` on one rank, with the experts' FFN width split over TP 2, under ZeRO-3 CPU offload, and both.
fp32, a tiny Mixtral config (4 experts, top 2), DeepSpeed on its CPU accelerator with gloo."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from hpi.executor.launch import launch  # noqa: E402
from hpi.executor.modeling import ShardSpec, build_stage, load_hf_config  # noqa: E402
from hpi.executor.spec import RunSpec  # noqa: E402
from hpi.executor.tp import shard_index  # noqa: E402
from hpi.executor.weights import full_state_dict  # noqa: E402
from hpi.executor.worker import prompt_batch  # noqa: E402
from hpi.planner.specs.plan import Plan  # noqa: E402
from hpi.planner.specs.workload import Workload  # noqa: E402

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
}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral") / "config.json"
    path.write_text(json.dumps(CONFIG))
    return str(path)


def _spec(plan: Plan, model: str, out_dir) -> RunSpec:
    return RunSpec(plan=plan, model=model, workload=WORKLOAD, device="cpu", dtype="fp32", out_dir=str(out_dir))


@pytest.fixture(scope="module")
def reference_tokens(model_path) -> list[list[int]]:
    config = load_hf_config(model_path)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(full_state_dict(config, seed=0, dtype=torch.float32))
    model.eval()
    ids = prompt_batch(_spec(Plan(batch_size=BATCH), model_path, "unused"), config.vocab_size).ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=WORKLOAD.gen_len_tokens,
                             min_new_tokens=WORKLOAD.gen_len_tokens, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def test_fused_gate_up_is_cut_inside_each_half():
    full = torch.arange(2 * 8 * 3).reshape(2, 8, 3)  # [E=2, 2f=8, h=3]: rows 0-3 gate, 4-7 up
    part = shard_index("model.layers.0.mlp.experts.gate_up_proj", tuple(full.shape), tp_rank=1, tp_size=2,
                       n_heads=4, n_kv_heads=2, head_dim=16)
    cut = part.apply(full)
    assert cut.shape == (2, 4, 3)
    assert torch.equal(cut, torch.cat([full[:, 2:4], full[:, 6:8]], dim=1))  # gate rows 2-3, up rows 6-7
    down = shard_index("model.layers.0.mlp.experts.down_proj", (2, 3, 4), tp_rank=1, tp_size=2,
                       n_heads=4, n_kv_heads=2, head_dim=16)
    assert (down.dim, down.start, down.stop) == (2, 2, 4)
    assert shard_index("model.layers.0.mlp.gate.weight", (4, 64), tp_rank=1, tp_size=2,
                       n_heads=4, n_kv_heads=2, head_dim=16) is None  # the router is whole on every rank


def test_tp2_shards_hold_half_of_every_expert(model_path):
    config = load_hf_config(model_path)
    stage = build_stage(config, ShardSpec.whole(2, tp_rank=0, tp_size=2), dtype=torch.float32, device="meta")
    shapes = {n: tuple(p.shape) for n, p in stage.named_parameters() if ".mlp." in n and n.startswith("layers.0.")}
    assert shapes == {"layers.0.mlp.gate.weight": (4, 64), "layers.0.mlp.experts.gate_up_proj": (4, 96, 64),
                      "layers.0.mlp.experts.down_proj": (4, 64, 48)}


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_transformers(name, model_path, reference_tokens, tmp_path):
    record = launch(_spec(LAYOUTS[name], model_path, tmp_path), timeout_s=300).to_json()
    assert record["tokens"] == reference_tokens
    assert record["model"]["params_total"] > record["model"]["params_active"]  # top-2 of 4 experts


def test_a_mixtral_checkpoint_is_refused_with_the_reason(model_path, tmp_path):
    config = load_hf_config(model_path)
    with pytest.raises(NotImplementedError, match="per-expert w1/w2/w3"):
        build_stage(config, ShardSpec.whole(2), checkpoint=str(tmp_path))
