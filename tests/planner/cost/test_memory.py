"""cost.memory: each GPU, CPU, pinned and NVMe figure worked out by hand for the toy model.

toy_dense: 4 layers of 15,204,352 matrix weights + 2048 norm weights, embedding 32000 x 1024, head
32000 x 1024 + a 1024 norm: 126,362,624 parameters. KV: 2 x 2 heads x 128 = 512 elements per token per
layer. Workload: prompt 512 + gen 32 = 544 tokens of context. ROUND: 1 GB GPU reserve, 2 GB per process.
"""

from __future__ import annotations

import numpy as np
import pytest

from hpi.planner.cost.compute import stored_elems_per_rank
from hpi.planner.cost.inputs import Knobs
from hpi.planner.cost.memory import CPU_PARTS, GPU_PARTS, live_param_elems, memory
from hpi.planner.cost.shape import module_table
from hpi.planner.cost.streaming import persistent_elems
from hpi.planner.specs.plan import Plan
from hpi.planner.specs.workload import Workload

GB = 1e9
H, V, F = 1024, 32000, 4096
LAYERS = 4
LAYER_MATRICES = 15_204_352
LAYER_NORMS = 2048
PARAMS = LAYERS * (LAYER_MATRICES + LAYER_NORMS) + V * H + V * H + H
MATRICES = LAYERS * LAYER_MATRICES + 2 * V * H
VECTORS = PARAMS - MATRICES
CONTEXT = 544
KV_PER_LAYER_SEQ = 2 * 2 * 128 * CONTEXT * 2  # K and V, 2 heads of 128, 16-bit
KV_PROMPT_PER_LAYER_SEQ = 2 * 2 * 128 * 512 * 2  # the prompt's cache: what the prefill holds
# The larger of the attention block (residual + normed 2h, q/k/v, rotated q/k, output) and the FFN's
# 2h + act, up and their product (3f): 14,336 elements per token.
ACT_PER_TOKEN = max(2 * H + (8 + 2 * 2) * 128 + (8 + 2) * 128 + 8 * 128, 2 * H + 3 * F)
LOGITS = V * 4 * 2  # fp32 logits and scores of one sequence
GATHERED_AFTER_EMBEDDING = LAYERS * LAYER_MATRICES + V * H  # the layers' matrices and the head


def mem(kit, plans, tp=1, pp=1, dp=1, model=None, **kw):
    lay = kit.arrangement(model or kit.toy_dense(), tp, pp, dp, **kw)
    return lay, memory(lay, Knobs.from_plans(plans))


def test_toy_parameter_count(kit) -> None:
    assert kit.toy_dense().params_total == PARAMS == 126_362_624


def test_gpu_resident_16_bit_by_hand(kit) -> None:
    _, m = mem(kit, [Plan(batch_size=2)])
    parts = {k: v[0] for k, v in m.gpu_parts.items()}
    assert parts["resident_weights"] == pytest.approx(PARAMS * 2)
    assert parts["persistent_weights"] == 0.0  # nothing is gathered, so nothing is "persistent"
    assert parts["quant_scales"] == 0.0
    assert parts["live_params"] == 0.0
    # The prefill is the peak (its intermediates outweigh the 32 generated tokens' cache): the prompt's cache,
    # while a layer runs (the logits come later, when the intermediates are gone).
    assert parts["kv_cache"] == pytest.approx(LAYERS * 2 * KV_PROMPT_PER_LAYER_SEQ)
    assert parts["activations"] == pytest.approx(2 * 512 * ACT_PER_TOKEN * 2)
    assert parts["framework"] == 1 * GB
    assert m.gpu_peak_bytes[0] == pytest.approx(sum(parts.values()))
    assert set(m.gpu_parts) == set(GPU_PARTS)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_resident_weights_and_scales(kit, bits: int) -> None:
    """Matrices at bits/8 bytes plus 4 bytes of scale + zero point per 64 of them; vectors stay 16-bit."""
    _, m = mem(kit, [Plan(weight_bits=bits)])
    assert m.gpu_parts["resident_weights"][0] == pytest.approx(MATRICES * bits / 8 + VECTORS * 2)
    assert m.gpu_parts["quant_scales"][0] == pytest.approx(MATRICES * 4 / 64)


def test_zero3_partition_over_dp_without_offload(kit) -> None:
    """dp=2: each rank keeps half of every gathered tensor; the norms (< 1e5 elements) persist whole."""
    _, m = mem(kit, [Plan(dp=2, batch_size=2)], dp=2)
    persistent = LAYERS * LAYER_NORMS + H
    assert m.gpu_parts["persistent_weights"][0] == pytest.approx(persistent * 2)
    assert m.gpu_parts["resident_weights"][0] == pytest.approx((PARAMS - persistent) / 2 * 2)
    # Gathering: the 5e7 bucket exceeds what a forward releases per fetch (126,353,408 elements over 30
    # modules), so DeepSpeed's prefetch climbs to max_live (1e9): capped by everything the forward
    # gathers less the embedding that opens it (released before the prefetch reaches the end).
    assert m.gpu_parts["live_params"][0] == pytest.approx(GATHERED_AFTER_EMBEDDING * 2)
    # One sequence per replica, at the prefill's fullest layer: the first, where everything the forward
    # still gathers is in flight, beside the one layer of cache built so far (cost.memory._prefill_layer_peak).
    assert m.gpu_parts["kv_cache"][0] == pytest.approx(1 * KV_PROMPT_PER_LAYER_SEQ)


def test_a_quantized_matrix_persists_packed_and_counts_its_stored_elements(kit) -> None:
    """DeepSpeed counts ZeRO-3's elements as stored (ds_numel: 0.281 a 4-bit weight): at 1e5 a 4-bit k and v
    projection (262,144 weights, 73,728 stored) persist, packed with their scales, beside the 16-bit norms; a 4-bit
    bucket and max live hold 1/0.281 times the weights a 16-bit one does."""
    kv = 2 * 1024 * 256
    _, m = mem(kit, [Plan(offload="cpu", weight_bits=4), Plan(offload="cpu", weight_bits=16)])
    norms = (LAYERS * LAYER_NORMS + H) * 2
    np.testing.assert_allclose(m.gpu_parts["persistent_weights"], [norms + LAYERS * kv * (0.5 + 4 / 64), norms])
    per_weight = (0.5 + 4 / 64) / 2
    lay = kit.arrangement(kit.toy_dense())
    k = Knobs.from_plans([Plan(offload="cpu", weight_bits=bits, max_live_elems=10_000_000) for bits in (4, 16)])
    fetched = np.broadcast_to(lay.table.sharded + lay.table.replicated, (2, 4)) - persistent_elems(lay, k)
    layers, _ = live_param_elems(lay, k, fetched)
    # The 5e7 bucket climbs to max live 1e7 stored elements: 1e7 / 0.281 4-bit weights, 1e7 16-bit ones, each
    # overshooting by the same tensor (the head).
    assert layers[0, 0] - layers[1, 0] == pytest.approx(10_000_000 / per_weight - 10_000_000, rel=1e-9)


def test_cpu_offload_keeps_only_persistent_and_live_weights(kit) -> None:
    plans = [Plan(offload="cpu"), Plan(offload="cpu", max_live_elems=40_000_000),
             Plan(offload="cpu", prefetch_bucket_elems=0),
             Plan(offload="cpu", prefetch_bucket_elems=1_000_000, max_live_elems=40_000_000)]  # fmt: skip
    _, m = mem(kit, plans)
    assert not m.gpu_parts["resident_weights"].any()
    assert not m.gpu_parts["quant_scales"].any()
    np.testing.assert_allclose(m.gpu_parts["persistent_weights"], (LAYERS * LAYER_NORMS + H) * 2)
    # A forward gathers 126,353,408 elements in 30 fetches (embedding, 7 per layer, head): 4.2e6 each.
    # - bucket 5e7 > 4.2e6: the prefetch climbs to max_live 1e9, capped by what the forward gathers
    #   after the opening embedding;
    # - max_live 4e7: the climb stops there, overshooting by one tensor, the 32,768,000-element head;
    # - no prefetch: the largest module alone;
    # - bucket 1e6 < 4.2e6 keeps pace with use: the largest module plus the bucket.
    np.testing.assert_allclose(
        m.gpu_parts["live_params"],
        [GATHERED_AFTER_EMBEDDING * 2, (40_000_000 + V * H) * 2, V * H * 2, (V * H + 1_000_000) * 2],
    )


@pytest.mark.parametrize("tp,split", [(1, 1), (2, 2), (4, 2)])
def test_kv_cache_by_hand(kit, tp: int, split: int) -> None:
    lay, m = mem(kit, [Plan(tp=tp, batch_size=8), Plan(tp=tp, batch_size=8, kv_offload=True)], tp=tp)
    # 2 * kv_heads/split * head_dim * tokens * batch * 2 bytes per layer, at the prefill peak: the prompt.
    assert m.gpu_parts["kv_cache"][0] == pytest.approx(LAYERS * 8 * KV_PROMPT_PER_LAYER_SEQ / split)
    # KV offload: the layer in use and the one being prefetched.
    assert m.gpu_parts["kv_cache"][1] == pytest.approx(2 * 8 * KV_PROMPT_PER_LAYER_SEQ / split)
    assert m.cpu_parts["offloaded_kv_cache"][1] == pytest.approx(tp * LAYERS * 8 * KV_PER_LAYER_SEQ / split)
    assert m.cpu_parts["offloaded_kv_cache"][0] == 0.0


def test_kv_offload_with_micro_batches_holds_one_micro_batch(kit) -> None:
    _, m = mem(kit, [Plan(pp=2, batch_size=8, micro_batches=4, kv_offload=True),
                     Plan(pp=2, batch_size=8, micro_batches=4)], pp=2)
    assert m.gpu_parts["kv_cache"][0] == pytest.approx(2 * 2 * KV_PROMPT_PER_LAYER_SEQ)  # 2 layers x 2 sequences
    # the stage's 2 layers, the whole batch
    assert m.gpu_parts["kv_cache"][1] == pytest.approx(2 * 8 * KV_PROMPT_PER_LAYER_SEQ)


def test_the_peak_is_the_prefill_or_the_last_decode_step(kit) -> None:
    """A long generation's cache outgrows the prefill's intermediates: the last decode step is the peak,
    with the whole context cached and no intermediates (the logits stay)."""
    lay, m = mem(kit, [Plan(batch_size=2)], workload=Workload(prompt_len_tokens=16, gen_len_tokens=4096))
    per_layer_seq = 2 * 2 * 128 * (16 + 4096) * 2
    assert m.gpu_parts["kv_cache"][0] == pytest.approx(LAYERS * 2 * per_layer_seq)
    assert m.gpu_parts["activations"][0] == pytest.approx(2 * LOGITS)
    prefill = LAYERS * 2 * 2 * 2 * 128 * 16 * 2 + 2 * 16 * ACT_PER_TOKEN * 2
    assert prefill < m.gpu_parts["kv_cache"][0]


def test_tensor_parallel_divides_sharded_weights(kit) -> None:
    lay, m = mem(kit, [Plan(tp=2)], tp=2)
    per_rank = LAYERS * (LAYER_MATRICES / 2 + LAYER_NORMS) + V * H + V * H / 2 + H
    assert m.gpu_parts["resident_weights"][0] == pytest.approx(per_rank * 2)
    assert m.gpu_parts["activations"][0] == pytest.approx(512 * (2 * H + 3 * F / 2) * 2)  # the FFN's half


def test_pipeline_stages_and_the_fullest_gpu(kit) -> None:
    lay, m = mem(kit, [Plan(pp=2, batch_size=2, micro_batches=2)], pp=2)
    np.testing.assert_array_equal(lay.stage_counts[:, :2].sum(axis=1), [2, 2])
    # Stage 1 holds the head (one norm more than the embedding): it is the fullest.
    assert m.fullest_stage[0] == 1
    assert m.gpu_parts["resident_weights"][0] == pytest.approx((2 * (LAYER_MATRICES + LAYER_NORMS) + V * H + H) * 2)
    assert m.gpu_parts["kv_cache"][0] == pytest.approx(2 * 2 * KV_PROMPT_PER_LAYER_SEQ)
    assert m.gpu_parts["activations"][0] == pytest.approx(1 * 512 * ACT_PER_TOKEN * 2)


def test_gpu_parts_sum_to_peak_across_plans(kit) -> None:
    plans = [
        Plan(offload=o, weight_bits=b, kv_offload=kv, pp=2, batch_size=4, micro_batches=mb)
        for o in ("none", "cpu", "nvme") for b in (16, 8, 4) for kv in (False, True) for mb in (1, 2, 4)
    ]  # fmt: skip
    _, m = mem(kit, plans, pp=2)
    np.testing.assert_allclose(sum(m.gpu_parts.values()), m.gpu_peak_bytes)
    np.testing.assert_allclose(sum(m.cpu_parts[p] for p in CPU_PARTS), m.cpu_bytes)
    assert set(m.cpu_parts) == set(CPU_PARTS)


# ---- CPU, pinned, NVMe ------------------------------------------------------------------------------


def test_cpu_offload_host_memory_by_hand(kit) -> None:
    _, m = mem(kit, [Plan(offload="cpu"), Plan(offload="cpu", pin_memory=False), Plan(offload="cpu", weight_bits=4)])
    np.testing.assert_allclose(m.cpu_parts["offloaded_weights"],
                               [PARAMS * 2, PARAMS * 2, MATRICES * (0.5 + 4 / 64) + VECTORS * 2])
    np.testing.assert_allclose(m.cpu_parts["process"], 2 * GB)
    assert not m.cpu_parts["nvme_buffers"].any() and not m.nvme_bytes.any()
    rounding = m.cpu_parts["pinned_rounding"]  # cost.pinned: torch pins each partition in a power-of-two block
    assert rounding[0] > 0 and rounding[1] == 0.0 and rounding[2] > 0
    np.testing.assert_allclose(m.cpu_bytes, m.cpu_parts["offloaded_weights"] + rounding + 2 * GB)
    # Pinned only with pin_memory.
    np.testing.assert_allclose(m.pinned_bytes, [PARAMS * 2 + rounding[0], 0.0,
                                                m.cpu_parts["offloaded_weights"][2] + rounding[2]])


def test_gpu_resident_plan_uses_only_the_process_on_the_host(kit) -> None:
    _, m = mem(kit, [Plan()])
    assert m.cpu_bytes[0] == 2 * GB
    assert m.pinned_bytes[0] == 0.0 and m.nvme_bytes[0] == 0.0
    assert m.weight_bytes_total[0] == pytest.approx(PARAMS * 2)


def test_nvme_offload(kit) -> None:
    _, m = mem(kit, [Plan(offload="nvme", nvme_buffer_count=4, nvme_buffer_elems=50_000_000),
                     Plan(offload="nvme", pin_memory=False)])
    np.testing.assert_allclose(m.cpu_parts["nvme_buffers"], [4 * 5e7 * 2, 5 * 1e8 * 2])
    assert not m.cpu_parts["offloaded_weights"].any()
    np.testing.assert_allclose(m.nvme_bytes, PARAMS * 2)
    # The staging buffers are pinned whatever pin_memory says; the weights live on the drive.
    np.testing.assert_allclose(m.pinned_bytes, m.cpu_parts["nvme_buffers"])
    assert not m.gpu_parts["resident_weights"].any()


def test_kv_offload_is_pinned_only_with_pin_memory(kit) -> None:
    _, m = mem(kit, [Plan(kv_offload=True, batch_size=4), Plan(kv_offload=True, batch_size=4, pin_memory=False)])
    kv = LAYERS * 4 * KV_PER_LAYER_SEQ
    np.testing.assert_allclose(m.cpu_parts["offloaded_kv_cache"], kv)
    np.testing.assert_allclose(m.pinned_bytes, [kv, 0.0])


def test_host_memory_sums_the_ranks_of_a_node(kit) -> None:
    """tp=2, dp=2 on one node: four processes; each rank holds 1/dp of its TP shard."""
    lay, m = mem(kit, [Plan(offload="cpu", tp=2, dp=2, batch_size=2)], tp=2, dp=2)
    shard = LAYERS * (LAYER_MATRICES / 2 + LAYER_NORMS) + V * H + V * H / 2 + H
    assert m.cpu_parts["offloaded_weights"][0] == pytest.approx(4 * shard / 2 * 2)
    assert m.cpu_parts["process"][0] == pytest.approx(4 * 2 * GB)
    assert m.weight_bytes_total[0] == pytest.approx(2 * shard * 2)  # the embedding is replicated over TP


def test_each_node_holds_its_own_stage(kit) -> None:
    """pp=2 over 2 nodes: each host holds one stage's weights; the reports take the fullest node."""
    lay, m = mem(kit, [Plan(offload="nvme", pp=2, batch_size=1)], pp=2, nodes=2)
    np.testing.assert_array_equal(lay.ranks_per_node_stage, [[1, 0], [0, 1]])
    stage1 = (2 * (LAYER_MATRICES + LAYER_NORMS) + V * H + H) * 2
    stage0 = (2 * (LAYER_MATRICES + LAYER_NORMS) + V * H) * 2
    assert m.nvme_bytes[0] == pytest.approx(stage1)
    assert m.weight_bytes_total[0] == pytest.approx(stage0 + stage1)
    assert m.cpu_parts["process"][0] == pytest.approx(2 * GB)  # one rank per node


def test_moe_stores_every_expert(kit) -> None:
    model = kit.toy_moe()
    lay, m = mem(kit, [Plan(), Plan(offload="cpu")], model=model)
    assert m.gpu_parts["resident_weights"][0] == pytest.approx(model.params_total * 2)
    assert m.cpu_parts["offloaded_weights"][1] == pytest.approx(model.params_total * 2)
    # A Mixtral-family MoE block is one ZeRO-3 leaf (DeepSpeed's default leaf classes): the router and all 8
    # experts (8 x 3 x 1024 x 2048) are a layer's largest gather; a DeepSeek-family layer gathers one expert.
    assert module_table(model).largest_gather[1] == 8 * 3 * 1024 * 2048 + 8 * 1024
    assert module_table(kit.toy_moe(family="deepseek_v3")).largest_gather[1] == 3 * 1024 * 2048
    # The default 5e7 bucket climbs past everything a forward gathers after the embedding: each layer's
    # attention (2,621,440) and experts (50,331,648; the 8,192-element router persists), and the head.
    per_layer = 2 * 1024 * 1024 + 2 * 1024 * 256 + 8 * 3 * 1024 * 2048
    assert m.gpu_parts["live_params"][1] == pytest.approx((4 * per_layer + V * H) * 2)


def test_stored_elems_per_rank_tied_head_keeps_its_norm(kit) -> None:
    model = kit.toy_dense(tied_embeddings=True)
    lay = kit.arrangement(model)
    assert stored_elems_per_rank(lay)[3] == H
    _, m = mem(kit, [Plan()], model=model)
    assert m.gpu_parts["resident_weights"][0] == pytest.approx(model.params_total * 2)


# ---- the moments of the peak: layers running, or the embedding / head running -------------------------

DOWN_PROJ = F * H  # the last module a layer gathers, just before the head


def test_the_head_is_gathered_alone_when_max_live_is_below_the_last_layer_module(kit) -> None:
    """DeepSpeed prefetches nothing while what is available fills max_live: with max live 3e6 < the
    4.19e6-element down_proj before it, the head is gathered on demand, alone (4x H200, 70B, 2h^2 knobs:
    2.2 GB = the 2.1 GB head). At 5e6 the prefetch reaches it from the last layer and overshoots by it."""
    small = Plan(offload="cpu", prefetch_bucket_elems=3_000_000, max_live_elems=3_000_000)
    room = Plan(offload="cpu", prefetch_bucket_elems=3_000_000, max_live_elems=5_000_000)
    _, m = mem(kit, [small, room])
    parts = {k: v[0] for k, v in m.gpu_parts.items()}
    # the vocabulary moment is the peak: the head ending the prefill, beside the prompt's cache, the hidden
    # states and the logits
    assert parts["live_params"] == pytest.approx(V * H * 2)
    assert parts["kv_cache"] == pytest.approx(LAYERS * KV_PROMPT_PER_LAYER_SEQ)
    assert parts["activations"] == pytest.approx(512 * H * 2 + LOGITS)
    # with room, the layers' moment: max live + the head, beside the prefill's intermediates
    assert m.gpu_parts["live_params"][1] == pytest.approx((5_000_000 + V * H) * 2)
    assert m.gpu_parts["activations"][1] == pytest.approx(512 * ACT_PER_TOKEN * 2)
    np.testing.assert_allclose(m.gpu_peak_bytes, [sum(p[i] for p in m.gpu_parts.values()) for i in (0, 1)])


@pytest.mark.parametrize("bits,buffer", [(8, 2.0), (4, 3.0)])
def test_quantized_weights_are_gathered_packed_and_dequantized_into_a_16_bit_copy(kit, bits: int,
                                                                                   buffer: float) -> None:
    """ZeRO-3 gathers the packed bytes and scales; the embedding, dequantized whole for its lookup, adds a
    16-bit copy (4-bit: and the unpacked uint8 tensor) at its moment (1x H100, 8B offload: 1.76 / 2.02 GB at
    8 / 4 bits, where 16-bit weights with the same knobs peaked at 1.18 GB)."""
    _, m = mem(kit, [Plan(offload="cpu", weight_bits=bits, prefetch_bucket_elems=3_000_000, max_live_elems=3_000_000)])
    assert m.gpu_parts["live_params"][0] == pytest.approx(V * H * (bits / 8 + 4 / 64))
    assert m.gpu_parts["dequant_buffers"][0] == pytest.approx(V * H * buffer)


def test_nvme_holds_at_most_buffer_count_parameters_in_flight(kit) -> None:
    """Each swapped-in parameter takes one of nvme_buffer_count staging buffers: beside the module in use
    (here the head) at most 5 - 1 of the largest layer tensors are in flight, however large
    stage3_max_live_parameters is (1x H100, 8B NVMe with max live 3e9: 1.5 GB allocated); with 16 buffers
    the 2e7 bucket binds first."""
    plan = dict(prefetch_bucket_elems=20_000_000, max_live_elems=3_000_000_000, nvme_buffer_elems=40_000_000)
    _, m = mem(kit, [Plan(offload="nvme", **plan), Plan(offload="cpu", **plan),
                     Plan(offload="nvme", nvme_buffer_count=16, **plan)])
    assert m.gpu_parts["live_params"][0] == pytest.approx((V * H + 4 * DOWN_PROJ) * 2)
    assert m.gpu_parts["live_params"][2] == pytest.approx((V * H + 20_000_000) * 2)
    assert m.gpu_parts["live_params"][1] == pytest.approx(GATHERED_AFTER_EMBEDDING * 2)  # CPU offload: the climb


def test_the_prefill_peak_sweeps_the_layers(kit) -> None:
    """The cache grows layer by layer while what is left to gather shrinks: with a prompt of 8192 tokens
    (4 MB of cache a layer) and max live 1e9, the prefetch holds everything after layer i, so the sum
    kv(i) + act + live(i) peaks at the first layer (live = 93.6e6 elements); resident, at the last."""
    wl = Workload(8192, 32)
    plans = [Plan(offload="cpu", batch_size=1), Plan(batch_size=1)]
    _, m = mem(kit, plans, workload=wl)
    kv_layer = 2 * 2 * 128 * 8192 * 2
    assert m.gpu_parts["live_params"][0] == pytest.approx(GATHERED_AFTER_EMBEDDING * 2)
    assert m.gpu_parts["kv_cache"][0] == pytest.approx(kv_layer)
    assert m.gpu_parts["kv_cache"][1] == pytest.approx(LAYERS * kv_layer)
    assert m.gpu_parts["activations"][0] == pytest.approx(8192 * ACT_PER_TOKEN * 2)


def test_layer_leaves_hold_a_whole_layer_gathered(kit) -> None:
    """With each decoder layer one ZeRO-3 leaf the largest gather is the layer, so live parameters at a bucket
    below it are the layer plus the bucket (cost.memory.live_param_elems, pace regime), not the largest module."""
    from hpi.planner.cost.memory import live_param_elems

    model = kit.toy_dense()
    arrangement = kit.arrangement(model)
    bucket = 1_000_000
    plans = [Plan(offload="cpu", prefetch_bucket_elems=bucket, zero3_leaf=leaf) for leaf in ("module", "layer")]
    knobs = Knobs.from_plans(plans)
    fetched = np.tile(module_table(model).sharded + module_table(model).replicated, (2, 1))
    layers, _ = live_param_elems(arrangement, knobs, fetched)
    assert layers[0, 0] == 1024 * 4096 + bucket  # one FFN projection
    assert layers[1, 0] == model.dense_layer_params + bucket  # the whole layer
