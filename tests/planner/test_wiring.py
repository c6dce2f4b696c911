"""A profile's node: and cluster: sections read on their own (hpi.planner.wiring); the errors they raise
through load_profile are in test_profiles.py."""

from __future__ import annotations

import pytest

from hpi.planner.profiles import ProfileError, load_profile
from hpi.planner.wiring import ClusterSpec, NodeSpec, parse_wiring


def q(value):
    return {"value": value, "source": "assumed", "note": "test"}


def node_section(**counts) -> dict:
    """One node: two GPUs behind a PCIe switch on one socket, NICs hanging off the switch."""
    node = {"gpus": 2, "cpus": 1, "pcie_switches": 1, **counts}
    pairs = [["gpu0", "pcie0"], ["gpu1", "pcie0"], ["pcie0", "cpu0"]]
    pairs += [[f"nic{i}", "pcie0"] for i in range(node.get("nics", 0))]
    node["links"] = {"pcie": {"kind": "pcie", "bandwidth_bytes_s": q(26e9), "latency_s": q(1e-6), "pairs": pairs}}
    return node


def test_one_node_without_a_cluster_section():
    node, cluster = parse_wiring({"node": node_section()})
    assert isinstance(node, NodeSpec) and cluster == ClusterSpec(nodes=1, fabric=None)
    assert node.components() == {"gpu0": "gpu", "gpu1": "gpu", "cpu0": "cpu", "pcie0": "pcie_switch"}
    (group,) = node.links
    assert group.name == "pcie" and group.kind == "pcie" and group.bandwidth_bytes_s == 26e9
    assert group.pairs[-1] == ("pcie0", "cpu0")


def test_a_lone_nvswitch_keeps_its_name_and_the_fabric_takes_every_nic_by_default():
    raw = {"node": node_section(nics=2, nvswitch=True),
           "cluster": {"nodes": 4, "fabric": {"kind": "ib", "bandwidth_bytes_s": q(50e9), "latency_s": q(2e-6)}}}
    raw["node"]["links"]["nvlink"] = {"kind": "nvlink", "bandwidth_bytes_s": q(450e9), "latency_s": q(0.5e-6),
                                      "pairs": [["gpu0", "nvswitch"], ["gpu1", "nvswitch"]]}
    node, cluster = parse_wiring(raw)
    assert node.components()["nvswitch"] == "nvswitch" and node.nics == 2
    assert cluster.nodes == 4 and cluster.fabric.name == "ib" and cluster.fabric.nics == ("nic0", "nic1")
    assert cluster.fabric.bandwidth_bytes_s == 50e9


def test_errors_name_the_place_given_and_the_field():
    raw = {"node": node_section()}
    raw["node"]["links"]["pcie"]["pairs"].append(["gpu0", "pcie0"])
    already = r"^profile x: node.links.pcie: gpu0-pcie0 is already linked by node.links.pcie$"
    with pytest.raises(ProfileError, match=already):
        parse_wiring(raw, where="profile x")


def test_a_shipped_profile_reads_the_same_on_its_own():
    profile = load_profile("dgx-h100-x4-ib")
    node, cluster = parse_wiring(profile.raw)
    assert node.gpus == profile.gpus_per_node and cluster.nodes == profile.n_nodes == 4
    assert node.nvswitch and cluster.fabric is not None and cluster.fabric.kind == "ib"
