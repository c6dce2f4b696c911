"""Differential test: our ZeRO-3 parameter-memory terms against DeepSpeed's own estimator.

DeepSpeed's ``estimate_zero3_model_states_mem_needs`` is a *training* estimate (16-bit params and grads
plus fp32 Adam states), so only its 16-bit parameter terms are comparable to an inference plan
(derivation in validation/notes_deepspeed_zero3_estimator.md):
- host copy with offload_param=cpu: cpu(opt cpu, param cpu) - cpu(opt cpu, param none) = 2P per node
- GPU shard without param offload: gpu(opt cpu, param none) - 4L = 2P / G
- gathered working set with param offload: half of gpu(cpu, cpu) = 2L, L the largest module's own params
The model is the one hpi's executor runs (``hpi.executor.modeling.build_stage`` on the meta device:
transformers' layers, routed experts one ZeRO-3 leaf module per expert). DeepSpeed, torch and transformers
are imported here only; the planner never imports them.
"""

from __future__ import annotations

import numpy as np
import pytest

from hpi.planner.catalog import load_model
from hpi.planner.cost.estimate import evaluate
from hpi.planner.cost.inputs import Knobs, make_arrangement
from hpi.planner.cost.memory import live_param_elems
from hpi.planner.cost.shape import DENSE, HEAD, MOE, module_table
from hpi.planner.cost.streaming import persistent_elems
from hpi.planner.specs.hardware import Efficiency, GpuSpec, HardwareProfile, HostSpec
from hpi.planner.specs.placement import Link, Placement
from hpi.planner.specs.plan import Plan
from hpi.planner.specs.workload import Workload

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")

MODELS = ["tiny-llama", "llama-3-8b", "llama-3-70b", "opt-30b", "mixtral-8x7b"]


def _meta_model(name: str, plan: Plan = Plan(offload="cpu")):
    """The catalogue model as hpi's executor builds it (one stage, every layer), on the meta device, with the ZeRO-3
    leaf modules DeepSpeed's engine flags from the config hpi renders for ``plan`` (engine.py
    ``apply_zero_leaf_module_config``): its default leaf classes (Mixtral's MoE block) or, with layer leaves, each
    layer."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.utils.z3_leaf_module import apply_zero_leaf_module_config

    from hpi.executor.modeling import ShardSpec, build_stage, load_hf_config
    from hpi.executor.render import ds_config

    config = load_hf_config(name)
    model = build_stage(config, ShardSpec.whole(config.num_hidden_layers), device="meta")
    zero = ds_config(plan, dtype="bf16", hidden_size=config.hidden_size,
                     stage_layers=config.num_hidden_layers)["zero_optimization"]
    apply_zero_leaf_module_config(model, DeepSpeedZeroConfig(**zero).leaf_module)
    return model


def _gathered_units(module):
    """The modules ZeRO-3 gathers at once: a leaf module (``_z3_leaf``) with everything below it, any other
    module with its own parameters (parameter_offload.py ``_register_deepspeed_module``)."""
    if getattr(module, "_z3_leaf", False):
        yield module.parameters()
        return
    yield module.parameters(recurse=False)
    for child in module.children():
        yield from _gathered_units(child)


def _deepspeed_counts(model) -> tuple[int, int]:
    """DeepSpeed's P and L, counted by tensor identity (``model_to_params`` uses data_ptr, 0 on meta); a tied
    LM head counts once, as the HF model shares the embedding's tensor."""
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    if getattr(model.full_config, "tie_word_embeddings", False) and model.lm_head is not None:
        total -= model.lm_head.weight.numel()
    largest = max(sum(p.numel() for p in params) for params in _gathered_units(model))
    return total, largest


def _hardware(gpus: int) -> HardwareProfile:
    return HardwareProfile(
        name="ds-diff", description="", os="linux", n_nodes=1, gpus_per_node=gpus,
        gpu=GpuSpec("GPU", 1e15, 1e15, 1e12), host=HostSpec(1e15, 1e15, 64, 1, 1e10, 1e10), nvme=None,
        efficiency=Efficiency(),
    )


def _placement(dp: int) -> Placement:
    nvlink = Link(100e9, 1e-6, "nvlink") if dp > 1 else Link.local()
    return Placement(1, 1, dp, tuple(f"n0.gpu{i}" for i in range(dp)), Link.local(), nvlink, Link.local(),
                     25e9, 5e9, 0.0, 1)


def _ours(name: str, dp: int, plan: Plan):
    model = load_model(name)
    arrangement = make_arrangement(model, _hardware(dp), Workload(), _placement(dp))
    return evaluate(arrangement, Knobs.from_plans([plan])).memory


@pytest.fixture(scope="module", params=MODELS)
def case(request):
    name = request.param
    total, largest = _deepspeed_counts(_meta_model(name))
    return name, total, largest


def _ds(total: int, largest: int, gpus: int, offload_opt: bool, offload_param: bool) -> tuple[int, int]:
    cpu, gpu, _ = stage3.estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=gpus, num_nodes=1, cpu_offload=offload_opt,
        cpu_offload_params=offload_param, zero_init=True, additional_buffer_factor=1.0,
    )
    return cpu, gpu


def test_parameter_counts_agree(case):
    name, total, _ = case
    assert load_model(name).params_total == total


def test_host_copy_of_offloaded_weights_matches(case):
    name, total, largest = case
    cpu_both, _ = _ds(total, largest, 1, True, True)
    cpu_opt, _ = _ds(total, largest, 1, True, False)
    ours = _ours(name, 1, Plan(offload="cpu", weight_bits=16)).cpu_parts["offloaded_weights"][0]
    assert ours == pytest.approx(cpu_both - cpu_opt, rel=1e-9)


@pytest.mark.parametrize("gpus", [2, 4])
def test_gpu_shard_of_partitioned_weights_matches(case, gpus):
    name, total, largest = case
    _, gpu_opt = _ds(total, largest, gpus, True, False)
    deepspeed_shard = gpu_opt - 4 * largest
    # Persistence threshold 0: every tensor is partitioned, as DeepSpeed's estimate assumes.
    mem = _ours(name, gpus, Plan(offload="none", dp=gpus, batch_size=gpus, persistence_threshold_elems=0))
    assert mem.gpu_parts["resident_weights"][0] == pytest.approx(deepspeed_shard, rel=1e-6, abs=8)


def _live_peak(name: str, plan: Plan) -> float:
    """Bytes ZeRO-3 holds gathered at its peak, over the moments (layers running, embedding or head running)."""
    model = load_model(name)
    arrangement = make_arrangement(model, _hardware(1), Workload(), _placement(1))
    knobs = Knobs.from_plans([plan])
    t = arrangement.table
    used = t.sharded + t.replicated + t.n_experts * t.expert_sharded
    fetched = np.maximum(used[None, :] - persistent_elems(arrangement, knobs), 0.0)
    layers, vocab = live_param_elems(arrangement, knobs, fetched)
    return 2.0 * float(max(layers.max(), vocab.max()))


def test_gathered_working_set_is_deepspeeds_largest_module(case):
    """With no prefetch our live buffer is the largest module; DeepSpeed's 2L is the largest module.

    Llama/OPT/Mixtral's largest module is the embedding (one tensor), so the two agree exactly; our term
    then grows with the prefetch, which DeepSpeed's estimate leaves out (``cost.memory.live_param_elems``).
    """
    name, total, largest = case
    _, gpu_both = _ds(total, largest, 1, True, True)
    assert _live_peak(name, Plan(offload="cpu", prefetch_bucket_elems=0)) == pytest.approx(gpu_both / 2, rel=1e-9)
    # A bucket smaller than a module keeps pace with use: the largest module plus the bucket.
    pace = Plan(offload="cpu", prefetch_bucket_elems=1000, max_live_elems=10**12)
    assert _live_peak(name, pace) == pytest.approx(gpu_both / 2 + 2 * 1000, rel=1e-9)
    # A bucket larger than a module climbs to stage3_max_live_parameters and overshoots by one tensor
    # (the largest ever prefetched: not the embedding, which opens the forward; the head, whose
    # predecessor leaves room under this max live), unless the whole forward gathers less (the tiny model).
    table = module_table(load_model(name))
    overshoot = max(table.largest_tensor[k] for k in (DENSE, MOE, HEAD))
    everything = _live_peak(name, Plan(offload="cpu", prefetch_bucket_elems=10**12, max_live_elems=10**13))
    capped = Plan(offload="cpu", prefetch_bucket_elems=10**9, max_live_elems=largest + 10_000_000)
    want = min(2 * (largest + 10_000_000 + overshoot), everything)
    assert _live_peak(name, capped) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("name,leaf", [("mixtral-8x7b", "module"), ("mixtral-8x7b", "layer"), ("llama-3-8b", "layer"),
                                       ("deepseek-v3", "module")])
def test_a_layers_largest_gather_is_deepspeeds(name, leaf):
    """The largest unit ZeRO-3 gathers at once inside a decoder layer, on the model hpi builds with the leaf modules
    DeepSpeed flags from hpi's config, is the table's (``module_table(model, leaf).largest_gather``): a Mixtral MoE
    block (DeepSpeed's default leaf classes) with per-module leaves, one DeepSeek expert, a whole layer with layer
    leaves."""
    model = _meta_model(name, Plan(offload="cpu", zero3_leaf=leaf))
    layer = model.layers[-1]  # a MoE layer where the model has any (DeepSeek's first layers are dense)
    ours = module_table(load_model(name), leaf).largest_gather[MOE if load_model(name).is_moe else DENSE]
    assert max(sum(p.numel() for p in params) for params in _gathered_units(layer)) == ours


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_matrix_counts_as_deepspeed_counts_it(bits):
    """ZeRO-3's bucket, max live and persistence count ``ds_numel``: DeepSpeed stores a quantized weight as its
    packed bytes, scales and minima viewed as a 16-bit tensor, whose elements the planner predicts per weight
    (``Knobs.ds_numel_per_matrix_weight``)."""
    from deepspeed.inference.quantization.utils import _quantize_param

    from hpi.executor.render import ds_config

    weight = torch.nn.Parameter(torch.randn(256, 1024, dtype=torch.bfloat16), requires_grad=False)
    _quantize_param(weight, ds_config(Plan(weight_bits=bits), dtype="bf16",
                                      hidden_size=1024)["weight_quantization"]["quantized_initialization"])
    per_weight = Knobs.from_plans([Plan(weight_bits=bits)]).ds_numel_per_matrix_weight[0]
    assert weight.numel() == 256 * 1024 * per_weight and weight.dtype == torch.bfloat16
    assert Knobs.from_plans([Plan(weight_bits=16)]).ds_numel_per_matrix_weight[0] == 1.0
