"""cost.streaming: what ZeRO-3 copies host->device (or NVMe->host->device) per forward, and how fast.

Placement: 10 GB/s pinned, 5 GB/s pageable host->device per GPU, 2 GB/s NVMe. ROUND efficiencies:
pinned 0.5, pageable 0.8, NVMe 0.5, so the achieved rates are 5, 4 and 1 GB/s.
toy_dense layer: 15,204,352 matrix weights + 2 RMSNorms of 1024 (persistent under the 1e5 default).
"""

from __future__ import annotations

import numpy as np
import pytest

from hpi.planner.catalog import load_model
from hpi.planner.cost.inputs import QUANT_META_BYTES_PER_GROUP, Knobs
from hpi.planner.cost.phase import decode_phase, prefill_phase
from hpi.planner.cost.shape import DENSE, EMBED, EXPERTS_GATHERED_WHOLE, HEAD, MOE
from hpi.planner.cost.streaming import (
    fetched_elems_per_rank,
    fetches_weights,
    h2d_bandwidth,
    kv_transfer_bytes,
    kv_transfer_time,
    persistent_elems,
    weight_stream_bytes,
    weight_stream_time,
)
from hpi.planner.specs.plan import QUANT_GROUP_SIZE, Plan

H, V = 1024, 32000
LAYER_MATRICES = 15_204_352
LAYER_NORMS = 2 * 1024
DECODE_CTX = 512 + 31 / 2 + 1
KV_ELEMS = 2 * 2 * 128


def knobs(*plans: Plan) -> Knobs:
    return Knobs.from_plans(list(plans))


def stream_bytes(lay, k, phase=None):
    phase = phase or decode_phase(lay, k)
    return weight_stream_bytes(lay, k, phase, k.bytes_per_weight(lay.table.fetch_matrix_fraction))


# ---- who streams ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "offload,dp,fetches", [("none", 1, False), ("none", 2, True), ("cpu", 1, True), ("nvme", 1, True), ("cpu", 2, True)]
)
def test_fetches_weights(kit, offload: str, dp: int, fetches: bool) -> None:
    lay = kit.arrangement(kit.toy_dense(), dp=dp)
    k = knobs(Plan(offload=offload, dp=dp, batch_size=dp))
    assert bool(fetches_weights(lay, k)[0]) is fetches


def test_no_streaming_without_offload_on_one_rank(kit) -> None:
    lay = kit.arrangement(kit.toy_dense())
    k = knobs(Plan(), Plan(kv_offload=True))
    for phase in (prefill_phase(lay, k), decode_phase(lay, k)):
        assert not fetched_elems_per_rank(lay, k, phase).any()
        assert not stream_bytes(lay, k, phase).any()


def test_dp_without_offload_gathers_but_copies_nothing_from_host(kit) -> None:
    lay = kit.arrangement(kit.toy_dense(), dp=2)
    k = knobs(Plan(dp=2, batch_size=2))
    dec = decode_phase(lay, k)
    assert fetched_elems_per_rank(lay, k, dec)[0, DENSE] == LAYER_MATRICES  # all-gathered over dp
    assert not stream_bytes(lay, k, dec).any()


# ---- persistence threshold ------------------------------------------------------------------------


def thresholds(*values: float, bits: int = 16) -> Knobs:
    return knobs(*(Plan(persistence_threshold_elems=int(v), weight_bits=bits) for v in values))


def test_persistent_elems_by_threshold(kit) -> None:
    lay = kit.arrangement(kit.toy_dense())
    p = persistent_elems(lay, thresholds(0, 1e5, 3e5, 1e12))
    np.testing.assert_array_equal(p[0], [0, 0, 0, 0])
    np.testing.assert_array_equal(p[1], [LAYER_NORMS, 0, 0, H])  # norms only
    np.testing.assert_array_equal(p[2], [LAYER_NORMS + 2 * 1024 * 256, 0, 0, H])  # + k_proj, v_proj
    np.testing.assert_array_equal(p[3], [LAYER_MATRICES + LAYER_NORMS, 0, V * H, V * H + H])  # everything


def test_a_quantized_matrix_persists_by_its_stored_elements(kit) -> None:
    """DeepSpeed compares ds_numel, the packed bytes and scales as 16-bit elements: a 4-bit k_proj (1024 x 256)
    counts 262,144 x (0.5 + 4/64) / 2 = 73,728, under the 1e5 threshold, so it persists where a 16-bit one does
    not; the 16-bit norms count one for one."""
    lay = kit.arrangement(kit.toy_dense())
    kv = 2 * 1024 * 256
    np.testing.assert_array_equal(persistent_elems(lay, thresholds(1e5, bits=4))[0], [LAYER_NORMS + kv, 0, 0, H])
    np.testing.assert_array_equal(persistent_elems(lay, thresholds(1e5, bits=8))[0], [LAYER_NORMS, 0, 0, H])
    np.testing.assert_array_equal(persistent_elems(lay, thresholds(73_728, bits=4))[0], [LAYER_NORMS + kv, 0, 0, H])
    np.testing.assert_array_equal(persistent_elems(lay, thresholds(73_727, bits=4))[0], [LAYER_NORMS, 0, 0, H])


def test_persistence_threshold_is_inclusive_like_deepspeed(kit) -> None:
    lay = kit.arrangement(kit.toy_dense())
    # A threshold equal to the norm's size (1024): DeepSpeed persists the norms.
    assert persistent_elems(lay, thresholds(1024))[0, DENSE] == LAYER_NORMS


def test_persistence_removes_small_tensors_from_the_stream(kit) -> None:
    lay = kit.arrangement(kit.toy_dense())
    k = knobs(
        Plan(offload="cpu", persistence_threshold_elems=0),
        Plan(offload="cpu"),  # 1e5: the norms stay on the GPU
        Plan(offload="cpu", persistence_threshold_elems=300_000),  # and k_proj, v_proj too
    )
    f = fetched_elems_per_rank(lay, k, decode_phase(lay, k))[:, DENSE]
    np.testing.assert_array_equal(f, [LAYER_MATRICES + LAYER_NORMS, LAYER_MATRICES, LAYER_MATRICES - 2 * 1024 * 256])


# ---- bytes per forward ----------------------------------------------------------------------------


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_cpu_offload_bytes_per_forward_16_bit(kit, dp: int) -> None:
    """Each rank copies its 1/dp of every fetched tensor, 2 bytes a weight."""
    lay = kit.arrangement(kit.toy_dense(), dp=dp)
    k = knobs(Plan(offload="cpu", dp=dp, batch_size=dp))
    for phase in (prefill_phase(lay, k), decode_phase(lay, k)):
        b = stream_bytes(lay, k, phase)[0]
        assert b[DENSE] == pytest.approx(LAYER_MATRICES * 2 / dp)
        assert b[EMBED] == pytest.approx(V * H * 2 / dp)
        assert b[HEAD] == pytest.approx(V * H * 2 / dp)  # the final norm persists


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_offload_streams_packed_bytes_and_scales(kit, bits: int) -> None:
    """bits/8 bytes a matrix weight plus an fp16 scale and zero point (4 bytes) per group of 64."""
    assert QUANT_META_BYTES_PER_GROUP / QUANT_GROUP_SIZE == 4 / 64
    lay = kit.arrangement(kit.toy_dense())
    # A threshold that keeps the norms only (a quantized matrix's smaller ds_numel persists k and v at 1e5)
    k = knobs(Plan(offload="cpu", weight_bits=bits, persistence_threshold_elems=1024))
    b = stream_bytes(lay, k)[0]
    per_matrix_weight = bits / 8 + 4 / 64
    # The fetched part is all matrices; bytes_per_weight averages in the (persistent) norms: within 0.1%.
    assert b[DENSE] == pytest.approx(LAYER_MATRICES * per_matrix_weight, rel=1e-3)
    assert b[EMBED] == pytest.approx(V * H * per_matrix_weight)
    ratio = b[DENSE] / stream_bytes(lay, knobs(Plan(offload="cpu", persistence_threshold_elems=1024)))[0, DENSE]
    assert ratio == pytest.approx(per_matrix_weight / 2, rel=1e-3)


def test_tied_head_streams_the_quantized_matrix(kit) -> None:
    m = load_model("opt-30b")
    lay = kit.arrangement(m)
    k = knobs(Plan(offload="cpu", weight_bits=4))
    b = stream_bytes(lay, k)[0]
    # The same V x h matrix as the embedding, fetched again at the packed width (4 bits + group scales),
    # not at 16 bits; the final LayerNorm under the threshold persists. (EMBED also holds OPT's positions.)
    packed = m.vocab_size * m.hidden_size * (4 / 8 + 4 / 64)
    assert b[HEAD] == pytest.approx(packed, rel=1e-3)


@pytest.mark.parametrize("offload", ["cpu", "nvme"])
def test_moe_streaming(kit, offload: str) -> None:
    m = kit.toy_moe()
    lay = kit.arrangement(m)
    t = lay.table
    k = knobs(Plan(offload=offload, batch_size=1), Plan(offload=offload, batch_size=64))
    f = fetched_elems_per_rank(lay, k, decode_phase(lay, k))[:, MOE]
    expert = 3 * 1024 * 2048
    base = t.sharded[MOE] + t.replicated[MOE] - 2 * 1024 - 8 * 1024  # norms and router (8 x 1024) persist
    if EXPERTS_GATHERED_WHOLE:
        # The fused experts module is gathered whole whatever the router picks.
        np.testing.assert_allclose(f, [base + 8 * expert] * 2)
    else:
        n = 8 * (1 - (1 - 2 / 8) ** np.array([1.0, 64.0]))
        np.testing.assert_allclose(f, base + n * expert)


# ---- bandwidth and time ---------------------------------------------------------------------------


def test_h2d_bandwidth_pinned_pageable_and_nvme(kit) -> None:
    lay = kit.arrangement(kit.toy_dense())
    k = knobs(
        Plan(offload="cpu", pin_memory=True),
        Plan(offload="cpu", pin_memory=False),
        Plan(offload="nvme", pin_memory=False),  # NVMe staging buffers are always pinned
        Plan(offload="nvme", pin_memory=True),
    )
    np.testing.assert_allclose(h2d_bandwidth(lay, k), [10e9 * 0.5, 5e9 * 0.8, 10e9 * 0.5, 10e9 * 0.5])


def test_weight_stream_time_nvme_is_the_slower_hop(kit) -> None:
    lay = kit.arrangement(kit.toy_dense())
    k = knobs(Plan(offload="cpu"), Plan(offload="nvme"), Plan(offload="cpu", pin_memory=False))
    b = stream_bytes(lay, k)
    t_h2d, t_nvme = weight_stream_time(lay, k, b)
    layer = LAYER_MATRICES * 2
    np.testing.assert_allclose(t_h2d[:, DENSE], [layer / 5e9, layer / 5e9, layer / 4e9])
    np.testing.assert_allclose(t_nvme[:, DENSE], [0.0, layer / 1e9, 0.0])  # 2 GB/s x 0.5
    assert np.maximum(t_h2d, t_nvme)[1, DENSE] == t_nvme[1, DENSE]  # the drive sets the pace


def test_fast_nvme_leaves_pcie_the_bottleneck(kit) -> None:
    lay = kit.arrangement(kit.toy_dense(), nvme_read=40e9)
    k = knobs(Plan(offload="nvme"))
    t_h2d, t_nvme = weight_stream_time(lay, k, stream_bytes(lay, k))
    assert t_nvme[0, DENSE] == pytest.approx(LAYER_MATRICES * 2 / 20e9)
    assert t_h2d[0, DENSE] > t_nvme[0, DENSE]


# ---- KV cache offload -----------------------------------------------------------------------------


@pytest.mark.parametrize("tp,split", [(1, 1), (2, 2), (4, 2)])
def test_kv_offload_bytes_in_decode_only(kit, tp: int, split: int) -> None:
    lay = kit.arrangement(kit.toy_dense(), tp=tp)
    k = knobs(Plan(tp=tp, batch_size=4, kv_offload=True), Plan(tp=tp, batch_size=4))
    dec = kv_transfer_bytes(lay, k, decode_phase(lay, k))
    per_layer = 4 * DECODE_CTX * KV_ELEMS / split * 2
    np.testing.assert_allclose(dec[0], [per_layer, per_layer, 0.0, 0.0])
    assert not dec[1].any()  # KV cache on the GPU: nothing copied
    assert not kv_transfer_bytes(lay, k, prefill_phase(lay, k)).any()  # prefill writes device->host


def test_kv_transfer_time_uses_the_host_link(kit) -> None:
    lay = kit.arrangement(kit.toy_dense())
    k = knobs(Plan(kv_offload=True), Plan(kv_offload=True, pin_memory=False))
    b = kv_transfer_bytes(lay, k, decode_phase(lay, k))
    t = kv_transfer_time(lay, k, b)
    np.testing.assert_allclose(t[:, DENSE], [b[0, DENSE] / 5e9, b[1, DENSE] / 4e9])
