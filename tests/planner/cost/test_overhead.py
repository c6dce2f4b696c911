"""cost.overhead and cost.streaming read the plan rules that ``Plan`` reads (``hpi.planner.specs.plan``): the
vectorised answer equals the scalar one on every plan shape; ZeRO-3 layer leaves' host time and leaf shares."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from hpi.planner.cost.estimate import leaf_shares
from hpi.planner.cost.inputs import Knobs
from hpi.planner.cost.overhead import (
    SKINNY_MAX_ROWS,
    graphed_forwards,
    layer_device_time,
    module_overhead_time,
    skinny_forwards,
)
from hpi.planner.cost.phase import decode_phase, prefill_phase
from hpi.planner.cost.shape import DENSE
from hpi.planner.cost.streaming import fetches_weights
from hpi.planner.specs.plan import Plan, decode_graph_blocker
from hpi.planner.specs.workload import Workload


def _plans(dp: int) -> list[Plan]:
    return [
        Plan(offload=offload, dp=dp, weight_bits=bits, kv_offload=kv, pin_memory=pin, batch_size=2 * dp)
        for offload, bits, kv, pin in itertools.product(("none", "cpu", "nvme"), (16, 8, 4), (False, True),
                                                       (True, False))
    ]


def test_graphed_forwards_is_plan_and_model_blocker_over_every_plan_shape(kit) -> None:
    for model, dp, graphs in itertools.product((kit.toy_dense(), kit.toy_moe()), (1, 2), (True, False)):
        workload = Workload(64, 8, decode_graphs=graphs)
        arrangement = kit.arrangement(model, dp=dp, workload=workload)
        plans = _plans(dp)
        knobs = Knobs.from_plans(plans)
        decode = graphed_forwards(arrangement, knobs, decode_phase(arrangement, knobs))
        expected = [graphs and decode_graph_blocker(p, model) is None for p in plans]
        np.testing.assert_array_equal(decode, expected, err_msg=f"{model.name} dp {dp} graphs {graphs}")
        assert not graphed_forwards(arrangement, knobs, prefill_phase(arrangement, knobs)).any()
        if graphs and dp == 1 and not model.is_moe:
            assert decode.any() and not decode.all()  # the grid holds both kinds


def test_fetches_weights_is_plan_gathers_over_every_plan_shape(kit) -> None:
    for dp in (1, 2):
        plans = _plans(dp)
        arrangement = kit.arrangement(kit.toy_dense(), dp=dp)
        np.testing.assert_array_equal(fetches_weights(arrangement, Knobs.from_plans(plans)),
                                      [p.gathers for p in plans])


def test_decode_layer_device_time_grows_by_the_fitted_term_per_doubling_of_rows_and_prefill_does_not(kit) -> None:
    eff = dataclasses.replace(kit.ROUND, layer_device_s_per_row_doubling=4e-6)
    arrangement = kit.arrangement(kit.toy_dense(), hardware=kit.make_hardware(eff), workload=Workload(64, 8))
    plans = [Plan(batch_size=b) for b in (1, 2, 16, 64)]
    knobs = Knobs.from_plans(plans)
    compiled = np.array([False, False, True, True])
    is_layer = arrangement.table.is_layer
    decode = layer_device_time(arrangement, compiled, decode_phase(arrangement, knobs))
    base = np.array([50e-6, 50e-6, 20e-6, 20e-6])  # ROUND's eager and compiled fixed cost a layer
    np.testing.assert_allclose(decode, (base + 4e-6 * np.array([0, 1, 4, 6]))[:, None] * is_layer[None, :])
    prefill = layer_device_time(arrangement, compiled, prefill_phase(arrangement, knobs))
    np.testing.assert_allclose(prefill, base[:, None] * is_layer[None, :])


def test_stacked_few_row_products_save_the_modes_stacking_at_one_row_and_the_kernels_saving_at_16(kit) -> None:
    """cost.overhead.skinny_saving: at one row the stacking's saving of each mode, at 16 rows the kernel's, linear in
    the doublings between (4 us + (10 - 4) us x 1/4 at 2 rows), the stacking's again past 16 rows (torch's products);
    nothing in prefill's growth, and nothing where the forward does not run them."""
    eff = dataclasses.replace(kit.ROUND, layer_device_s_per_row_doubling=4e-6, stacked_layer_device_saving_s=4e-6,
                              compiled_stacked_layer_device_saving_s=1e-6, skinny_layer_device_saving_s=10e-6)
    arrangement = kit.arrangement(kit.toy_dense(), hardware=kit.make_hardware(eff), workload=Workload(64, 8))
    batches = (1, 2, 16, 32, 1, 2, 16, 32)
    knobs = Knobs.from_plans([Plan(batch_size=b) for b in batches])
    compiled = np.array([False] * 4 + [True] * 4)
    phase = decode_phase(arrangement, knobs)
    plain = layer_device_time(arrangement, compiled, phase)
    stacked = layer_device_time(arrangement, compiled, phase, np.ones(8, dtype=bool))
    saving = (plain - stacked)[:, arrangement.table.is_layer.astype(bool)][:, 0]
    np.testing.assert_allclose(saving, np.array([4.0, 5.5, 10.0, 4.0, 1.0, 3.25, 10.0, 1.0]) * 1e-6)
    np.testing.assert_allclose(layer_device_time(arrangement, compiled, phase, np.zeros(8, dtype=bool)), plain)
    assert (stacked > 0).any() and (stacked >= 0).all()  # 20 us compiled fixed + growth stays above the saving


def test_skinny_forwards_are_the_graphed_decode_forwards_of_a_workload_that_asks(kit) -> None:
    plans = [Plan(), Plan(offload="cpu"), Plan(batch_size=16)]
    knobs = Knobs.from_plans(plans)
    for graphs, skinny in itertools.product((True, False), repeat=2):
        arrangement = kit.arrangement(kit.toy_dense(), workload=Workload(64, 8, decode_graphs=graphs,
                                                                         skinny_gemm=skinny))
        decode = skinny_forwards(arrangement, knobs, decode_phase(arrangement, knobs))
        assert decode.tolist() == [graphs and skinny, False, graphs and skinny]  # ZeRO-3 offload is never graphed
        assert not skinny_forwards(arrangement, knobs, prefill_phase(arrangement, knobs)).any()


def test_the_planners_few_row_limit_is_the_kernels() -> None:
    skinny_gemm = pytest.importorskip("hpi.executor.skinny_gemm")
    assert SKINNY_MAX_ROWS == skinny_gemm.MAX_ROWS


def test_layer_leaves_run_the_rule_once_a_layer_with_the_host_share_left(kit, without_prefetch_lag) -> None:
    """zero3_leaf layer: the overlap rule sees one leaf a decoder layer (its copies, compute and host time one span)
    and the layer's ZeRO-3 host time is offload_layer_leaf_share of the per-module one; a resident plan (no
    gathering) is untouched."""
    arrangement = kit.arrangement(kit.toy_dense())
    plans = [Plan(offload="cpu"), Plan(offload="cpu", zero3_leaf="layer"), Plan(), Plan(zero3_leaf="layer")]
    knobs = Knobs.from_plans(plans)
    eff = arrangement.hardware.efficiency
    host = module_overhead_time(arrangement, knobs)[:, DENSE]
    launch, hooks = eff.layer_overhead_s, eff.offload_layer_overhead_s
    np.testing.assert_allclose(host, [launch + hooks, launch + hooks * eff.offload_layer_leaf_share, launch, launch])
    weights, hosts = leaf_shares(arrangement, knobs)
    assert (weights[0, DENSE] > 0).sum() == 7 and weights[0, DENSE].sum() == pytest.approx(1.0)
    np.testing.assert_allclose(weights[1, DENSE, 0], 1.0)  # one leaf holds the whole layer
    np.testing.assert_allclose(hosts[1, DENSE, 0], 1.0)
    assert not weights[1, DENSE, 1:].any()
    ev = kit.evaluate(arrangement, plans)
    assert ev.decode_step_s[1] <= ev.decode_step_s[0] and ev.decode_step_s[2] == ev.decode_step_s[3]
    # where the hooks bind (50 ms of ZeRO-3 host a layer against ~10 ms of copies), the layer leaves' share shows
    slow_host = dataclasses.replace(kit.ROUND, offload_layer_overhead_s=0.05)
    hooked = kit.arrangement(kit.toy_dense(), hardware=kit.make_hardware(slow_host))
    step = kit.evaluate(hooked, plans[:2]).decode_step_s
    layers = 4
    assert step[0] - step[1] == pytest.approx(layers * 0.05 * (1 - slow_host.offload_layer_leaf_share), rel=1e-6)
