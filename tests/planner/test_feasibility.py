"""feasibility: every reason kind triggers at its limit with its numbers and a fix in the message; layout
problems quote the failing constraint.

Inputs are built by hand (no topology): a machine with round numbers and a placement with explicit links.
Llama-3-8B holds 8,030,261,248 parameters: 16.06 GB at 16 bit.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from hpi.planner.catalog import load_model
from hpi.planner.cost.estimate import evaluate
from hpi.planner.cost.inputs import Knobs, make_arrangement
from hpi.planner.feasibility import (
    Reason,
    arrangement_problems,
    capacity_masks,
    capacity_reasons,
    feasible_mask,
    plan_problems,
)
from hpi.planner.specs.hardware import Efficiency, GpuSpec, HardwareProfile, HostSpec, NvmeSpec
from hpi.planner.specs.model import ModelSpec
from hpi.planner.specs.placement import Link, Placement
from hpi.planner.specs.plan import Plan
from hpi.planner.specs.workload import Workload

GB = 1e9
EFF = Efficiency(gpu_reserved_bytes=1 * GB, host_reserved_bytes=2 * GB, gpu_memory_usable=0.9, dram_usable=0.9)
BUFFER = 600_000_000  # NVMe swap buffer elements that hold Llama-3-8B's largest tensor (the embedding)
KINDS = {"gpu_memory", "cpu_memory", "build_memory", "pinned_memory", "nvme_missing", "nvme_capacity", "nvme_buffer",
         "nvme_buffer_count", "aio_block_size", "context_length"}


def machine(gpu_memory=80 * GB, dram=1000 * GB, pinnable=500 * GB, nvme_capacity=4000 * GB, n_gpus=8, name="test-box"):
    nvme = (None if nvme_capacity is None
            else NvmeSpec(capacity_bytes=nvme_capacity, read_bytes_s=2 * GB, write_bytes_s=1 * GB))
    return HardwareProfile(
        name=name, description="hand-made", os="linux", n_nodes=1, gpus_per_node=n_gpus,
        gpu=GpuSpec("test-gpu", memory_bytes=gpu_memory, bf16_flops=100e12, hbm_bandwidth_bytes_s=1e12),
        host=HostSpec(dram_bytes=dram, pinnable_bytes=pinnable, cpu_cores=32, h2d_pageable_bytes_s=5 * GB),
        nvme=nvme, efficiency=EFF,
    )  # fmt: skip


def placement(tp=1, pp=1, dp=1) -> Placement:
    link = Link(bandwidth_bytes_s=100 * GB, latency_s=1e-6, kind="nvlink")
    return Placement(
        tp=tp, pp=pp, dp=dp, rank_gpus=tuple(f"n0.gpu{r}" for r in range(tp * pp * dp)), tp_link=link,
        dp_link=link, pp_link=link, h2d_pinned_bytes_s=10 * GB, h2d_pageable_bytes_s=5 * GB,
        nvme_read_bytes_s=2 * GB, nodes_used=1,
    )  # fmt: skip


def evaluation(plans, hw=None, model=None, workload=None):
    p0 = plans[0]
    lay = make_arrangement(
        model or load_model("llama-3-8b"), hw or machine(), workload or Workload(512, 32),
        placement(p0.tp, p0.pp, p0.dp)
    )
    return evaluate(lay, Knobs.from_plans(plans))


def reasons(plan, **kw) -> list[Reason]:
    return capacity_reasons(evaluation([plan], **kw), 0)


def only(rs: list[Reason], kind: str) -> Reason:
    hits = [r for r in rs if r.kind == kind]
    assert len(hits) == 1, rs
    return hits[0]


# ---- capacity reasons -------------------------------------------------------------------------------


def test_a_plan_that_fits_has_no_reasons() -> None:
    ev = evaluation([Plan(), Plan(offload="cpu", weight_bits=4, batch_size=8),
                     Plan(offload="nvme", nvme_buffer_elems=BUFFER)])
    assert feasible_mask(ev).all()
    assert all(capacity_reasons(ev, i) == [] for i in range(3))
    assert set(capacity_masks(ev)) == KINDS


def test_gpu_memory_names_the_dominant_part_and_a_fix() -> None:
    ev = evaluation([Plan()], hw=machine(gpu_memory=16 * GB))
    peak = ev.memory.gpu_peak_bytes[0]
    assert peak > 0.9 * 16 * GB
    r = only(capacity_reasons(ev, 0), "gpu_memory")
    assert f"GPU memory {peak / GB:.1f} GB > 14.4 GB usable on n0.gpu0" in r.message
    resident = ev.memory.gpu_parts["resident_weights"][0]
    assert f"(resident weights {resident / GB:.1f} GB at batch 1)" in r.message
    assert "--offload cpu" in r.message and "--quant-bits" in r.message
    assert r.to_dict() == {"kind": "gpu_memory", "message": r.message}


def test_gpu_memory_dominated_by_kv_cache_suggests_kv_offload() -> None:
    ev = evaluation([Plan(offload="cpu", weight_bits=4, batch_size=256)], workload=Workload(4096, 512))
    r = only(capacity_reasons(ev, 0), "gpu_memory")
    kv = ev.memory.gpu_parts["kv_cache"][0]
    # At the prefill peak (256 x 4096 tokens of intermediates): 32 layers x 2 x 8 heads x 128 x 4096 prompt
    # tokens x 2 bytes = 537 MB a sequence.
    assert kv == pytest.approx(256 * 32 * 2 * 8 * 128 * 4096 * 2)
    assert f"kv cache {kv / GB:.1f} GB at batch 256" in r.message
    assert "--kv-offload" in r.message


def test_gpu_memory_names_the_gpu_of_the_fullest_stage() -> None:
    """pp=2 with dp=2: ranks 0-1 are stage 0, ranks 2-3 stage 1; the head's logits make stage 1 fuller."""
    ev = evaluation([Plan(pp=2, dp=2, batch_size=64)], hw=machine(gpu_memory=4 * GB))
    assert ev.memory.fullest_stage[0] == 1
    assert "usable on n0.gpu2 " in only(capacity_reasons(ev, 0), "gpu_memory").message


def test_gpu_memory_limit_is_the_usable_fraction() -> None:
    ev = evaluation([Plan()])
    peak = ev.memory.gpu_peak_bytes[0]
    just_fits = evaluation([Plan()], hw=machine(gpu_memory=peak / 0.9 * 1.0001))
    just_over = evaluation([Plan()], hw=machine(gpu_memory=peak / 0.9 * 0.9999))
    assert not capacity_masks(just_fits)["gpu_memory"][0]
    assert capacity_masks(just_over)["gpu_memory"][0]


def test_cpu_memory() -> None:
    ev = evaluation([Plan(offload="cpu")], hw=machine(dram=20 * GB))
    cpu = ev.memory.cpu_bytes[0]
    weights = ev.memory.cpu_parts["offloaded_weights"][0]
    rounding = 32 * 3 * 16 * 2**20 + 2 * (2**30 - 128256 * 4096 * 2)  # cost.pinned: power-of-two pinned blocks
    assert cpu == pytest.approx(8_030_261_248 * 2 + rounding + 2 * GB)
    r = only(capacity_reasons(ev, 0), "cpu_memory")
    assert f"CPU memory {cpu / GB:.1f} GB > 18.0 GB usable per node" in r.message
    assert f"(offloaded weights {weights / GB:.1f} GB)" in r.message
    assert "--offload nvme" in r.message


def test_pinned_memory_only_when_pinning() -> None:
    ev = evaluation([Plan(offload="cpu"), Plan(offload="cpu", pin_memory=False)], hw=machine(pinnable=8 * GB))
    r = only(capacity_reasons(ev, 0), "pinned_memory")
    assert f"pinned memory {ev.memory.pinned_bytes[0] / GB:.1f} GB > 8.0 GB pinnable per node" in r.message
    assert "--no-pin-memory" in r.message
    assert capacity_reasons(ev, 1) == []


def test_nvme_missing() -> None:
    ev = evaluation([Plan(offload="nvme"), Plan(offload="cpu")], hw=machine(nvme_capacity=None, name="no-drive"))
    r = only(capacity_reasons(ev, 0), "nvme_missing")
    assert "no-drive has no NVMe" in r.message and "--offload cpu" in r.message
    assert capacity_reasons(ev, 1) == []
    assert not capacity_masks(ev)["nvme_capacity"].any()


def test_nvme_capacity() -> None:
    plans = [Plan(offload="nvme", nvme_buffer_elems=BUFFER),
             Plan(offload="nvme", weight_bits=4, nvme_buffer_elems=BUFFER)]
    ev = evaluation(plans, hw=machine(nvme_capacity=10 * GB))
    r = only(capacity_reasons(ev, 0), "nvme_capacity")
    assert f"NVMe {ev.memory.nvme_bytes[0] / GB:.1f} GB > 10.0 GB capacity per node" in r.message
    assert ev.memory.nvme_bytes[0] == pytest.approx(8_030_261_248 * 2)
    assert capacity_reasons(ev, 1) == []  # 4 bits: 4.5 GB fits


@pytest.mark.parametrize("dp,need", [(1, 525_336_576), (2, 262_668_288)])
def test_nvme_buffer_must_hold_the_largest_partition(dp: int, need: int) -> None:
    """The largest tensor is the 128256 x 4096 embedding (replicated over TP), split 1/dp by ZeRO-3."""
    plans = [
        Plan(offload="nvme", dp=dp, batch_size=dp, nvme_buffer_elems=1_000_000),
        Plan(offload="nvme", dp=dp, batch_size=dp, nvme_buffer_elems=need),
        Plan(offload="nvme", dp=dp, batch_size=dp, nvme_buffer_elems=need - 1),
    ]
    ev = evaluation(plans)
    r = only(capacity_reasons(ev, 0), "nvme_buffer")
    assert f"NVMe buffer 1,000,000 elements < largest tensor partition {need:,}" in r.message
    np.testing.assert_array_equal(capacity_masks(ev)["nvme_buffer"], [True, False, True])


def test_nvme_buffer_ignored_without_nvme_offload() -> None:
    ev = evaluation([Plan(offload="cpu", nvme_buffer_elems=1, nvme_buffer_count=1)])
    assert not capacity_masks(ev)["nvme_buffer"].any()
    assert not capacity_masks(ev)["nvme_buffer_count"].any()


def test_nvme_buffer_count_must_hold_what_one_module_swaps_in() -> None:
    """A Mixtral MoE block (one ZeRO-3 leaf: DeepSpeed's default leaf classes) swaps in its 8 experts' 24
    projections together (24 buffers); every Llama module one, and Mixtral's embedding (32000 x 4096) is the largest
    partition each buffer must hold."""
    need = 32000 * 4096
    mixtral = [Plan(offload="nvme", nvme_buffer_count=n, nvme_buffer_elems=need) for n in (23, 24)]
    ev = evaluation(mixtral, model=load_model("mixtral-8x7b"))
    np.testing.assert_array_equal(capacity_masks(ev)["nvme_buffer_count"], [True, False])
    r = only(capacity_reasons(ev, 0), "nvme_buffer_count")
    assert "NVMe buffer count 23 < 24" in r.message and "--nvme-buffer-count 24" in r.message
    short = evaluation([Plan(offload="nvme", nvme_buffer_elems=need - 1)], model=load_model("mixtral-8x7b"))
    assert "largest tensor partition 131,072,000" in only(capacity_reasons(short, 0), "nvme_buffer").message
    assert not capacity_masks(evaluation([Plan(offload="nvme", nvme_buffer_count=1, nvme_buffer_elems=BUFFER)]))[
        "nvme_buffer_count"].any()


def test_context_length() -> None:
    ev = evaluation([Plan()], workload=Workload(8000, 300))
    r = only(capacity_reasons(ev, 0), "context_length")
    assert "prompt(8000) + gen(300) = 8300 > max_position_embeddings(8192) of llama-3-8b" in r.message
    assert not capacity_masks(evaluation([Plan()], workload=Workload(8000, 192)))["context_length"].any()


def test_several_reasons_at_once_and_the_mask_agrees() -> None:
    hw = machine(gpu_memory=8 * GB, dram=20 * GB, pinnable=4 * GB)
    plans = [Plan(), Plan(offload="cpu"), Plan(offload="cpu", weight_bits=4, pin_memory=False)]
    ev = evaluation(plans, hw=hw)
    kinds = [{r.kind for r in capacity_reasons(ev, i)} for i in range(3)]
    assert kinds[0] == {"gpu_memory"}
    assert kinds[1] == {"cpu_memory", "build_memory", "pinned_memory"}
    assert kinds[2] == set()
    np.testing.assert_array_equal(feasible_mask(ev), [not k for k in kinds])
    masks = capacity_masks(ev)
    for i, k in enumerate(kinds):
        assert {name for name, m in masks.items() if m[i]} == k


def test_every_message_carries_a_number_and_a_fix() -> None:
    hw = machine(gpu_memory=8 * GB, dram=10 * GB, pinnable=2 * GB, nvme_capacity=5 * GB)
    ev = evaluation(
        [Plan(batch_size=1), Plan(offload="cpu"), Plan(offload="nvme", nvme_buffer_elems=10)],
        hw=hw, workload=Workload(8192, 8),
    )  # fmt: skip
    seen = set()
    for i in range(3):
        for r in capacity_reasons(ev, i):
            seen.add(r.kind)
            assert r.kind in KINDS
            assert re.search(r"\d", r.message) and ":" in r.message, r.message
    assert seen >= {"gpu_memory", "cpu_memory", "build_memory", "pinned_memory", "nvme_capacity", "nvme_buffer",
                    "context_length"}


def test_a_16_bit_offload_build_holds_one_tensor_more_than_the_run_and_is_refused_when_that_does_not_fit() -> None:
    """cost.build: a 16-bit CPU-offload build holds the stage in host memory while ZeRO-3 copies each parameter
    into its partition: the run's footprint plus the largest tensor (Llama-3-8B: the 128256 x 4096 embedding
    or head, 1.05 GB). 8/4-bit weights are built module by module on the GPU, NVMe at 16 bit holds the stage."""
    largest = 128256 * 4096 * 2
    fits = evaluation([Plan(offload="cpu", pin_memory=False), Plan(offload="cpu", weight_bits=4, pin_memory=False),
                       Plan(), Plan(offload="nvme", nvme_buffer_elems=BUFFER)])
    mem = fits.memory
    assert mem.build_transient_bytes[0] == pytest.approx(largest)
    assert mem.build_bytes[0] == pytest.approx(mem.cpu_bytes[0] + largest)
    assert mem.build_transient_bytes[1] == mem.build_transient_bytes[2] == 0.0
    assert mem.build_bytes[2] == pytest.approx(mem.cpu_bytes[2])  # resident: the process only
    stage = load_model("llama-3-8b").params_total * 2
    assert mem.build_transient_bytes[3] == pytest.approx(stage, rel=1e-9)
    # The run fits in 20 GB x 0.9 usable; its build does not.
    run = mem.cpu_bytes[0]
    hw = machine(dram=(run + largest / 2) / 0.9, pinnable=1 * GB)
    tight = evaluation([Plan(offload="cpu", pin_memory=False)], hw=hw)
    assert {r.kind for r in capacity_reasons(tight, 0)} == {"build_memory"}
    r = only(capacity_reasons(tight, 0), "build_memory")
    assert f"host memory while building {(run + largest) / GB:.1f} GB" in r.message and "--quant-bits" in r.message


# ---- layout problems --------------------------------------------------------------------------------


def test_valid_layouts_have_no_problems() -> None:
    hw = machine()
    for name, tp in (("llama-3-70b", 8), ("llama-3-8b", 4), ("deepseek-v3", 8), ("mixtral-8x7b", 2)):
        assert list(arrangement_problems(load_model(name), hw, tp, 1, 1)) == []
    assert list(arrangement_problems(load_model("llama-3-70b"), hw, 2, 2, 2)) == []


def test_tp_must_divide_the_heads() -> None:
    problems = list(arrangement_problems(load_model("llama-3-70b"), machine(), 3, 1, 1))
    assert "n_heads(64) % tp(3) != 0 for llama-3-70b: use a tp that divides 64" in problems
    assert any(p.startswith("kv_heads(8) and tp(3) must divide one another") for p in problems)
    assert "ffn width(28672) % tp(3) != 0 for llama-3-70b: use a tp that divides 28672" in problems


def test_too_many_ranks_quotes_the_equation() -> None:
    problems = list(arrangement_problems(load_model("llama-3-8b"), machine(), 2, 4, 2))
    assert problems == ["tp(2) * pp(4) * dp(2) = 16 > 8 GPUs on test-box: lower tp, pp or dp"]


def test_fewer_ranks_than_gpus_is_fine() -> None:
    assert list(arrangement_problems(load_model("llama-3-8b"), machine(), 1, 1, 1)) == []


def test_more_stages_than_layers() -> None:
    problems = list(arrangement_problems(load_model("tiny-llama"), machine(), 1, 8, 1))
    assert problems == ["pp(8) > n_layers(4) of tiny-llama: each stage needs a layer, lower pp"]


def test_kv_heads_and_tp_must_divide_one_another() -> None:
    m = ModelSpec(
        name="kv12", family="llama", n_layers=4, hidden_size=3072, n_heads=24, n_kv_heads=12, head_dim=128,
        ffn_hidden_size=8192, vocab_size=1000, max_position_embeddings=4096,
    )  # fmt: skip
    hw = machine(n_gpus=8)
    assert [p for p in arrangement_problems(m, hw, 8, 1, 1) if p.startswith("kv_heads(12)")]
    assert list(arrangement_problems(m, hw, 4, 1, 1)) == []  # 4 divides 12
    # tp a multiple of the KV heads: each KV head is replicated over whole ranks.
    m2 = ModelSpec(
        name="kv2", family="llama", n_layers=4, hidden_size=1024, n_heads=8, n_kv_heads=2, head_dim=128,
        ffn_hidden_size=4096, vocab_size=1000, max_position_embeddings=4096,
    )  # fmt: skip
    assert list(arrangement_problems(m2, hw, 8, 1, 1)) == []


def test_mla_latent_is_one_replicated_head() -> None:
    problems = list(arrangement_problems(load_model("deepseek-v3"), machine(), 8, 1, 1))
    assert not any("kv_heads" in p for p in problems)


def test_moe_expert_width_must_split() -> None:
    m = ModelSpec(
        name="odd-moe", family="mixtral", n_layers=2, hidden_size=512, n_heads=8, n_kv_heads=8, head_dim=64,
        ffn_hidden_size=1024, vocab_size=1000, max_position_embeddings=4096, n_experts=4, n_experts_active=2,
        moe_ffn_hidden_size=100,
    )  # fmt: skip
    assert "ffn width(100) % tp(8) != 0 for odd-moe: use a tp that divides 100" in list(
        arrangement_problems(m, machine(), 8, 1, 1))


def test_plan_problems_reads_the_plan_degrees() -> None:
    assert plan_problems(load_model("llama-3-70b"), machine(), Plan(tp=3)) == list(
        arrangement_problems(load_model("llama-3-70b"), machine(), 3, 1, 1)
    )
    assert plan_problems(load_model("llama-3-8b"), machine(), Plan(tp=2, pp=2, dp=2, batch_size=2)) == []


def test_quantization_needs_widths_in_groups_of_64() -> None:
    from hpi.planner.catalog import load_model
    from hpi.planner.feasibility import quantization_problems

    tiny = load_model("tiny-llama")  # FFN width 176
    assert [p for p in quantization_problems(tiny, 1)] == [
        "FFN width per rank(176) % quantization group(64) != 0 for tiny-llama at tp 1: "
        "DeepSpeed cannot quantize it; use --quant-bits 16 or another tp"
    ]
    for name in ("llama-3-8b", "llama-3-70b", "opt-30b", "bloom-176b", "mixtral-8x7b", "deepseek-v3", "kimi-k2"):
        for tp in (1, 2, 4, 8):
            assert list(quantization_problems(load_model(name), tp)) == [], (name, tp)


def test_search_never_proposes_plans_deepspeed_cannot_quantize() -> None:
    from hpi.planner.catalog import load_model
    from hpi.planner.profiles import load_profile
    from hpi.planner.search import search
    from hpi.planner.specs.workload import Workload

    result = search(load_model("tiny-llama"), load_profile("h100-sxm-1gpu"), Workload())
    bits = {int(b) for ev in result.evaluations for b in ev.knobs.weight_bits}
    assert bits == {16}


def test_a_full_disk_at_4_bits_is_not_told_to_quantize() -> None:
    hw = machine(nvme_capacity=3 * GB)
    ev = evaluation([Plan(offload="nvme", nvme_buffer_elems=BUFFER), Plan(offload="nvme", weight_bits=4,
                                                                           nvme_buffer_elems=BUFFER)], hw=hw)
    sixteen, four = (only(capacity_reasons(ev, i), "nvme_capacity").message for i in range(2))
    assert "--quant-bits 4" in sixteen and "--quant-bits" not in four and "larger disk" in four


def test_aio_block_size_must_not_keep_a_swapped_partition_in_cpu_memory() -> None:
    """DeepSpeed swaps only partitions of at least the block size (min_aio_bytes); Llama-3-8B's smallest swapped
    ones are k and v (4096 x 1024, 8 MiB), 4 MiB at dp 2."""
    plans = [Plan(offload="nvme", nvme_buffer_elems=BUFFER, aio_block_size_bytes=b << 20) for b in (8, 16)]
    ev = evaluation(plans)
    np.testing.assert_array_equal(capacity_masks(ev)["aio_block_size"], [False, True])
    r = only(capacity_reasons(ev, 1), "aio_block_size")
    assert "aio block size 16,777,216 bytes > 8,388,608" in r.message and "--aio-block-size 8388608" in r.message
    halves = [Plan(offload="nvme", dp=2, batch_size=2, nvme_buffer_elems=BUFFER, aio_block_size_bytes=8 << 20)]
    assert capacity_masks(evaluation(halves))["aio_block_size"].all()
    cpu = [Plan(offload="cpu", aio_block_size_bytes=64 << 20)]  # nothing is swapped: the block changes nothing
    assert not capacity_masks(evaluation(cpu))["aio_block_size"].any()
