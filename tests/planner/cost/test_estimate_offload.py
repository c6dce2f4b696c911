"""cost.estimate under ZeRO-3 offload: how a module's copies, its kernels, its dequantization and the host's hooks
overlap (the per-module rule, leaf by leaf where ZeRO-3 gathers), under DeepSpeed's host fetch wait, hpi's
stream-ordered and copy-ordered waits, and with routed experts.

The rest of cost.estimate (the breakdown, the totals, the directions, Estimate) is tested in test_estimate.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hpi.planner.cost.activations import activation_time
from hpi.planner.cost.collectives import dp_allgather_time, tp_collective_host_time, tp_collective_time
from hpi.planner.cost.compute import compute_time
from hpi.planner.cost.dequant import dequant_host_time, dequant_time
from hpi.planner.cost.estimate import (
    EXPOSED_PARTS,
    evaluate,
    host_waits_for_fetch,
    leaf_shares,
    prefetch_overlap,
    routing_waits_for_leaf,
)
from hpi.planner.cost.inputs import Knobs
from hpi.planner.cost.overhead import compiled_forwards, layer_device_time, module_overhead_time
from hpi.planner.cost.phase import decode_phase, prefill_phase
from hpi.planner.cost.shape import DENSE, EMBED, HEAD, MOE
from hpi.planner.cost.streaming import (
    fetched_elems_per_rank,
    kv_transfer_bytes,
    kv_transfer_time,
    weight_stream_bytes,
    weight_stream_time,
)
from hpi.planner.specs.plan import Plan
from hpi.planner.specs.workload import Workload

H, V = 1024, 32000
LAYER_MATRICES = 15_204_352


# ---- the per-module overlap rule --------------------------------------------------------------------


def host_by_hand(lay, k):
    """(overhead + collective issue) x (1 + TP drift); ROUND's 0.5 drift factor at tp 2 (cost.collectives)."""
    drift = lay.hardware.efficiency.collective_drift_factor * np.where(tp_collective_host_time(lay) > 0, 1.0, 0.0)
    return ((module_overhead_time(lay, k) + dequant_host_time(lay, k) + tp_collective_host_time(lay)[None, :])
            * (1 + drift))


def modules_by_hand(lay, k, phase, f, host_wait=False):
    """module = max(device, host), device = max(busy, fetch) + (1 - f) min(busy, fetch), busy = compute +
    all-reduce + dequant, from the public terms; with the host fetch wait the host's time joins the fetch in series."""
    bpw = k.bytes_per_weight(lay.table.matrix_fraction)
    busy = (compute_time(lay, k, phase) + layer_device_time(lay, compiled_forwards(lay, k, phase), phase)
            + activation_time(lay, phase) + tp_collective_time(lay, phase))
    t_h2d, t_nvme = weight_stream_time(lay, k, weight_stream_bytes(lay, k, phase, bpw))
    t_h2d = t_h2d + kv_transfer_time(lay, k, kv_transfer_bytes(lay, k, phase))
    fetch = np.maximum(t_h2d, t_nvme) + dp_allgather_time(lay, k, fetched_elems_per_rank(lay, k, phase) * bpw)
    host = host_by_hand(lay, k)
    if host_wait:
        fetch = fetch + np.where(fetch > 0, host, 0.0)
    busy = busy + dequant_time(lay, k, phase)  # DeepSpeed's chain or one fused kernel: on the compute stream
    device = np.maximum(busy, fetch) + (1 - f) * np.minimum(busy, fetch)
    return np.maximum(device, host), busy, fetch


def dequant_case(kit, fused_dequant: bool, **efficiency):
    """A 4-bit bf16 toy model streamed from CPU memory at 5 GB/s on ROUND changed by ``efficiency``, against the
    same machine whose dequantization costs nothing: (the evaluation, the free one's, the step's dequant time)."""
    workload = Workload(512, 32, fused_dequant=fused_dequant)
    eff = dataclasses.replace(kit.ROUND, **efficiency)
    free = dataclasses.replace(eff, dequant_hbm=1e9, fused_dequant_hbm=1e9)
    lay = kit.arrangement(kit.toy_dense(), workload=workload, hardware=kit.make_hardware(eff))
    k = Knobs.from_plans([Plan(offload="cpu", weight_bits=4, batch_size=1)])
    ev = evaluate(lay, k)
    ev_free = evaluate(kit.arrangement(kit.toy_dense(), workload=workload, hardware=kit.make_hardware(free)), k)
    return ev, ev_free, dequant_time(lay, k, decode_phase(lay, k))[0] @ lay.stage_counts[0]


@pytest.mark.parametrize("fused_dequant", [False, True], ids=["torch-ops", "fused"])
def test_a_dequantization_shorter_than_the_copies_hides_behind_them(kit, fused_dequant, without_prefetch_lag) -> None:
    """Fetch-bound: a toy layer's 4-bit copies take 1.71 ms (15.2 M weights, 0.5625 bytes each, at 5 GB/s);
    DeepSpeed's chain (17 bytes a weight at 0.4 TB/s) takes 0.65 ms of it, hpi's kernel (2.56 at 0.2 TB/s) 0.19 ms.
    Either runs on the compute stream beside the next modules' copies and adds nothing to the step; the breakdown
    still names it dequantization, and the exposed copies shrink by as much."""
    ev, ev_free, dequant = dequant_case(kit, fused_dequant)
    per_layer = LAYER_MATRICES * (17 / 0.4e12 if not fused_dequant else (0.5 + 4 / 64 + 2) / 0.2e12)
    assert dequant == pytest.approx(4 * per_layer + 2 * V * H * per_layer / LAYER_MATRICES, rel=1e-6)
    assert ev.decode_step_s[0] == pytest.approx(ev_free.decode_step_s[0], abs=1e-9)
    assert ev.decode.exposed["dequant_s"][0] == pytest.approx(dequant)
    np.testing.assert_allclose(sum(ev.decode.exposed[p] for p in EXPOSED_PARTS), ev.decode_step_s, rtol=1e-12)
    assert ev.decode.exposed["weight_fetch_s"][0] == pytest.approx(
        ev_free.decode.exposed["weight_fetch_s"][0] - dequant + ev_free.decode.exposed["dequant_s"][0], rel=1e-6)


def test_a_chain_longer_than_the_copies_adds_only_what_they_do_not_cover(kit, without_prefetch_lag) -> None:
    """Busy-bound: at 0.01 of the HBM rate DeepSpeed's chain takes 25.8 ms a layer against 1.71 ms of copies,
    so the step is the compute stream's work, every copy under it (what one H200's 70B 4-bit step showed:
    the chain's 0.85 s and the GEMMs, not the copies plus the chain; cost.estimate)."""
    ev, ev_free, dequant = dequant_case(kit, False, dequant_hbm=0.01)
    assert dequant == pytest.approx((4 * LAYER_MATRICES + 2 * V * H) * 17 / 0.01e12, rel=1e-6)
    exposed = ev.decode.exposed
    assert exposed["weight_fetch_s"][0] == pytest.approx(0.0, abs=1e-12)  # every leaf's copy hides
    assert exposed["dequant_s"][0] == pytest.approx(dequant)
    busy = exposed["compute_s"][0] + dequant
    assert ev.decode_step_s[0] == pytest.approx(busy + 1e-3, rel=1e-9)  # + ROUND's step overhead
    added = ev.decode_step_s[0] - ev_free.decode_step_s[0]
    assert 0 < added < dequant  # the copies' time is not added on top
    assert added == pytest.approx(busy + 1e-3 - ev_free.decode_step_s[0], rel=1e-9)


def test_a_host_bound_module_hides_the_chain_too(kit, without_prefetch_lag) -> None:
    """Host-bound: with 30 ms of ZeRO-3 hooks a layer (4.3 ms a leaf) every leaf waits for the host, and the
    chain (0.65 ms a layer) runs on the GPU meanwhile: it adds nothing, only its launches add host time
    (8 kernels a matrix, ``dequant_host_time``)."""
    ev, ev_free, dequant = dequant_case(kit, False, offload_layer_overhead_s=30e-3)
    assert dequant > 1e-3
    launches = 4 * 7 * 8 * kit.ROUND.layer_overhead_s / 40  # 4 layers x 7 matrices x 8 kernels
    assert ev.decode_step_s[0] == pytest.approx(ev_free.decode_step_s[0], rel=1e-9)  # same launches on both
    host = 4 * (kit.ROUND.layer_overhead_s + 30e-3) + launches
    vocab = 2 * V * H * (0.5 + 4 / 64) / 5e9  # the embedding's and head's copies: no hooks of a layer there
    assert ev.decode_step_s[0] == pytest.approx(host + vocab + 1e-3, rel=1e-3)


@pytest.mark.parametrize("offload", ["cpu", "nvme"])
def test_the_bucket_does_not_change_the_overlap(kit, offload: str, without_prefetch_lag) -> None:
    """The next module's copy runs while this one computes whatever the bucket (stream-ordered: the host
    queued it long before; host wait: the host waits for copies, not compute): f = prefetch_overlap."""
    lay = kit.arrangement(kit.toy_dense())
    plans = [
        Plan(offload=offload, kv_offload=True, batch_size=4, prefetch_bucket_elems=0),
        Plan(offload=offload, kv_offload=True, batch_size=4, prefetch_bucket_elems=10**12, max_live_elems=10**13),
    ]
    k = Knobs.from_plans(plans)
    f = prefetch_overlap(lay, k)
    np.testing.assert_array_equal(f, 1.0)
    ev = evaluate(lay, k)
    counts = lay.stage_counts[0]
    for phase, result in ((prefill_phase(lay, k), ev.prefill), (decode_phase(lay, k), ev.decode)):
        module, busy, fetch = modules_by_hand(lay, k, phase, f)
        # Streaming a toy layer (~30 MB at 5 GB/s) takes far longer than its 400 us of host time.
        np.testing.assert_allclose(module, np.maximum(np.maximum(busy, fetch), host_by_hand(lay, k)))
        np.testing.assert_allclose(result.step_s, module @ counts + 1e-3)  # + ROUND step overhead
    np.testing.assert_allclose(ev.decode_step_s[0], ev.decode_step_s[1])


def test_no_overlap_adds_compute_and_fetch(kit, without_prefetch_lag) -> None:
    none = dataclasses.replace(kit.ROUND, prefetch_overlap=1e-9)
    lay = kit.arrangement(kit.toy_dense(), workload=Workload(512, 32), hardware=kit.make_hardware(none))
    k = Knobs.from_plans([Plan(offload="cpu", batch_size=8)])
    module, busy, fetch = modules_by_hand(lay, k, prefill_phase(lay, k), prefetch_overlap(lay, k))
    np.testing.assert_allclose(module[0, DENSE], busy[0, DENSE] + fetch[0, DENSE], rtol=1e-6)
    np.testing.assert_allclose(evaluate(lay, k).prefill_s, module @ lay.stage_counts[0] + 1e-3, rtol=1e-6)


def test_the_host_fetch_wait_puts_the_hooks_in_series_with_the_copies(kit, without_prefetch_lag) -> None:
    """DeepSpeed's stock wait: a toy layer's 6.1 ms of copies and 0.4 ms of host time add (the copy engine
    idles while the host runs the hooks); hpi's stream-ordered wait hides the host time. The host's part
    is reported as overhead."""
    plans = [Plan(offload="cpu")]
    stream = kit.arrangement(kit.toy_dense())
    host = kit.arrangement(kit.toy_dense(), workload=Workload(512, 32, fetch_wait="host"))
    k = Knobs.from_plans(plans)
    f = prefetch_overlap(stream, k)
    by_hand_stream, _, fetch = modules_by_hand(stream, k, decode_phase(stream, k), f)
    by_hand_host, _, _ = modules_by_hand(host, k, decode_phase(host, k), f, host_wait=True)
    np.testing.assert_allclose(by_hand_host[0, DENSE], fetch[0, DENSE] + 400e-6)
    np.testing.assert_allclose(by_hand_stream[0, DENSE], fetch[0, DENSE])
    ev_stream, ev_host = evaluate(stream, k), evaluate(host, k)
    np.testing.assert_allclose(ev_stream.decode_step_s, by_hand_stream @ stream.stage_counts[0] + 1e-3)
    np.testing.assert_allclose(ev_host.decode_step_s, by_hand_host @ host.stage_counts[0] + 1e-3)
    # (the host's share of each layer's exposed fetch: a hair under 0.4 ms, as the GPU's compute hides a bit)
    assert ev_host.decode.exposed["overhead_s"][0] == pytest.approx(4 * 400e-6 + 1e-3, rel=0.01)
    # Without offload (nothing fetched) the wait changes nothing.
    k16 = Knobs.from_plans([Plan()])
    np.testing.assert_allclose(evaluate(host, k16).decode_step_s, evaluate(stream, k16).decode_step_s)


def test_a_routed_layer_leaf_beyond_the_bucket_waits_for_its_copy_before_the_next(kit, without_prefetch_lag) -> None:
    """A toy MoE layer (53.1 M elements) gathered as one leaf: with a bucket that cannot hold it the host reads the
    router's counts after the leaf's copy and only then issues the next leaf's, so the copy engine idles while the
    host runs the layer's hooks and launches (fetch + host, as with DeepSpeed's host wait); a bucket that holds it,
    per-module leaves and a dense layer leaf keep the overlap."""
    lay = kit.arrangement(kit.toy_moe())
    plans = [Plan(offload="cpu", zero3_leaf="layer", prefetch_bucket_elems=50_000_000),
             Plan(offload="cpu", zero3_leaf="layer", prefetch_bucket_elems=100_000_000, max_live_elems=10**9),
             Plan(offload="cpu", prefetch_bucket_elems=50_000_000)]
    k = Knobs.from_plans(plans)
    waits = routing_waits_for_leaf(lay, k)
    assert waits[:, MOE].tolist() == [True, False, False]
    assert not waits[:, [DENSE, EMBED, HEAD]].any()
    np.testing.assert_array_equal(host_waits_for_fetch(lay, k), waits)  # stream-ordered otherwise
    phase = decode_phase(lay, k)
    f = prefetch_overlap(lay, k)
    in_series, _, _ = modules_by_hand(lay, k, phase, f, host_wait=True)
    overlapped, busy, fetch = modules_by_hand(lay, k, phase, f)
    host = host_by_hand(lay, k)
    assert fetch[0, MOE] > busy[0, MOE] and fetch[0, MOE] > host[0, MOE] > 0  # copy-bound: the host hid behind it
    np.testing.assert_allclose(in_series[0, MOE], fetch[0, MOE] + host[0, MOE])
    ev = evaluate(lay, k)
    moe_layers = lay.stage_counts[0][MOE]
    np.testing.assert_allclose(ev.decode_step_s[0] - ev.decode_step_s[1],
                               moe_layers * (in_series[0, MOE] - overlapped[1, MOE]), rtol=1e-6)
    assert ev.decode_step_s[0] - ev.decode_step_s[1] == pytest.approx(moe_layers * host[0, MOE], rel=1e-6)
    dense = kit.arrangement(kit.toy_dense())
    small = Knobs.from_plans([Plan(offload="cpu", zero3_leaf="layer", prefetch_bucket_elems=0)])
    assert not routing_waits_for_leaf(dense, small).any()


def test_zero3_hook_overhead_is_host_time_hidden_by_streaming(kit) -> None:
    """The 300 us of ZeRO-3 hooks per layer hide under a layer's 6 ms of streaming; made 50 ms, they bind."""
    ev = kit.evaluate_toy([Plan(offload="cpu", prefetch_bucket_elems=0)])
    assert ev.decode.exposed["overhead_s"][0] == pytest.approx(1e-3)  # the step overhead only
    assert ev.decode.link["host_s"][0] == pytest.approx(4 * (100e-6 + 300e-6) + 1e-3)
    slow_hooks = dataclasses.replace(kit.ROUND, offload_layer_overhead_s=50e-3)
    lay = kit.arrangement(kit.toy_dense(), hardware=kit.make_hardware(slow_hooks))
    k = Knobs.from_plans([Plan(offload="cpu", prefetch_bucket_elems=0)])
    ev = evaluate(lay, k)
    module, _, _ = modules_by_hand(lay, k, decode_phase(lay, k), prefetch_overlap(lay, k))
    assert module[0, DENSE] == pytest.approx(50.1e-3)
    assert ev.decode_step_s[0] == pytest.approx(module[0] @ lay.stage_counts[0] + 1e-3)
    assert ev.decode.exposed["overhead_s"][0] > 4 * 40e-3


def test_zero3_runs_the_rule_leaf_module_by_leaf_module(kit, without_prefetch_lag) -> None:
    """Where ZeRO-3 gathers, each matrix-holding leaf module (q, k, v, o, gate, up, down) is its own unit:
    its share of the copies by its weights, an equal share of the host's hooks and launches. With 5 ms of
    hooks per layer (0.73 ms a leaf), the small k/v/q/o copies (0.1-0.4 ms at 5 GB/s) show the hooks, the
    FFN's 1.68 ms copies hide them; a GPU-resident module stays one unit."""
    slow = dataclasses.replace(kit.ROUND, offload_layer_overhead_s=5e-3)
    stream = Workload(512, 32, fetch_wait="stream")  # the host paired with each leaf's copy
    lay = kit.arrangement(kit.toy_dense(), hardware=kit.make_hardware(slow), workload=stream)
    k = Knobs.from_plans([Plan(offload="cpu"), Plan()])
    w, hw = leaf_shares(lay, k)
    leaves = np.array([H * H, H * 256, H * 256, H * H, H * 4096, H * 4096, H * 4096]) / LAYER_MATRICES
    np.testing.assert_allclose(w[0, DENSE], leaves)
    np.testing.assert_allclose(hw[0, DENSE], 1 / 7)
    np.testing.assert_allclose(w[1, DENSE], [1, 0, 0, 0, 0, 0, 0])  # resident: the whole module
    copy = LAYER_MATRICES * 2 / 5e9  # the layer's matrices at 10 GB/s x 0.5 (the norms persist)
    host = 100e-6 + 5e-3
    ev = evaluate(lay, k)
    by_leaf = np.maximum(copy * leaves, host / 7).sum()
    assert by_leaf > max(copy, host)
    layer = ev.decode.exposed  # the step: 4 layers by the leaf rule, the vocabulary modules' copies, 1 ms
    vocab = V * H * 2 / 5e9
    assert ev.decode_step_s[0] == pytest.approx(4 * by_leaf + 2 * vocab + 1e-3, rel=1e-3)
    assert layer["overhead_s"][0] > 1e-3  # the hooks that show between small copies


def test_the_copy_ordered_wait_runs_the_hooks_beside_the_modules_copies(kit, without_prefetch_lag) -> None:
    """Under hpi's copy-ordered wait (the default) the host is bounded by the copies two parameters back while the
    prefetches queued beyond them keep the copy engine busy: a module costs the larger of its leaves' copies and its
    host time, not the sum over leaves of each leaf's larger (cost.estimate.host_beside_module). The toy of the leaf
    test above, same hooks: 4 x max(copy, host) instead of 4 x sum of per-leaf maxima."""
    slow = dataclasses.replace(kit.ROUND, offload_layer_overhead_s=5e-3)
    lay = kit.arrangement(kit.toy_dense(), hardware=kit.make_hardware(slow), workload=Workload(512, 32))
    ev = evaluate(lay, Knobs.from_plans([Plan(offload="cpu")]))
    copy = LAYER_MATRICES * 2 / 5e9
    host = 100e-6 + 5e-3
    vocab = V * H * 2 / 5e9
    assert ev.decode_step_s[0] == pytest.approx(4 * max(copy, host) + 2 * vocab + 1e-3, rel=1e-3)
    assert sum(ev.decode.exposed[p][0] for p in EXPOSED_PARTS) == pytest.approx(ev.decode_step_s[0], rel=1e-12)


def test_routed_experts_dequantize_only_the_experts_a_token_chose_on_the_compute_stream(
        kit, without_prefetch_lag) -> None:
    """Batch 1 routes to 2 of 8 experts and dequantizes those (2.62 M attention + 2 x 6.29 M expert weights a
    layer), batch 64 touches every expert (2.62 + 8 x 6.29 M); either way the dequantization is busy time, named
    in full in the breakdown, and at batch 1 it hides behind the copies of every expert, chosen or not."""
    from hpi.planner.cost.compute import expected_experts_touched

    plans = [Plan(offload="cpu", weight_bits=4, batch_size=b) for b in (1, 64)]
    knobs = Knobs.from_plans(plans)
    touched = expected_experts_touched(8.0, 2.0, np.array([1.0, 64.0]))
    assert touched[0] == pytest.approx(2.0) and touched[1] == pytest.approx(8.0, abs=1e-6)

    moe = kit.arrangement(kit.toy_moe(), 1, 1, 1)
    dequant = dequant_time(moe, knobs, decode_phase(moe, knobs))  # (N, kinds): what each module dequantizes
    assert dequant[0, MOE] / dequant[1, MOE] == pytest.approx((2.62 + 2 * 6.29) / (2.62 + 8 * 6.29), rel=0.01)
    ev = kit.evaluate(moe, plans)
    np.testing.assert_allclose(ev.decode.exposed["dequant_s"], dequant @ moe.stage_counts[0], rtol=1e-9)
    np.testing.assert_allclose(sum(ev.decode.exposed[p] for p in EXPOSED_PARTS), ev.decode_step_s, rtol=1e-12)
    free = kit.make_hardware(dataclasses.replace(kit.ROUND, dequant_hbm=1e9))
    ev_free = kit.evaluate(kit.arrangement(kit.toy_moe(), 1, 1, 1, hardware=free), plans)
    assert ev.decode_step_s[0] == pytest.approx(ev_free.decode_step_s[0], rel=1e-9)


