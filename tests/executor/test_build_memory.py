"""The build's host peak, measured (``hpi.executor.hostmem``: the resident set's high-water mark during the
build) beside the planner's build moment (``hpi.planner.cost.build``), on a ~250M-parameter Llama shape in bf16
(0.5 GB of weights, so the allocator's and the libraries' own few MB stay under the 10% the planner is held to).

On the CPU the "device" is host memory too, so a resident build shows its weights there; an 8/4-bit build's
quantization temporaries (on the GPU on a GPU machine) land on the host as well, so the quantized build is
measured on the GPU (benchmarks/results/2026-12-03-h200-moe)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from hpi.executor.launch import launch  # noqa: E402
from hpi.executor.spec import RunSpec  # noqa: E402
from hpi.planner.catalog import load_model  # noqa: E402
from hpi.planner.cost.shape import module_table  # noqa: E402
from hpi.planner.specs.plan import Plan  # noqa: E402
from hpi.planner.specs.workload import Workload  # noqa: E402

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024, "intermediate_size": 4096,
    "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32000,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("build-memory") / "config.json"
    path.write_text(json.dumps(CONFIG))
    return str(path)


def _build(model_path: str, plan: Plan, out) -> tuple[float, dict]:
    """(bytes the resident set grew by during the build, the planner's memory prediction)."""
    spec = RunSpec(plan=plan, model=model_path, workload=Workload(8, 2), device="cpu", dtype="bf16",
                   hardware="h200-1gpu", out_dir=str(out))
    rank = launch(spec, timeout_s=300).ranks[0]
    assert rank.host_build_peak_bytes > rank.host_rss_before_build_bytes > 0
    doc = json.loads((out / "record.json").read_text())
    return rank.host_build_peak_bytes - rank.host_rss_before_build_bytes, doc["predicted"]["memory"]


def test_a_16_bit_offload_build_peaks_at_the_kept_weights_plus_the_tensor_in_flight(model_path, tmp_path):
    grown, memory = _build(model_path, Plan(offload="cpu", pin_memory=False), tmp_path)
    predicted = memory["build_bytes"] - memory["cpu"]["process"]
    largest = 32000 * 1024 * 2  # the embedding / LM head in bf16
    assert memory["build_transient_bytes"] == pytest.approx(largest)
    assert predicted == pytest.approx(memory["cpu"]["offloaded_weights"] + largest)
    assert grown == pytest.approx(predicted, rel=0.10)


def test_a_resident_build_on_the_cpu_holds_the_stage_and_one_drawn_tensor(model_path, tmp_path):
    grown, memory = _build(model_path, Plan(), tmp_path)
    assert memory["build_transient_bytes"] == 0.0  # on a GPU machine the host holds nothing of it
    largest = module_table(load_model(model_path)).largest_tensor.max() * 2
    assert grown == pytest.approx(memory["gpu"]["resident_weights"] + largest, rel=0.10)
