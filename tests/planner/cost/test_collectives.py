"""cost.collectives: alpha-beta cost of ring all-reduce and all-gather, and where the planner uses them.

Link: 100 GB/s, 1 us a hop; ROUND efficiency: collective bandwidth 0.5, alpha 10 us.
"""

from __future__ import annotations

import numpy as np
import pytest

from hpi.planner.cost.collectives import allgather_time, allreduce_time, dp_allgather_time, tp_collective_time
from hpi.planner.cost.inputs import Knobs
from hpi.planner.cost.phase import decode_phase, prefill_phase
from hpi.planner.cost.shape import DENSE, EMBED, HEAD, MOE
from hpi.planner.specs.placement import Link
from hpi.planner.specs.plan import Plan

LINK = Link(bandwidth_bytes_s=100e9, latency_s=1e-6, kind="nvlink")
ALPHA, EFF = 10e-6, 0.5
BW = 100e9 * EFF


def test_allreduce_two_ranks_exact() -> None:
    # 2(p-1) = 2 hops; 2(p-1)/p = 1 message over the link.
    n = np.array([0.0, 1e6, 64e6])
    want = ALPHA + 2 * 1e-6 + 1.0 * n / BW
    np.testing.assert_allclose(allreduce_time(n, 2, LINK, ALPHA, EFF), want)
    assert allreduce_time(np.array([1e6]), 2, LINK, ALPHA, EFF)[0] == pytest.approx(10e-6 + 2e-6 + 20e-6)


def test_allreduce_four_ranks_exact() -> None:
    # 6 hops; 1.5 messages over the link.
    n = np.array([8e3, 256e6])
    np.testing.assert_allclose(allreduce_time(n, 4, LINK, ALPHA, EFF), ALPHA + 6e-6 + 1.5 * n / BW)
    assert allreduce_time(np.array([1e6]), 4, LINK, ALPHA, EFF)[0] == pytest.approx(10e-6 + 6e-6 + 30e-6)


def test_allgather_is_one_pass_of_the_ring() -> None:
    n = np.array([1e6])
    assert allgather_time(n, 2, LINK, ALPHA, EFF)[0] == pytest.approx(ALPHA + 1e-6 + 0.5 * 1e6 / BW)
    assert allgather_time(n, 4, LINK, ALPHA, EFF)[0] == pytest.approx(ALPHA + 3e-6 + 0.75 * 1e6 / BW)
    # With no latency terms the all-gather is exactly half the all-reduce.
    for p in (2, 4, 8):
        ar = allreduce_time(n, p, Link(100e9, 0.0, "nvlink"), 0.0, EFF)
        ag = allgather_time(n, p, Link(100e9, 0.0, "nvlink"), 0.0, EFF)
        assert ag[0] == pytest.approx(ar[0] / 2)


@pytest.mark.parametrize("fn", [allreduce_time, allgather_time])
def test_one_rank_costs_nothing(fn) -> None:
    n = np.array([1e9, 0.0])
    np.testing.assert_array_equal(fn(n, 1, LINK, ALPHA, EFF), [0.0, 0.0])


def test_small_messages_are_latency_bound() -> None:
    small = allreduce_time(np.array([8e3]), 2, LINK, 20e-6, 0.8)[0]
    assert small == pytest.approx(20e-6 + 2e-6, rel=0.01)


def test_tp_collectives_per_module(kit) -> None:
    """Two all-reduces of the hidden states per layer, an all-gather of the logits at the head."""
    lay = kit.arrangement(kit.toy_dense(), tp=2)
    k = Knobs.from_plans([Plan(tp=2, batch_size=4)])
    dec = tp_collective_time(lay, decode_phase(lay, k))[0]
    hidden = 4 * 1024 * 2
    per_layer = 2 * (ALPHA + 2e-6 + hidden / BW)
    assert dec[DENSE] == pytest.approx(per_layer)
    assert dec[MOE] == pytest.approx(per_layer)  # any decoder layer
    assert dec[EMBED] == 0.0
    assert dec[HEAD] == pytest.approx(ALPHA + 1e-6 + 0.5 * 4 * 32000 * 2 / BW)

    pre = tp_collective_time(lay, prefill_phase(lay, k))[0]
    assert pre[DENSE] == pytest.approx(2 * (ALPHA + 2e-6 + 4 * 512 * 1024 * 2 / BW))
    assert pre[HEAD] == pytest.approx(dec[HEAD])  # logits of the last position only


def test_tp_collectives_vanish_for_tp1(kit) -> None:
    lay = kit.arrangement(kit.toy_dense())
    k = Knobs.from_plans([Plan(batch_size=8)])
    for phase in (prefill_phase(lay, k), decode_phase(lay, k)):
        assert not tp_collective_time(lay, phase).any()


def test_tp_collectives_follow_the_link(kit) -> None:
    pcie = Link(bandwidth_bytes_s=10e9, latency_s=5e-6, kind="pcie")
    lay = kit.arrangement(kit.toy_dense(), tp=4, tp_link=pcie)
    k = Knobs.from_plans([Plan(tp=4, batch_size=1)])
    pre = tp_collective_time(lay, prefill_phase(lay, k))[0]
    assert pre[DENSE] == pytest.approx(2 * (ALPHA + 6 * 5e-6 + 1.5 * 512 * 1024 * 2 / (10e9 * EFF)))


def test_dp_allgather(kit) -> None:
    lay = kit.arrangement(kit.toy_dense(), dp=4)
    k = Knobs.from_plans([Plan(dp=4, batch_size=4)] * 2)
    fetched = np.array([[2e6, 0.0, 1e6, 0.0], [0.0, 0.0, 0.0, 0.0]])
    t = dp_allgather_time(lay, k, fetched)
    np.testing.assert_allclose(t[0], [ALPHA + 3e-6 + 0.75 * 2e6 / BW, 0.0, ALPHA + 3e-6 + 0.75 * 1e6 / BW, 0.0])
    assert not t[1].any()  # nothing gathered: no launch either


def test_dp_allgather_zero_for_dp1(kit) -> None:
    lay = kit.arrangement(kit.toy_dense())
    k = Knobs.from_plans([Plan(offload="cpu")])
    assert not dp_allgather_time(lay, k, np.full((1, 4), 1e9)).any()
