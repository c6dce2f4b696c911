"""Differential test: our ZeRO-3 parameter-memory terms against DeepSpeed's own estimator.

DeepSpeed's ``estimate_zero3_model_states_mem_needs`` is a *training* estimate (16-bit params and grads
plus fp32 Adam states), so only its 16-bit parameter terms are comparable to an inference plan
(derivation in validation/notes_deepspeed_zero3_estimator.md):
- host copy with offload_param=cpu: cpu(opt cpu, param cpu) - cpu(opt cpu, param none) = 2P per node
- GPU shard without param offload: gpu(opt cpu, param none) - 4L = 2P / G
- gathered working set with param offload: half of gpu(cpu, cpu) = 2L, L the largest module's own params
DeepSpeed, torch and transformers are imported here only; the planner never imports them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from planner.catalog import load_model
from planner.cost.estimate import evaluate
from planner.cost.inputs import Knobs, make_layout
from planner.cost.shape import DENSE, HEAD, MOE, module_table
from planner.specs.hardware import Efficiency, GpuSpec, HardwareProfile, HostSpec
from planner.specs.placement import Link, Placement
from planner.specs.plan import Plan
from planner.specs.workload import Workload

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")

MODELS = ["tiny-llama", "llama-3-8b", "llama-3-70b", "opt-30b", "mixtral-8x7b"]


def _meta_model(name: str):
    """The catalogue config built by transformers on the meta device: shapes only, no memory."""
    import json
    from importlib.resources import files

    config = json.loads(files("planner.catalog").joinpath(f"models/{name}.json").read_text())
    config.pop("_hpi", None)
    cfg = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg)


def _deepspeed_counts(model) -> tuple[int, int]:
    """DeepSpeed's P and L, counted by tensor identity (``model_to_params`` uses data_ptr, 0 on meta)."""
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
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
    layout = make_layout(model, _hardware(dp), Workload(), _placement(dp))
    return evaluate(layout, Knobs.from_plans([plan])).memory


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


def test_gathered_working_set_is_deepspeeds_largest_module(case):
    """With no prefetch our live buffer is the largest tensor; DeepSpeed's 2L is the largest module.

    Llama/OPT/Mixtral's largest module is the embedding (one tensor), so the two agree exactly; our term
    then grows with the prefetch, which DeepSpeed's estimate leaves out (``cost.memory.live_param_elems``).
    """
    name, total, largest = case
    _, gpu_both = _ds(total, largest, 1, True, True)
    no_prefetch = _ours(name, 1, Plan(offload="cpu", prefetch_bucket_elems=0)).gpu_parts["live_params"][0]
    assert no_prefetch == pytest.approx(gpu_both / 2, rel=1e-9)
    # A bucket smaller than a module keeps pace with use: the largest module plus the bucket.
    pace = Plan(offload="cpu", prefetch_bucket_elems=1000, max_live_elems=10**12)
    assert _ours(name, 1, pace).gpu_parts["live_params"][0] == pytest.approx(gpu_both / 2 + 2 * 1000, rel=1e-9)
    # A bucket larger than a module climbs to stage3_max_live_parameters and overshoots by one tensor
    # (the largest ever prefetched: not the embedding, which opens the forward), unless the whole
    # forward gathers less (the tiny model).
    table = module_table(load_model(name))
    overshoot = max(table.largest_tensor[k] for k in (DENSE, MOE, HEAD))
    everything = _ours(name, 1, Plan(offload="cpu", prefetch_bucket_elems=10**12, max_live_elems=10**13))
    capped = Plan(offload="cpu", prefetch_bucket_elems=10**9, max_live_elems=largest + 10_000_000)
    want = min(2 * (largest + 10_000_000 + overshoot), everything.gpu_parts["live_params"][0])
    assert _ours(name, 1, capped).gpu_parts["live_params"][0] == pytest.approx(want, rel=1e-9)


def _all_live_table(model, gpus: int) -> dict[tuple[str, str, int], tuple[float, float]]:
    """Run DeepSpeed's ``..._all_live`` (it only prints) and parse its rows: GiB per CPU and per GPU."""
    import contextlib
    import io
    import re

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        stage3.estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=gpus, num_nodes=1)
    rows = {}
    pattern = r"([\d.]+)GB \|\s+([\d.]+)GB \| offload_param=(\S+), offload_optimizer=(\S+), zero_init=(\d)"
    for cpu, gpu, param, optim, init in re.findall(pattern, buf.getvalue()):
        short = lambda s: "cpu" if "cpu" in s else "none"  # noqa: E731 - OffloadDeviceEnum.cpu or none
        rows[(short(param), short(optim), int(init))] = (float(cpu), float(gpu))
    assert len(rows) == 6, buf.getvalue()
    return rows


def test_against_all_live_on_a_materialized_model():
    """``estimate_zero3_model_states_mem_needs_all_live`` itself, on a real 0.85B model (2 GPUs, f = 1.5).

    The model is allocated uninitialised (distinct data pointers, which the estimator counts by); its
    table prints GiB with two decimals, so the comparison is to 0.01 GiB per printed value.
    """
    from planner.catalog import model_from_hf_config

    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                                   num_attention_heads=16, num_key_value_heads=4)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    table = _all_live_table(model, gpus=2)
    gib, factor, tol = 2**30, 1.5, 0.011
    ours_model = model_from_hf_config(cfg.to_dict(), name="llama-0.85b")

    def ours(dp: int, plan: Plan):
        layout = make_layout(ours_model, _hardware(dp), Workload(), _placement(dp))
        return evaluate(layout, Knobs.from_plans([plan])).memory

    host_copy = (table[("cpu", "cpu", 1)][0] - table[("none", "cpu", 1)][0]) / factor
    assert ours(1, Plan(offload="cpu")).cpu_parts["offloaded_weights"][0] / gib == pytest.approx(host_copy, abs=2 * tol)
    shard = table[("none", "cpu", 1)][1] - table[("cpu", "cpu", 1)][1]
    partitioned = ours(2, Plan(dp=2, batch_size=2, persistence_threshold_elems=0)).gpu_parts["resident_weights"][0]
    assert partitioned / gib == pytest.approx(shard, abs=2 * tol)
    gathered = ours(1, Plan(offload="cpu", prefetch_bucket_elems=0)).gpu_parts["live_params"][0]
    assert gathered / gib == pytest.approx(table[("cpu", "cpu", 1)][1] / 2, abs=tol)
