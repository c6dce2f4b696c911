"""hpi.deployment: what a run is asked, resolved and checked before any process starts."""

from __future__ import annotations

import pytest

from hpi.deployment import (
    DeploymentError,
    HostMemory,
    Nodes,
    compile_mode,
    decode_mode,
    dequant_mode,
    pinning_problem,
    resolve_deployment,
    skinny_mode,
    this_host,
    warmup_mode,
)
from hpi.executor.spec import RunSpec, ServeSpec
from hpi.planner.catalog import load_model
from hpi.planner.specs.plan import Plan

dense, moe = load_model("llama-3-8b"), load_model("mixtral-8x7b")


def spec(plan: Plan, device: str = "cuda", **kw) -> RunSpec:
    return RunSpec(plan=plan, model="llama-3-8b", device=device, **kw)


def test_hpi_run_graphs_by_default_only_where_they_can_run():
    assert decode_mode(spec(Plan(tp=2)), dense, None) is True
    assert decode_mode(spec(Plan(offload="cpu")), dense, None) is False
    assert decode_mode(spec(Plan(kv_offload=True)), dense, None) is False
    assert decode_mode(spec(Plan()), moe, None) is False
    assert decode_mode(spec(Plan(), "cpu"), dense, None) is False
    assert decode_mode(spec(Plan(), "cuda"), dense, False) is False
    assert decode_mode(spec(Plan(), "cpu"), dense, True) is True
    # asked for where it cannot run: refused before anything launches, in one line
    for model, plan, why in [(dense, Plan(offload="cpu"), "ZeRO-3"), (moe, Plan(), "expert routing")]:
        with pytest.raises(DeploymentError, match=f"CUDA graphs cannot run .*{why}.*drop --cuda-graphs"):
            decode_mode(spec(plan), model, True)


def test_hpi_run_compiles_graphed_steps_and_fuses_dequantization_by_default_on_a_gpu_only():
    graphed = spec(Plan(), decode_graphs=True)
    assert compile_mode(graphed, None) is True and compile_mode(graphed, False) is False
    assert compile_mode(spec(Plan()), None) is False  # eager decode: nothing to compile
    assert compile_mode(spec(Plan(), "cpu", decode_graphs=True), None) is False
    assert compile_mode(spec(Plan(), "cpu", decode_graphs=True), True) is True  # asked: the CPU compiles too
    with pytest.raises(DeploymentError, match=r"--compile-decode compiles the graphed decode step.*--cuda-graphs"):
        compile_mode(spec(Plan()), True)
    quantized = spec(Plan(offload="cpu", weight_bits=4))
    assert dequant_mode(quantized, None) is True and dequant_mode(quantized, False) is False
    assert dequant_mode(spec(Plan(offload="cpu", weight_bits=4), "cpu"), None) is False
    assert dequant_mode(spec(Plan()), None) is False
    with pytest.raises(DeploymentError, match=r"--fused-dequant dequantizes 8/4-bit weights.*--quant-bits"):
        dequant_mode(spec(Plan()), True)


def test_hpi_run_stacks_the_graphed_steps_products_by_default_on_a_gpu_and_never_under_serve():
    graphed = spec(Plan(), decode_graphs=True)
    assert skinny_mode(graphed, None) is True and skinny_mode(graphed, False) is False
    assert skinny_mode(spec(Plan()), None) is False  # eager decode: the kernel is installed only where graphed
    assert skinny_mode(spec(Plan(), "cpu", decode_graphs=True), None) is False
    serve = ServeSpec(n_slots=2, max_model_len=64, step_tokens=64, address=("127.0.0.1", 1))
    served = RunSpec(plan=Plan(), model="llama-3-8b", decode_graphs=True, mode="serve", serve=serve)
    assert skinny_mode(served, None) is False
    with pytest.raises(DeploymentError, match=r"--skinny-gemm changes the graphed decode step.*--cuda-graphs"):
        skinny_mode(spec(Plan()), True)
    with pytest.raises(DeploymentError, match=r"hpi serve: --skinny-gemm is not supported"):
        skinny_mode(served, True)


def test_hpi_run_warms_up_a_graphed_gpu_run_by_default_at_two_tokens_and_otherwise_as_asked():
    """A graphed step's first replay of a shape compiles and captures it (65-75 s for the 8B on an H100): a GPU run
    that graphs its decode warms up once, 2 tokens (prefill + one decode forward), unless asked otherwise."""
    graphed = resolve_deployment(RunSpec(plan=Plan(), model="llama-3-8b")).spec
    assert graphed.decode_graphs and (graphed.warmup_steps, graphed.warmup_gen_len) == (1, 2)
    cold = resolve_deployment(RunSpec(plan=Plan(), model="llama-3-8b"), warmup_steps=0).spec
    assert (cold.warmup_steps, cold.warmup_gen_len) == (0, 0)  # asked none: none, the compile then timed
    eager = resolve_deployment(RunSpec(plan=Plan(), model="llama-3-8b"), decode_graphs=False).spec
    assert eager.warmup_steps == 0  # nothing captured: the first step is like the others
    assert warmup_mode(spec(Plan(), "cpu", decode_graphs=True), None).warmup_steps == 0  # the CPU captures nothing
    asked = warmup_mode(spec(Plan(offload="cpu", weight_bits=4)), 3)
    assert (asked.warmup_steps, asked.warmup_gen_len) == (3, 2)
    own = spec(Plan(), decode_graphs=True, warmup_steps=2, warmup_gen_len=8)  # a caller's own (autotune's trials)
    assert warmup_mode(own, None) is own and warmup_mode(own, 1).warmup_gen_len == 8
    serve = ServeSpec(n_slots=2, max_model_len=64, step_tokens=64, address=("127.0.0.1", 1))
    served = RunSpec(plan=Plan(), model="llama-3-8b", decode_graphs=True, mode="serve", serve=serve)
    assert warmup_mode(served, None).warmup_steps == 0  # the serving loop warms up its own graphs


def test_resolution_prices_the_stacked_products_it_resolved():
    """The 8B on one H200, graphed and compiled at batch 16: the stacked few-row products save the kernel's 18.1 us
    a layer at 16 rows (Efficiency.skinny_layer_device_saving_s), 32 layers, in the prediction beside the run."""
    asked = RunSpec(plan=Plan(batch_size=16), model="llama-3-8b", hardware="h200-1gpu")
    on, off = resolve_deployment(asked), resolve_deployment(asked, skinny_gemm=False)
    assert on.spec.skinny_gemm and on.prediction.workload.skinny_gemm and not off.spec.skinny_gemm
    saved = off.prediction.decode_step_s - on.prediction.decode_step_s
    assert saved == pytest.approx(32 * on.prediction.hardware.efficiency.skinny_layer_device_saving_s, rel=1e-6)
    eager = resolve_deployment(asked, decode_graphs=False)
    assert not eager.spec.skinny_gemm and not eager.spec.decode_compile


def test_resolution_prices_what_it_resolved_compiled_and_fused():
    d = resolve_deployment(RunSpec(plan=Plan(), model="llama-3-8b", hardware="h200-1gpu"))
    assert d.spec.decode_compile and d.spec.workload.decode_compile and d.prediction.workload.decode_compile
    plain = resolve_deployment(RunSpec(plan=Plan(), model="llama-3-8b", hardware="h200-1gpu"), decode_compile=False)
    assert plain.prediction.decode_step_s > d.prediction.decode_step_s
    q4 = RunSpec(plan=Plan(offload="cpu", weight_bits=4), model="llama-3-70b", hardware="h200-1gpu")
    fused, torch_ops = resolve_deployment(q4), resolve_deployment(q4, fused_dequant=False)
    assert fused.spec.fused_dequant and not fused.spec.decode_compile and not torch_ops.spec.fused_dequant
    assert fused.prediction.workload.fused_dequant and not torch_ops.prediction.workload.fused_dequant
    # predicted 0.824 against 0.971 s: the copies' time against DeepSpeed's chain's (measured 0.76-0.81 against
    # 0.97 s, benchmarks/results/2026-12-04-h200-fused)
    assert fused.prediction.decode_step_s < 0.9 * torch_ops.prediction.decode_step_s


def test_resolution_fills_in_the_decode_mode_the_prediction_and_this_nodes_gpus():
    asked = RunSpec(plan=Plan(tp=4), model="llama-3-70b", hardware="h200-4gpu", extra={"argv": ["run"]})
    d = resolve_deployment(asked)
    assert d.spec.decode_graphs is True and d.spec.workload.decode_graphs is True  # graphs where the plan allows
    assert d.prediction is not None and d.prediction.feasible and d.prediction.workload.decode_graphs
    assert d.spec.extra == {"argv": ["run"], "predicted": d.prediction_summary}
    assert d.prediction_summary["decode_step_s"] == d.prediction.decode_step_s
    assert d.nproc_per_node == 4 and d.visible_gpus is None and d.warnings == ()
    eager = resolve_deployment(asked, decode_graphs=False)
    assert eager.spec.decode_graphs is False and eager.prediction.decode_step_s > d.prediction.decode_step_s


def test_an_infeasible_plan_is_refused_unless_forced_then_warned():
    asked = RunSpec(plan=Plan(), model="llama-3-70b", hardware="a6000-workstation")
    with pytest.raises(DeploymentError, match="infeasible on a6000-workstation.*GPU memory.*--force"):
        resolve_deployment(asked)
    forced = resolve_deployment(asked, force=True)
    assert not forced.prediction.feasible and len(forced.warnings) == 1 and "GPU memory" in forced.warnings[0]
    assert forced.spec.extra["predicted"]["feasible"] is False


@pytest.mark.parametrize("asked,nodes,needle", [
    (dict(mode="chat"), Nodes(), "--chat needs a prompt"),
    (dict(prompts=("hi",)), Nodes(), "text prompts need a tokenizer"),
    (dict(checkpoint="/no/such/ckpt"), Nodes(), "no such directory"),
    (dict(plan=Plan(tp=3)), Nodes(), "n_heads(4) % tp(3)"),
    (dict(), Nodes(nnodes=2, node_rank=2), "--node-rank 2 must be < --nnodes 2"),
])
def test_bad_asks_are_refused_in_one_line(asked, nodes, needle):
    base = dict(plan=Plan(), model="tiny-llama", device="cpu")
    with pytest.raises(DeploymentError) as e:
        resolve_deployment(RunSpec(**{**base, **asked}), nodes=nodes)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_plan_spanning_more_nodes_than_started_names_the_multi_node_flags():
    asked = RunSpec(plan=Plan(tp=8, pp=2), model="llama-3-70b", hardware="dgx-h100-x4-ib")
    with pytest.raises(DeploymentError, match="span 2 node.*--nnodes 2 --node-rank K"):
        resolve_deployment(asked)
    second = resolve_deployment(asked, nodes=Nodes(nnodes=2, node_rank=1, master_port=29500))
    assert second.nproc_per_node == 8


# ---- pinned memory that would not fit this node ---------------------------------------------------------------
PINNED_70B = Plan(offload="cpu", weight_bits=4)  # on the A6000 workstation: 39.7 GB pinned, 43.7 GB of RAM in all


def pinned_spec(device: str = "cuda") -> RunSpec:
    return RunSpec(plan=PINNED_70B, model="llama-3-70b", hardware="a6000-workstation", device=device)


def test_pinning_that_fits_the_node_is_kept():
    d = resolve_deployment(pinned_spec(), host=HostMemory(available_bytes=200e9, memlock_bytes=None))
    assert d.spec.plan.pin_memory and "pinning" not in d.spec.extra and d.warnings == ()


def test_pinning_past_available_ram_is_turned_off_said_once_and_recorded():
    d = resolve_deployment(pinned_spec(), host=HostMemory(available_bytes=30e9, memlock_bytes=None))
    assert d.spec.plan == PINNED_70B.with_(pin_memory=False)
    assert d.prediction.plan == d.spec.plan and d.prediction.pinned_bytes < 5e9  # predicted as it will run
    assert len(d.warnings) == 1 and d.warnings[0].startswith("pinned memory turned off: the run's 50.4 GB of RAM "
                                                               "(46.4 GB pinned) > 30.0 GB available here")
    assert d.spec.extra["pinning"].startswith("off: the run's 50.4 GB")
    assert d.spec.extra["predicted"]["decode_step_s"] == d.prediction.decode_step_s


def test_pinning_past_memlock_is_turned_off():
    d = resolve_deployment(pinned_spec(), host=HostMemory(available_bytes=None, memlock_bytes=8e9))
    assert not d.spec.plan.pin_memory and "RLIMIT_MEMLOCK 8.0 GB (ulimit -l)" in d.warnings[0]


def test_explicit_pin_memory_that_would_not_fit_is_refused_with_the_fix():
    with pytest.raises(DeploymentError, match=r"--pin-memory: .*> 30.0 GB available here .*drop --pin-memory"):
        resolve_deployment(pinned_spec(), host=HostMemory(30e9, None), pin_memory_explicit=True)


def test_pinning_is_left_alone_on_the_cpu_without_a_check_or_without_host_copies():
    small = HostMemory(available_bytes=1e9, memlock_bytes=1e6)
    assert resolve_deployment(pinned_spec("cpu"), host=small).spec.plan.pin_memory  # nothing is pinned for a GPU
    assert resolve_deployment(pinned_spec(), host=None).spec.plan.pin_memory  # not asked to check
    resident = RunSpec(plan=Plan(weight_bits=4), model="llama-3-70b", hardware="a6000-workstation")
    assert resolve_deployment(resident, host=small).spec.plan == Plan(weight_bits=4)  # nothing copied from the host


def test_nvme_swap_buffers_that_would_not_fit_are_refused_pinning_off_or_not():
    """The WSL2 70B from NVMe: 3 swap buffers of the 1,050,673,152-element embedding pin 6.3 GB, 5 pin 10.5 GB."""
    buffer = 128256 * 8192
    nvme = Plan(offload="nvme", weight_bits=4, nvme_buffer_count=3, nvme_buffer_elems=buffer)
    asked = RunSpec(plan=nvme, model="llama-3-70b", hardware="rtx4090-wsl2", device="cuda")
    assert resolve_deployment(asked, host=HostMemory(None, 8e9)).spec.plan == nvme
    with pytest.raises(DeploymentError, match=r"the 3 NVMe swap buffers \(2.1 GB each\) are pinned whatever "
                                              r"--pin-memory says: 6.3 GB pinned > RLIMIT_MEMLOCK 6.0 GB .*"
                                              r"lower --nvme-buffer-count"):
        resolve_deployment(asked, host=HostMemory(None, 6e9))
    pinned_kv = RunSpec(plan=nvme.with_(kv_offload=True), model="llama-3-70b", hardware="rtx4090-wsl2")
    with pytest.raises(DeploymentError, match="NVMe swap buffers"):  # the KV cache unpinned, the buffers still not
        resolve_deployment(pinned_kv, host=HostMemory(None, 6e9))
    assert resolve_deployment(RunSpec(plan=nvme, model="llama-3-70b", hardware="rtx4090-wsl2", device="cpu"),
                              host=HostMemory(None, 1e6)).spec.plan == nvme  # nothing is pinned for a GPU


def test_this_host_reads_this_machine():
    host = this_host()
    assert host.available_bytes is None or host.available_bytes > 0
    assert host.memlock_bytes is None or host.memlock_bytes >= 0


def test_pinning_problem_names_ram_before_memlock():
    assert pinning_problem(10e9, 20e9, HostMemory(50e9, 100e9)) is None
    assert "MemAvailable" in pinning_problem(10e9, 60e9, HostMemory(50e9, 1e9))
    assert "ulimit -l" in pinning_problem(10e9, 20e9, HostMemory(50e9, 1e9))
