"""8/4-bit weights through DeepSpeed's quantized initialization, on the CPU accelerator (real kernels).

Quantized runs build their modules inside ``deepspeed.zero.Init`` (which quantizes each weight as its
module is constructed), so their weights are not hpi's seeded ones: these tests check that the runs
complete on every layout and that ZeRO-3 streams the packed bytes (bits/8 per weight plus a scale and a
minimum in the model dtype per group of 64), not that tokens match.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from hpi.executor.launch import LaunchError, launch  # noqa: E402
from hpi.executor.spec import RunSpec  # noqa: E402
from hpi.planner.specs.plan import Plan  # noqa: E402
from hpi.planner.specs.workload import Workload  # noqa: E402
from hpi.records import RunRecord  # noqa: E402

# Every matrix's input width a multiple of 64 per rank at tp 1 and 2 (DeepSpeed's group size).
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
          "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
          "initializer_range": 0.02, "hidden_act": "silu"}
GEN = 5


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(CONFIG))
    return str(path)


def run(model_path, out, **plan) -> RunRecord:
    plan = Plan(offload="cpu", pin_memory=False, batch_size=2, persistence_threshold_elems=0, **plan)
    spec = RunSpec(plan=plan, model=model_path, workload=Workload(8, GEN), device="cpu", dtype="fp32", out_dir=str(out))
    return launch(spec, timeout_s=300)


def test_quantized_runs_stream_packed_bytes(model_path, tmp_path):
    bytes_per_step = {bits: run(model_path, tmp_path / str(bits), weight_bits=bits).transfers.h2d.bytes_per_step
                      for bits in (16, 8, 4)}
    # fp32 model: 4 bytes a weight unquantized; bits/8 + (scale + min) 2 x 4 bytes / 64 when quantized.
    # Norm weights stay fp32, so the ratios sit a little above the pure-matrix ones.
    assert bytes_per_step[8] / bytes_per_step[16] == pytest.approx((1 + 8 / 64) / 4, rel=0.05)
    assert bytes_per_step[4] / bytes_per_step[16] == pytest.approx((0.5 + 8 / 64) / 4, rel=0.05)


def test_quantized_tp2_and_pp2_complete(model_path, tmp_path):
    for name, plan in {"tp2": {"tp": 2}, "pp2": {"pp": 2, "micro_batches": 2}}.items():
        record = run(model_path, tmp_path / name, weight_bits=4, **plan)
        assert record.output.generated_tokens_per_sequence == GEN
        assert all(len(t) == GEN for t in record.output.tokens)


def test_widths_that_do_not_fit_the_quantization_group_are_refused_with_the_fix(tmp_path):
    spec = RunSpec(plan=Plan(offload="cpu", pin_memory=False, weight_bits=4, batch_size=2), model="tiny-llama",
                   workload=Workload(8, 2), device="cpu", dtype="fp32", out_dir=str(tmp_path))
    with pytest.raises(LaunchError, match="not a multiple of the quantization group"):
        launch(spec, timeout_s=300)


def test_4_bit_layer_leaves_stream_the_same_bytes_with_fewer_hooks(model_path, tmp_path):
    """Each decoder layer one ZeRO-3 leaf (zero3_leaf layer) gathers the packed weights of the whole layer at once:
    the same bytes a step as DeepSpeed's per-module hooks, with fewer modules hooked. (A quantized build draws its
    weights with the modules' own unseeded initializers, so its tokens differ from build to build: test_parity
    compares layer leaves' tokens at 16 bits.)"""
    module = run(model_path, tmp_path / "module", weight_bits=4)
    layer = run(model_path, tmp_path / "layer", weight_bits=4, zero3_leaf="layer")
    assert all(len(t) == GEN for t in layer.output.tokens)
    assert layer.transfers.h2d.bytes_per_step == module.transfers.h2d.bytes_per_step
    assert module.ranks[0].zero3_hooked_modules - layer.ranks[0].zero3_hooked_modules == 12 * 2  # 2 layers
