"""Rank order (tp innermost, then dp, then pp), process groups, and placement on the hardware graph."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import yaml

from hpi.planner.profiles import load_profile
from hpi.planner.ranks import RANK_ORDER, groups, place, rank_coords, rank_gpus, rank_of, stage_ranks
from hpi.planner.specs.placement import Link
from hpi.planner.specs.plan import Plan
from hpi.planner.topology import build_topology


def topo(name):
    return build_topology(load_profile(name))


def _shapes(max_world=4096):
    """(tp, dp, pp) over powers of two up to max_world ranks, plus odd sizes."""
    powers = [2**k for k in range(13)]
    shapes = [s for s in itertools.product(powers, repeat=3) if s[0] * s[1] * s[2] <= max_world]
    shapes += [(3, 5, 7), (7, 1, 3), (1, 9, 1), (5, 3, 1), (6, 10, 12), (3, 1, 1365)]
    return shapes


SHAPES = _shapes()


# ---- rank order ---------------------------------------------------------------------------------------


def test_rank_order_is_declared_once():
    assert RANK_ORDER == ("tp", "dp", "pp")


def test_small_example_matches_megatron_tp_dp_pp():
    assert groups("tp", 2, 2, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups("dp", 2, 2, 2) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups("pp", 2, 2, 2) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups("tp-dp", 2, 2, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert rank_coords(5, 2, 2, 2) == (1, 0, 1) and rank_of((1, 0, 1), 2, 2, 2) == 5


def test_coords_round_trip_for_every_rank():
    for tp, dp, pp in [(1, 1, 1), (2, 3, 4), (8, 1, 4), (4, 16, 2), (3, 5, 7)]:
        world = tp * dp * pp
        coords = [rank_coords(r, tp, dp, pp) for r in range(world)]
        assert [rank_of(c, tp, dp, pp) for c in coords] == list(range(world))
        assert len(set(coords)) == world
        assert all(c[0] == r % tp for r, c in enumerate(coords))  # tp innermost


@pytest.mark.parametrize("kind", ["tp", "dp", "pp"])
def test_groups_partition_the_world_and_vary_one_coordinate(kind):
    axis = RANK_ORDER.index(kind)
    for tp, dp, pp in SHAPES:
        world = tp * dp * pp
        sizes = {"tp": tp, "dp": dp, "pp": pp}
        g = np.asarray(groups(kind, tp, dp, pp))
        assert g.shape == (world // sizes[kind], sizes[kind])
        assert np.array_equal(np.sort(g, axis=None), np.arange(world))  # a partition
        coords = np.stack([g % tp, (g // tp) % dp, g // (tp * dp)])  # (3, groups, size)
        for other in range(3):
            if other == axis:
                assert (coords[other] == np.arange(sizes[kind])).all()  # index 0..size-1 in order
            else:
                assert (coords[other] == coords[other][:, :1]).all()  # fixed within a group
        assert (np.diff(g, axis=1) > 0).all()  # ranks ascend


def test_tp_groups_are_consecutive_and_strides_follow_the_order():
    for tp, dp, pp in SHAPES:
        world = tp * dp * pp
        assert np.array_equal(np.asarray(groups("tp", tp, dp, pp)), np.arange(world).reshape(-1, tp))
        if dp > 1:
            assert (np.diff(np.asarray(groups("dp", tp, dp, pp)), axis=1) == tp).all()
        if pp > 1:
            assert (np.diff(np.asarray(groups("pp", tp, dp, pp)), axis=1) == tp * dp).all()


def test_combined_groups_are_pipeline_stages():
    for tp, dp, pp in [(2, 3, 4), (8, 4, 16), (1, 1, 4096)]:
        assert groups("tp-dp", tp, dp, pp) == [stage_ranks(s, tp, dp, pp) for s in range(pp)]
        assert groups("tp-dp-pp", tp, dp, pp) == [list(range(tp * dp * pp))]


def test_rank_errors_quote_the_bounds():
    with pytest.raises(ValueError, match=r"rank 8 is outside tp\(2\) \* dp\(2\) \* pp\(2\) = 8 ranks"):
        rank_coords(8, 2, 2, 2)
    with pytest.raises(ValueError, match="dp index 2 is outside 0..1"):
        rank_of((0, 2, 0), 2, 2, 2)
    with pytest.raises(ValueError, match="tp = 0 must be an integer >= 1"):
        groups("tp", 0, 1, 1)
    with pytest.raises(ValueError, match="group kind 'ep'"):
        groups("ep", 1, 1, 1)


# ---- placement ----------------------------------------------------------------------------------------


def test_tp_group_on_dgx_uses_nvswitch():
    placement = place(Plan(tp=8), topo("dgx-h100"))
    assert placement.tp_link.kind == "nvswitch" and placement.tp_link.bandwidth_bytes_s == 450e9
    assert placement.rank_gpus == topo("dgx-h100").gpus and placement.nodes_used == 1
    assert placement.dp_link == Link.local() and placement.pp_link == Link.local()
    assert not any("TP group" in note for note in placement.notes)


def test_tp4_on_a100_pcie_crosses_the_cpu():
    placement = place(Plan(tp=4), topo("a100-pcie-4gpu"))
    assert placement.tp_link.kind == "pcie-host" and placement.tp_link.bandwidth_bytes_s == pytest.approx(26e9)
    assert " -> n0.cpu0 -> " in placement.tp_link.path and placement.tp_link.path.count("n0.pcie") == 2
    assert any(n.startswith("TP group has no NVLink: all-reduce over PCIe through the CPU") for n in placement.notes)
    assert placement.nvme_read_bytes_s == 0.0


def test_tp2_on_a100_stays_under_one_switch():
    placement = place(Plan(tp=2, dp=2, batch_size=2), topo("a100-pcie-4gpu"))
    assert placement.tp_link.kind == "pcie" and "cpu" not in placement.tp_link.path
    assert placement.dp_link.kind == "pcie-host"
    assert placement.dp_link.bandwidth_bytes_s == pytest.approx(13e9)  # both dp rings cross the same uplinks


def test_cluster_pipeline_crosses_nodes_while_tp_stays_inside():
    cluster = topo("dgx-h100-x4-ib")
    placement = place(Plan(tp=8, pp=4, micro_batches=1), cluster)
    assert placement.tp_link.kind == "nvswitch"
    assert placement.pp_link.kind == "ib" and placement.pp_link.bandwidth_bytes_s == pytest.approx(50e9)
    assert placement.nodes_used == 4 and placement.world_size == 32
    for stage in range(4):
        assert {cluster.node_of(placement.rank_gpus[r]) for r in stage_ranks(stage, 8, 1, 4)} == {stage}
    assert any(n.startswith("pipeline crosses nodes over InfiniBand") for n in placement.notes)


def test_cluster_tp16_spans_nodes():
    placement = place(Plan(tp=16, pp=2), topo("dgx-h100-x4-ib"))
    assert placement.tp_link.kind == "ib"
    assert any(n.startswith("TP group spans 2 nodes: all-reduce over InfiniBand") for n in placement.notes)


def test_tp_groups_fill_islands_when_tp_does_not_divide_them():
    cluster = topo("dgx-h100-x4-ib")
    placement = place(Plan(tp=3, pp=4), cluster)  # 2 groups of 3 fit in each 8-GPU island
    for group in groups("tp", 3, 1, 4):
        assert len({cluster.island_of(placement.rank_gpus[r]) for r in group}) == 1
    assert placement.tp_link.kind == "nvswitch" and placement.nodes_used == 2
    assert rank_gpus(3, 1, 1, cluster) == ("n0.gpu0", "n0.gpu1", "n0.gpu2")


def test_tp_over_two_nvlink_islands(tmp_path):
    placement = place(Plan(tp=4), build_topology(load_profile(str(_two_pairs(tmp_path)))))
    assert placement.tp_link.kind == "pcie-host"
    expected = "TP group spans 2 NVLink islands: all-reduce over PCIe through the CPU"
    assert any(n.startswith(expected) for n in placement.notes)
    in_pairs = place(Plan(tp=2, dp=2, batch_size=2), build_topology(load_profile(str(_two_pairs(tmp_path)))))
    assert in_pairs.tp_link.kind == "nvlink"


def test_host_bandwidth_is_per_gpu_with_every_rank_streaming():
    dgx = topo("dgx-h100")
    one = place(Plan(), dgx)
    assert one.h2d_pinned_bytes_s == pytest.approx(53.6e9) and one.h2d_pageable_bytes_s == pytest.approx(8e9)
    assert one.nvme_read_bytes_s == pytest.approx(25e9)
    assert "uses 1 of 8 GPUs" in one.notes
    eight = place(Plan(tp=8), dgx)
    assert eight.h2d_pinned_bytes_s == pytest.approx(26.8e9) and eight.nvme_read_bytes_s == pytest.approx(25e9 / 8)
    assert any("8 GPUs stream from host memory at once: 26.8 GB/s pinned each instead of 53.6 GB/s alone" in n
               for n in eight.notes)


def test_place_error_quotes_the_equation():
    with pytest.raises(ValueError) as info:
        place(Plan(tp=2, pp=8), topo("dgx-h100"))
    assert str(info.value) == "tp(2) * dp(1) * pp(8) = 16 > 8 GPUs on dgx-h100: lower tp, pp or dp"


def test_place_is_cached():
    dgx = topo("dgx-h100")
    first = place(Plan(tp=4, dp=2, batch_size=2), dgx)
    assert place(Plan(tp=4, dp=2, batch_size=4, weight_bits=4), dgx) is first  # same layout, other knobs
    assert first.to_dict()["tp_link"]["kind"] == "nvswitch"


def test_every_layout_of_every_profile_places():
    for name in ("a6000-workstation", "h100-sxm-1gpu", "h200-2gpu", "dgx-h100", "a100-pcie-4gpu", "rtx4090-wsl2"):
        topology = topo(name)
        n = len(topology.gpus)
        for tp, dp, pp in itertools.product(range(1, n + 1), repeat=3):
            if tp * dp * pp > n:
                continue
            p = place(Plan(tp=tp, dp=dp, pp=pp, batch_size=dp), topology)
            assert p.world_size == tp * dp * pp and len(set(p.rank_gpus)) == p.world_size
            assert p.h2d_pinned_bytes_s >= p.h2d_pageable_bytes_s > 0
            assert (p.tp_link == Link.local()) == (tp == 1)


def _two_pairs(tmp_path):
    """4 GPUs on one CPU, NVLink-bridged in pairs 0-1 and 2-3 (like 4x A6000 with bridges)."""
    def q(value):
        return {"value": value, "source": "assumed", "note": "test"}

    data = {
        "name": "two-pairs", "description": "test", "os": "linux",
        "gpu": {"name": "x", "memory_bytes": q(48e9), "bf16_flops": q(1e14), "hbm_bandwidth_bytes_s": q(7e11)},
        "host": {"dram_bytes": q(2e11), "pinnable_bytes": q(1e11), "cpu_cores": q(16),
                 "h2d_pageable_bytes_s": q(8e9), "d2h_pageable_bytes_s": q(8e9)},
        "node": {"gpus": 4, "cpus": 1, "links": {
            "gpu_host": {"kind": "pcie", "bandwidth_bytes_s": q(26e9), "latency_s": q(1e-6),
                         "pairs": [[f"gpu{i}", "cpu0"] for i in range(4)]},
            "bridge": {"kind": "nvlink", "bandwidth_bytes_s": q(56e9), "latency_s": q(5e-7),
                       "pairs": [["gpu0", "gpu1"], ["gpu2", "gpu3"]]}}},
    }
    path = tmp_path / "two-pairs.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
