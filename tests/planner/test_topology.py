"""The topology graph: typed components, widest paths, and bandwidth shared by concurrent streams."""

from __future__ import annotations

import math

import networkx as nx
import pytest
import yaml

from hpi.planner.profiles import load_profile, profile_names
from hpi.planner.specs.placement import Link
from hpi.planner.topology import NODE_KINDS, build_topology, max_min_rates


def topo(name):
    return build_topology(load_profile(name))


def gb(x):
    return pytest.approx(x * 1e9, rel=1e-9)


def all_at(rates: dict, x: float) -> bool:
    """Every GPU's rate is x GB/s."""
    return len(rates) > 0 and list(rates.values()) == pytest.approx([x * 1e9] * len(rates), rel=1e-9)


# ---- the graph ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", profile_names())
def test_every_profile_builds_a_connected_typed_graph(name):
    topology = topo(name)
    graph = topology.graph
    assert nx.is_connected(graph)
    assert {d["kind"] for _, d in graph.nodes(data=True)} <= set(NODE_KINDS)
    for u, v, d in graph.edges(data=True):
        assert d["bandwidth_bytes_s"] > 0 and d["latency_s"] >= 0 and d["kind"], (u, v)
    assert len(topology.gpus) == topology.profile.n_gpus
    assert all(graph.nodes[g]["kind"] == "gpu" for g in topology.gpus)
    for gpu in topology.gpus:  # every GPU reaches host memory
        assert topology.path(topology.home_cpu(gpu), gpu).bandwidth_bytes_s > 0


def test_component_names_and_kinds():
    graph = topo("dgx-h100-x4-ib").graph
    expected = {"n0.gpu0": "gpu", "n0.pcie3": "pcie_switch", "n0.cpu1": "cpu", "n0.nvme0": "nvme",
                "n0.nvswitch": "nvswitch", "n3.nic7": "nic", "ib": "fabric"}
    assert {name: graph.nodes[name]["kind"] for name in expected} == expected
    assert graph.nodes["n2.gpu5"]["node"] == 2 and graph.nodes["ib"]["node"] is None
    assert graph.number_of_nodes() == 4 * 24 + 1


def test_gpu_order_nodes_and_islands():
    cluster = topo("dgx-h100-x4-ib")
    assert cluster.gpus[:2] == ("n0.gpu0", "n0.gpu1") and cluster.gpus[8] == "n1.gpu0"
    assert cluster.node_of("n3.gpu2") == 3
    assert {cluster.island_of(g) for g in cluster.gpus[:8]} == {"n0.nvl0"}
    assert cluster.island_of("n1.gpu0") == "n1.nvl0"
    a100 = topo("a100-pcie-4gpu")
    assert [a100.island_of(g) for g in a100.gpus] == list(a100.gpus)  # no NVLink: each GPU alone
    assert topo("h200-2gpu").island_of("n0.gpu1") == "n0.nvl0"


def test_gpu_order_follows_islands_not_indices(tmp_path):
    # 4 GPUs, NVLink bridges pairing 0-2 and 1-3: islands first, then indices
    profile = load_profile(str(_bridged_profile(tmp_path, bridges=[["gpu0", "gpu2"], ["gpu1", "gpu3"]])))
    topology = build_topology(profile)
    assert topology.gpus == ("n0.gpu0", "n0.gpu2", "n0.gpu1", "n0.gpu3")
    assert [tuple(i) for i in topology.islands()] == [("n0.gpu0", "n0.gpu2"), ("n0.gpu1", "n0.gpu3")]


def test_unknown_gpu_is_a_key_error():
    with pytest.raises(KeyError, match="not a GPU of dgx-h100"):
        topo("dgx-h100").island_of("n0.gpu8")


def test_build_is_cached_per_profile():
    profile = load_profile("dgx-h100")
    assert build_topology(profile) is build_topology(profile)


# ---- paths --------------------------------------------------------------------------------------------


def test_path_inside_dgx_uses_nvswitch():
    link = topo("dgx-h100").path("n0.gpu0", "n0.gpu7")
    assert (link.kind, link.bandwidth_bytes_s) == ("nvswitch", 450e9)
    assert link.path == "n0.gpu0 -> n0.nvswitch -> n0.gpu7" and link.latency_s == pytest.approx(1e-6)


def test_path_between_pcie_switches_crosses_the_cpu():
    a100 = topo("a100-pcie-4gpu")
    link = a100.path("n0.gpu0", "n0.gpu2")
    assert link.kind == "pcie-host" and link.bandwidth_bytes_s == gb(26)
    assert link.path == "n0.gpu0 -> n0.pcie0 -> n0.cpu0 -> n0.pcie1 -> n0.gpu2"
    assert link.latency_s == pytest.approx(4e-6)  # four PCIe hops
    same_switch = a100.path("n0.gpu0", "n0.gpu1")
    assert same_switch.kind == "pcie" and "cpu" not in same_switch.path


def test_path_across_nodes_uses_infiniband():
    link = topo("dgx-h100-x4-ib").path("n0.gpu0", "n2.gpu0")
    assert link.kind == "ib" and link.bandwidth_bytes_s == gb(50)
    assert " -> ib -> " in link.path and "nvswitch" not in link.path


def test_path_to_itself_is_local():
    assert topo("h200-2gpu").path("n0.gpu0", "n0.gpu0") == Link.local()


def test_h200_pair_is_nvlink():
    link = topo("h200-2gpu").group_link(["n0.gpu0", "n0.gpu1"])
    assert (link.kind, link.bandwidth_bytes_s, link.path) == ("nvlink", 450e9, "n0.gpu0 -> n0.gpu1")


# ---- group links --------------------------------------------------------------------------------------


def test_group_link_of_one_gpu_is_local():
    assert topo("dgx-h100").group_link(["n0.gpu3"]) == Link.local()


def test_a100_ring_over_four_gpus_crosses_the_root_complex():
    a100 = topo("a100-pcie-4gpu")
    link = a100.group_link(a100.gpus)
    assert link.kind == "pcie-host" and "n0.cpu0" in link.path
    # the ring's two cross-switch hops go opposite ways through the uplinks: no sharing, full Gen4
    assert link.bandwidth_bytes_s == gb(26)


def test_concurrent_groups_share_uplinks():
    a100 = topo("a100-pcie-4gpu")
    # two dp pairs (0,2) and (1,3) all-gather at once: both cross pcie0 -> cpu0 in the same direction
    link = a100.rings_link([("n0.gpu0", "n0.gpu2"), ("n0.gpu1", "n0.gpu3")])
    assert link.kind == "pcie-host" and link.bandwidth_bytes_s == gb(13)


def test_cross_node_transfers_spread_over_the_nics():
    cluster = topo("dgx-h100-x4-ib")
    pairs = [(f"n0.gpu{i}", f"n1.gpu{i}") for i in range(8)]
    link = cluster.concurrent_link(pairs)
    assert link.kind == "ib" and link.bandwidth_bytes_s == gb(50)  # 8 NICs, one transfer each


# ---- host and NVMe streaming --------------------------------------------------------------------------


def test_two_gpus_behind_one_switch_share_its_uplink():
    a100 = topo("a100-pcie-4gpu")
    alone = a100.host_to_gpu_bytes_s(["n0.gpu0"])
    assert alone == {"n0.gpu0": gb(26)}
    same_switch = a100.host_to_gpu_bytes_s(["n0.gpu0", "n0.gpu1"])
    assert same_switch == {"n0.gpu0": gb(13), "n0.gpu1": gb(13)}  # half the uplink each
    other_switches = a100.host_to_gpu_bytes_s(["n0.gpu0", "n0.gpu2"])
    assert other_switches == {"n0.gpu0": gb(26), "n0.gpu2": gb(26)}
    assert all_at(a100.host_to_gpu_bytes_s(a100.gpus), 13)


def test_dgx_eight_gpus_at_once_get_half_of_one_alone():
    dgx = topo("dgx-h100")
    assert dgx.host_to_gpu_bytes_s(["n0.gpu5"]) == {"n0.gpu5": gb(53.6)}
    everyone = dgx.host_to_gpu_bytes_s(dgx.gpus)
    assert len(everyone) == 8 and all_at(everyone, 26.8)
    assert dgx.home_cpu("n0.gpu0") == "n0.cpu0" and dgx.home_cpu("n0.gpu7") == "n0.cpu1"


def test_h200_gpus_have_their_own_links():
    h200 = topo("h200-2gpu")
    assert all_at(h200.host_to_gpu_bytes_s(h200.gpus), 55.2)


def test_pageable_is_capped_per_stream():
    assert topo("h100-sxm-1gpu").host_to_gpu_bytes_s(["n0.gpu0"], pinned=False) == {"n0.gpu0": gb(7.463)}
    dgx = topo("dgx-h100")
    assert all_at(dgx.host_to_gpu_bytes_s(dgx.gpus, pinned=False), 8.0)


def test_nvme_read_is_shared_and_bounded_by_the_pcie_path(tmp_path):
    dgx = topo("dgx-h100")
    assert dgx.nvme_to_gpu_bytes_s(["n0.gpu6"]) == {"n0.gpu6": gb(25)}
    assert all_at(dgx.nvme_to_gpu_bytes_s(dgx.gpus), 25 / 8)
    assert topo("h100-sxm-1gpu").nvme_to_gpu_bytes_s(["n0.gpu0"]) == {"n0.gpu0": gb(2.682)}
    assert topo("a100-pcie-4gpu").nvme_to_gpu_bytes_s(["n0.gpu0"]) == {"n0.gpu0": 0.0}  # no NVMe
    # an NVMe array faster than the GPU's PCIe link: the link bounds it
    fast = build_topology(load_profile(str(_bridged_profile(tmp_path, bridges=[], nvme_read=100e9))))
    assert fast.nvme_to_gpu_bytes_s(["n0.gpu0"]) == {"n0.gpu0": gb(26)}
    assert all_at(fast.nvme_to_gpu_bytes_s(fast.gpus), 25)  # 100 GB/s over 4 readers


def test_cluster_streams_per_node():
    cluster = topo("dgx-h100-x4-ib")
    assert all_at(cluster.host_to_gpu_bytes_s(cluster.gpus), 26.8)
    assert all_at(cluster.nvme_to_gpu_bytes_s(cluster.gpus), 25 / 8)  # each node its own RAID


def test_results_are_cached_and_copies():
    dgx = topo("dgx-h100")
    first = dgx.host_to_gpu_bytes_s(dgx.gpus)
    first["n0.gpu0"] = 0.0
    assert dgx.host_to_gpu_bytes_s(reversed(dgx.gpus))["n0.gpu0"] == gb(26.8)
    assert ("h2d", frozenset(dgx.gpus), True) in dgx._memo


def test_max_min_rates_gives_unused_share_to_others():
    # flows 0 and 1 share link "a" (10); flow 0 is also held to 2 by link "b": flow 1 gets the other 8
    assert max_min_rates([["a", "b"], ["a"]], {"a": 10.0, "b": 2.0}, [math.inf, math.inf]) == [2.0, 8.0]
    assert max_min_rates([["a"], ["a"]], {"a": 10.0}, [3.0, math.inf]) == [3.0, 7.0]
    assert max_min_rates([[]], {}, [math.inf]) == [math.inf]


def _bridged_profile(tmp_path, bridges, nvme_read=None):
    """4 GPUs each on its own Gen4 link to one CPU, optional NVLink bridges, optional NVMe."""
    def q(value):
        return {"value": value, "source": "assumed", "note": "test"}

    links = {"gpu_host": {"kind": "pcie", "bandwidth_bytes_s": q(26e9), "latency_s": q(1e-6),
                          "pairs": [[f"gpu{i}", "cpu0"] for i in range(4)]}}
    if bridges:
        links["bridge"] = {"kind": "nvlink", "bandwidth_bytes_s": q(56e9), "latency_s": q(5e-7), "pairs": bridges}
    data = {
        "name": "bridged", "description": "test", "os": "linux",
        "gpu": {"name": "x", "memory_bytes": q(48e9), "bf16_flops": q(1e14), "hbm_bandwidth_bytes_s": q(7e11)},
        "host": {"dram_bytes": q(2e11), "pinnable_bytes": q(1e11), "cpu_cores": q(16),
                 "h2d_pageable_bytes_s": q(8e9), "d2h_pageable_bytes_s": q(8e9)},
        "node": {"gpus": 4, "cpus": 1, "links": links},
    }
    if nvme_read:
        data["nvme"] = {"capacity_bytes": q(1e12), "read_bytes_s": q(nvme_read), "write_bytes_s": q(1e9)}
        data["node"]["nvme"] = 1
        links["nvme"] = {"kind": "pcie", "bandwidth_bytes_s": q(nvme_read), "latency_s": q(1e-6),
                         "pairs": [["nvme0", "cpu0"]]}
    path = tmp_path / "bridged.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
