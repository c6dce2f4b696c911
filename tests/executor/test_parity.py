"""Correctness of every layout on the CPU: greedy tokens identical to transformers' own ``generate``.

fp32, the tiny-llama model, DeepSpeed on its CPU accelerator with gloo (the real ZeRO-3 path, not a
mock), ranks started by ``hpi.executor.launch`` exactly as ``hpi run --device cpu`` starts them. The reference
is a plain single-process transformers model holding the same weights (same seed), generating greedily.
"""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from hpi.executor.launch import launch  # noqa: E402
from hpi.executor.modeling import load_hf_config  # noqa: E402
from hpi.executor.spec import RunSpec  # noqa: E402
from hpi.executor.weights import full_state_dict, save_checkpoint  # noqa: E402
from hpi.executor.worker import prompt_batch  # noqa: E402
from hpi.planner.specs.plan import Plan  # noqa: E402
from hpi.planner.specs.workload import Workload  # noqa: E402

MODEL = "tiny-llama"
WORKLOAD = Workload(prompt_len_tokens=12, gen_len_tokens=6)
BATCH = 4

LAYOUTS = {
    "zero3-cpu-offload": Plan(offload="cpu", pin_memory=False, batch_size=BATCH),
    "tp2": Plan(tp=2, batch_size=BATCH),
    "pp2-2-micro-batches": Plan(pp=2, batch_size=BATCH, micro_batches=2),
    "tp2-zero3-cpu-offload": Plan(tp=2, offload="cpu", pin_memory=False, batch_size=BATCH),
    "pp2-zero3-cpu-offload": Plan(pp=2, offload="cpu", pin_memory=False, batch_size=BATCH, micro_batches=2),
    "dp2-zero3-partitioned": Plan(dp=2, batch_size=BATCH),
    "tp2-pp2-zero3-cpu-offload": Plan(tp=2, pp=2, offload="cpu", pin_memory=False, batch_size=BATCH, micro_batches=2),
    "tp4-kv-heads-replicated": Plan(tp=4, batch_size=BATCH),  # 2 kv heads over 4 ranks: each holds a copy of one
    # each decoder layer one ZeRO-3 leaf (DeepSpeed's leaf_module config, the names local to each stage)
    "pp2-zero3-layer-leaves-cpu-offload": Plan(pp=2, offload="cpu", pin_memory=False, batch_size=BATCH,
                                               micro_batches=2, zero3_leaf="layer"),
}


def _spec(plan: Plan, out_dir, **kw) -> RunSpec:
    return RunSpec(plan=plan, model=MODEL, workload=WORKLOAD, device="cpu", dtype="fp32", out_dir=str(out_dir), **kw)


@pytest.fixture(scope="module")
def reference_tokens() -> list[list[int]]:
    """transformers, one process, the same weights and prompts, greedy."""
    config = load_hf_config(MODEL)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(full_state_dict(config, seed=0, dtype=torch.float32))
    model.eval()
    ids = prompt_batch(_spec(Plan(batch_size=BATCH), "unused"), config.vocab_size).ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=WORKLOAD.gen_len_tokens,
                             min_new_tokens=WORKLOAD.gen_len_tokens, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def test_single_process_matches_transformers(reference_tokens, tmp_path):
    record = launch(_spec(Plan(batch_size=BATCH), tmp_path), timeout_s=300).to_json()
    assert record["tokens"] == reference_tokens
    assert record["generated_tokens_per_sequence"] == WORKLOAD.gen_len_tokens


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_transformers(name, reference_tokens, tmp_path):
    plan = LAYOUTS[name]
    record = launch(_spec(plan, tmp_path, hardware="h200-2gpu" if plan.world_size <= 2 else None),
                    timeout_s=600).to_json()
    assert record["tokens"] == reference_tokens, name
    assert record["world_size"] == plan.world_size
    assert os.path.exists(tmp_path / "record.json")
    if plan.is_offloaded:
        assert record["h2d"]["bytes_per_step"] > 0  # ZeRO-3 really streamed the weights
    if plan.pp > 1:
        assert 0.0 <= record["pp_bubble_ratio"] < 1.0
    if plan.zero3_leaf == "layer":  # a Llama layer is 13 hooked modules per module, 1 as a leaf
        hooked = [r["zero3_hooked_modules"] for r in record["ranks"]]
        module_hooked = [r["zero3_hooked_modules"] for r in launch(
            _spec(plan.with_(zero3_leaf="module"), tmp_path / "module"), timeout_s=600).to_json()["ranks"]]
        assert [m - h for m, h in zip(module_hooked, hooked)] == [12 * 2, 12 * 2]  # 2 of tiny-llama's 4 layers a stage
    if plan.world_size <= 2:
        assert record["predicted"]["decode_step_s"] > 0 and "measured_vs_predicted" in record


def test_checkpoint_loads_shard_by_shard_into_tp2(reference_tokens, tmp_path):
    """A local HF checkpoint (several safetensors files) through the real loading path, on two TP ranks."""
    config = load_hf_config(MODEL)
    ckpt = save_checkpoint(config, seed=0, out_dir=tmp_path / "ckpt", dtype=torch.float32, shard_size_bytes=4 * 2**20)
    assert len(list(ckpt.glob("*.safetensors"))) >= 2
    record = launch(_spec(Plan(tp=2, batch_size=BATCH), tmp_path / "run", checkpoint=str(ckpt)),
                    timeout_s=300).to_json()
    assert record["tokens"] == reference_tokens


def test_sampling_is_identical_across_layouts(tmp_path):
    """Seeded sampling draws the same tokens whatever the layout (TP ranks agree, replicas are seeded)."""
    kw = {"temperature": 0.8, "top_p": 0.9, "seed": 3}
    single = launch(_spec(Plan(batch_size=BATCH), tmp_path / "a", **kw), timeout_s=300).output.tokens
    split = launch(_spec(Plan(tp=2, batch_size=BATCH), tmp_path / "b", **kw), timeout_s=300).output.tokens
    assert single == split


def test_variants_remeasure_the_same_build_at_other_batches(reference_tokens, tmp_path):
    """One build, three measurements: batch 2, then 4 (micro-batched), then 4 again with the KV cache offloaded."""
    plan = Plan(pp=2, offload="cpu", pin_memory=False, batch_size=2, micro_batches=1)
    variants = ({"batch_size": BATCH, "micro_batches": 2}, {"batch_size": BATCH, "kv_offload": True})
    record = launch(_spec(plan, tmp_path, variants=variants, warmup_steps=1, warmup_gen_len=2), timeout_s=300).to_json()
    assert record["plan"]["batch_size"] == 2
    assert record["tokens"] == reference_tokens[:2]  # random prompts draw row by row: batch 2 = the first rows of 4
    assert record["variant_records"] == ["variant-1/record.json", "variant-2/record.json"]
    docs = [json.loads((tmp_path / rel).read_text()) for rel in record["variant_records"]]
    assert [d["plan"]["batch_size"] for d in docs] == [BATCH, BATCH]
    assert [d["plan"]["micro_batches"] for d in docs] == [2, 1]
    assert docs[1]["plan"]["kv_offload"] is True
    for doc in docs:
        assert doc["tokens"] == reference_tokens
        assert doc["generated_tokens_per_sequence"] == WORKLOAD.gen_len_tokens
        assert doc["build_s"] == record["build_s"]  # measured on the one build


def test_a_variant_that_needs_a_rebuild_is_refused():
    with pytest.raises(ValueError, match="changes tp, which needs a new build"):
        _spec(Plan(batch_size=2), "unused", variants=({"batch_size": 4, "tp": 2},))
