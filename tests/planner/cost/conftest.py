"""Hand-built inputs for the cost-model tests: a hardware profile with round numbers, placements with
explicit links, small model shapes, and factories that turn plans into an ``Evaluation``.

Nothing here goes through ``hpi.planner.topology`` or ``hpi.planner.ranks``: every figure a cost term reads is
stated below, so the tests can work their expectations out on paper.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

import pytest

from hpi.planner.cost.estimate import Evaluation, evaluate
from hpi.planner.cost.inputs import Arrangement, Knobs, make_arrangement
from hpi.planner.specs.hardware import Efficiency, GpuSpec, HardwareProfile, HostSpec, NvmeSpec
from hpi.planner.specs.model import ModelSpec
from hpi.planner.specs.placement import Link, Placement
from hpi.planner.specs.plan import Plan
from hpi.planner.specs.workload import Workload

GB = 1e9

# Round numbers: 100 TFLOP/s, 1 TB/s HBM, 80 GB; 10 GB/s pinned and 5 GB/s pageable host->device per GPU;
# a 2 GB/s NVMe; NVLink-like 100 GB/s links with 1 us latency.
PEAK_FLOPS = 100e12
HBM_BW = 1e12
GPU_MEMORY = 80 * GB
H2D_PINNED = 10 * GB
H2D_PAGEABLE = 5 * GB
NVME_READ = 2 * GB
LINK_BW = 100 * GB
LINK_LATENCY = 1e-6

# Every efficiency 1 and every overhead 0: the cost terms are then the bare formulas.
IDEAL = Efficiency(
    matmul_prefill=1.0, matmul_decode=1.0, hbm=1.0, h2d_stream_pinned=1.0, h2d_stream_pageable=1.0,
    nvme_read=1.0, nvme_read_multithread=1.0, collective_bandwidth=1.0, allreduce_latency_s=0.0,
    collective_host_overhead_s=0.0, p2p_latency_s=0.0,
    prefetch_overlap=1.0, layer_overhead_s=0.0, offload_layer_overhead_s=0.0, step_overhead_s=0.0,
    graphed_step_overhead_s=0.0,
    gpu_reserved_bytes=0.0, gpu_workspace_bytes=0.0, host_reserved_bytes=0.0, gpu_memory_usable=1.0, dram_usable=1.0,
    dequant_hbm=1.0, fused_dequant_hbm=1.0, collective_drift_factor=0.0, layer_device_s_per_row_doubling=0.0,
)  # fmt: skip

# Distinct, easy-to-spot efficiencies so a test can tell which one a term used.
ROUND = Efficiency(
    matmul_prefill=0.5, matmul_decode=0.25, hbm=0.8, h2d_stream_pinned=0.5, h2d_stream_pageable=0.8,
    nvme_read=0.5, nvme_read_multithread=0.6, collective_bandwidth=0.5, allreduce_latency_s=10e-6,
    collective_host_overhead_s=30e-6,
    p2p_latency_s=20e-6, prefetch_overlap=1.0, layer_overhead_s=100e-6, offload_layer_overhead_s=300e-6,
    layer_device_overhead_s=50e-6, compiled_layer_device_overhead_s=20e-6,
    step_overhead_s=1e-3, graphed_step_overhead_s=0.4e-3, gpu_reserved_bytes=1 * GB, gpu_workspace_bytes=0.25 * GB,
    host_reserved_bytes=2 * GB,
    gpu_memory_usable=0.9, dram_usable=0.9, dequant_hbm=0.4, fused_dequant_hbm=0.2, collective_drift_factor=0.5,
    layer_device_s_per_row_doubling=0.0,
)  # fmt: skip


def make_hardware(
    efficiency: Efficiency = ROUND,
    *,
    n_nodes: int = 1,
    gpus_per_node: int = 8,
    gpu_memory: float = GPU_MEMORY,
    dram: float = 1000 * GB,
    pinnable: float = 500 * GB,
    nvme_capacity: float | None = 4000 * GB,
    name: str = "test-box",
) -> HardwareProfile:
    nvme = (None if nvme_capacity is None
            else NvmeSpec(capacity_bytes=nvme_capacity, read_bytes_s=NVME_READ, write_bytes_s=1 * GB))
    return HardwareProfile(
        name=name,
        description="hand-made test machine",
        os="linux",
        n_nodes=n_nodes,
        gpus_per_node=gpus_per_node,
        gpu=GpuSpec("test-gpu", memory_bytes=gpu_memory, bf16_flops=PEAK_FLOPS, hbm_bandwidth_bytes_s=HBM_BW),
        host=HostSpec(dram_bytes=dram, pinnable_bytes=pinnable, cpu_cores=32, h2d_pageable_bytes_s=H2D_PAGEABLE),
        nvme=nvme,
        efficiency=efficiency,
    )


def nvlink(bw: float = LINK_BW, latency: float = LINK_LATENCY) -> Link:
    return Link(bandwidth_bytes_s=bw, latency_s=latency, kind="nvlink", path="test")


def make_placement(
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    *,
    tp_link: Link | None = None,
    dp_link: Link | None = None,
    pp_link: Link | None = None,
    h2d_pinned: float = H2D_PINNED,
    h2d_pageable: float = H2D_PAGEABLE,
    nvme_read: float = NVME_READ,
    nodes: int = 1,
) -> Placement:
    """Ranks in order (tp innermost, dp, pp), spread evenly over ``nodes`` nodes in rank order."""
    world = tp * pp * dp
    per_node = -(-world // nodes)
    gpus = tuple(f"n{r // per_node}.gpu{r % per_node}" for r in range(world))

    def link(given: Link | None, degree: int) -> Link:
        if given is not None:
            return given
        return nvlink() if degree > 1 else Link.local()

    return Placement(
        tp=tp,
        pp=pp,
        dp=dp,
        rank_gpus=gpus,
        tp_link=link(tp_link, tp),
        dp_link=link(dp_link, dp),
        pp_link=link(pp_link, pp),
        h2d_pinned_bytes_s=h2d_pinned,
        h2d_pageable_bytes_s=h2d_pageable,
        nvme_read_bytes_s=nvme_read,
        nodes_used=nodes,
    )


def toy_dense(**changes) -> ModelSpec:
    """A Llama-shaped model with round numbers: 4 layers, h=1024, 8 heads of 128, 2 KV heads, f=4096."""
    fields = dict(
        name="toy-dense", family="llama", n_layers=4, hidden_size=1024, n_heads=8, n_kv_heads=2, head_dim=128,
        ffn_hidden_size=4096, vocab_size=32000, max_position_embeddings=8192,
    )  # fmt: skip
    return ModelSpec(**{**fields, **changes})


def toy_moe(**changes) -> ModelSpec:
    """Mixtral-shaped: 4 MoE layers of 8 experts, top-2."""
    fields = dict(
        name="toy-moe", family="mixtral", n_layers=4, hidden_size=1024, n_heads=8, n_kv_heads=2, head_dim=128,
        ffn_hidden_size=2048, vocab_size=32000, max_position_embeddings=8192, n_experts=8, n_experts_active=2,
        moe_ffn_hidden_size=2048,
    )  # fmt: skip
    return ModelSpec(**{**fields, **changes})


def toy_mla(**changes) -> ModelSpec:
    """DeepSeek-V3 in miniature: 1 dense layer then 3 MoE layers, 8 routed + 1 shared expert, top 2, MLA."""
    fields = dict(
        name="toy-mla", family="deepseek_v3", n_layers=4, hidden_size=256, n_heads=4, n_kv_heads=4,
        head_dim=48, ffn_hidden_size=512, vocab_size=1000, max_position_embeddings=4096, n_experts=8,
        n_experts_active=2, n_shared_experts=1, moe_ffn_hidden_size=128, first_dense_layers=1,
        q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    )  # fmt: skip
    return ModelSpec(**{**fields, **changes})


def build_arrangement(
    model: ModelSpec,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    *,
    hardware: HardwareProfile | None = None,
    workload: Workload | None = None,
    placement: Placement | None = None,
    **placement_kwargs,
) -> Arrangement:
    hardware = hardware or make_hardware()
    workload = workload or Workload(prompt_len_tokens=512, gen_len_tokens=32)
    placement = placement or make_placement(tp, pp, dp, **placement_kwargs)
    return make_arrangement(model, hardware, workload, placement)


def evaluate_plans(arrangement: Arrangement, plans: Sequence[Plan]) -> Evaluation:
    for p in plans:
        assert (p.tp, p.pp, p.dp) == (arrangement.tp, arrangement.pp, arrangement.dp), "plans must match"
    return evaluate(arrangement, Knobs.from_plans(list(plans)))


def evaluate_toy(plans: Sequence[Plan], tp: int = 1, pp: int = 1, dp: int = 1, model: ModelSpec | None = None,
                 **arrangement_kwargs) -> Evaluation:
    """``plans`` evaluated on ``model`` (``toy_dense`` unless given) at tp x pp x dp; the keywords go to
    ``build_arrangement`` (hardware, workload, placement links)."""
    return evaluate_plans(build_arrangement(model or toy_dense(), tp, pp, dp, **arrangement_kwargs), plans)


@pytest.fixture
def kit() -> SimpleNamespace:
    """Every helper and constant of this module, for tests (conftest modules are not importable)."""
    return SimpleNamespace(
        GB=GB, PEAK_FLOPS=PEAK_FLOPS, HBM_BW=HBM_BW, GPU_MEMORY=GPU_MEMORY, H2D_PINNED=H2D_PINNED,
        H2D_PAGEABLE=H2D_PAGEABLE, NVME_READ=NVME_READ, LINK_BW=LINK_BW, LINK_LATENCY=LINK_LATENCY,
        IDEAL=IDEAL, ROUND=ROUND, make_hardware=make_hardware, make_placement=make_placement, nvlink=nvlink,
        toy_dense=toy_dense, toy_moe=toy_moe, toy_mla=toy_mla, arrangement=build_arrangement, evaluate=evaluate_plans,
        evaluate_toy=evaluate_toy,
    )  # fmt: skip
