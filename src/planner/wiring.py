"""The ``node:`` and ``cluster:`` sections of a hardware profile: which components one node has (GPUs, CPU
sockets, PCIe switches, an NVSwitch, NVMe, NICs), the links between them, and the fabric that joins
identical nodes. ``hpi.planner.topology`` compiles them into the graph the cost model routes over.

    node, cluster = parse_wiring(profile.raw, where=f"profile {profile.name}")   # NodeSpec, ClusterSpec
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import networkx as nx

from hpi.planner.profile_fields import FieldReader

__all__ = ["LINK_KINDS", "FABRIC_KINDS", "COMPONENTS", "LinkGroup", "NodeSpec", "Fabric", "ClusterSpec", "parse_wiring",
           "read_node", "read_cluster"]

FABRIC_KINDS = ("ib", "roce", "ethernet")  # inter-node fabrics (cluster.fabric.kind)
# Link kinds inside a node: PCIe lanes, NVLink (direct or into an NVSwitch), the inter-socket link
# (UPI / xGMI); a fabric kind is only valid between a NIC and the fabric.
LINK_KINDS = ("pcie", "nvlink", "socket")

# Component counts in node: -> (graph kind, name stem). Names are stem + index, except a lone NVSwitch.
COMPONENTS = {
    "gpus": ("gpu", "gpu"),
    "cpus": ("cpu", "cpu"),
    "pcie_switches": ("pcie_switch", "pcie"),
    "nvme": ("nvme", "nvme"),
    "nics": ("nic", "nic"),
}


@dataclass(frozen=True)
class LinkGroup:
    """One bandwidth for every pair of components in the group (a key under ``node.links``)."""

    name: str  # the key under node.links, e.g. "gpu_pcie"
    kind: str  # one of LINK_KINDS
    bandwidth_bytes_s: float  # one direction, per pair
    latency_s: float  # one hop
    pairs: tuple[tuple[str, str], ...]  # component names inside one node, e.g. ("gpu0", "pcie0")


@dataclass(frozen=True)
class NodeSpec:
    """One node's components (counts; names are stem + index) and the link groups between them (``node:``)."""

    gpus: int
    cpus: int
    pcie_switches: int
    nvswitch: bool
    nvme: int
    nics: int
    links: tuple[LinkGroup, ...]

    def components(self) -> dict[str, str]:
        """Component name -> kind, for one node (``gpu0`` -> ``gpu``, ``nvswitch`` -> ``nvswitch``)."""
        names: dict[str, str] = {}
        for count_key, (kind, stem) in COMPONENTS.items():
            for i in range(getattr(self, count_key)):
                names[f"{stem}{i}"] = kind
        if self.nvswitch:
            names["nvswitch"] = "nvswitch"
        return names


@dataclass(frozen=True)
class Fabric:
    """The inter-node network: which NICs of every node attach to it, at what rate (``cluster.fabric``)."""

    name: str  # graph node name, e.g. "ib"
    kind: str  # one of FABRIC_KINDS
    bandwidth_bytes_s: float  # per NIC port, one direction
    latency_s: float  # NIC to fabric, one hop
    nics: tuple[str, ...]  # which NICs of every node attach to the fabric


@dataclass(frozen=True)
class ClusterSpec:
    """How many identical nodes, and the fabric that joins their NICs (``cluster:``; one node without it)."""

    nodes: int
    fabric: Fabric | None


def parse_wiring(raw: Mapping[str, Any], where: str = "profile") -> tuple[NodeSpec, ClusterSpec]:
    """Read the ``node`` and ``cluster`` sections of a parsed profile (``HardwareProfile.raw``)."""
    reader = FieldReader(where)
    return read_node(reader, raw), read_cluster(reader, raw)


def read_node(reader: FieldReader, raw: Mapping[str, Any]) -> NodeSpec:
    section = reader.section(raw, "node", "")
    reader.only(section, (*COMPONENTS, "nvswitch", "links"), "node")
    nvswitch = section.get("nvswitch", False)
    if not isinstance(nvswitch, bool):
        reader.fail("node.nvswitch", f"expected true or false, got {nvswitch!r}")
    counts = {key: reader.count(section, key, "node", default=1 if key == "cpus" else 0) for key in COMPONENTS}
    if counts["cpus"] < 1:
        reader.fail("node.cpus", "a node needs at least one CPU socket (its host memory)")
    node = NodeSpec(nvswitch=nvswitch, links=(), **counts)
    components = node.components()
    links_section = reader.section(section, "links", "node", required=False) or {}
    groups = tuple(_link_group(reader, links_section, key, components) for key in links_section)
    _check_links(reader, groups, components)
    return NodeSpec(nvswitch=nvswitch, links=groups, **counts)


def _link_group(reader: FieldReader, links: Mapping[str, Any], key: str, components: Mapping[str, str]) -> LinkGroup:
    path = f"node.links.{key}"
    group = reader.section(links, key, "node.links")
    reader.only(group, ("kind", "bandwidth_bytes_s", "latency_s", "pairs"), path)
    pairs_raw = group.get("pairs")
    if not isinstance(pairs_raw, Sequence) or isinstance(pairs_raw, str) or not pairs_raw:
        reader.fail(f"{path}.pairs", f"expected a list of [a, b] component pairs, got {pairs_raw!r}")
    pairs = []
    for i, pair in enumerate(pairs_raw):
        names = reader.name_list(pair, f"{path}.pairs[{i}]")
        if len(names) != 2 or names[0] == names[1]:
            reader.fail(f"{path}.pairs[{i}]", f"expected two different component names, got {pair!r}")
        for name in names:
            if name not in components:
                reader.fail(f"{path}.pairs[{i}]", f"unknown component {name!r}; this node has {', '.join(components)}")
        pairs.append((names[0], names[1]))
    return LinkGroup(
        name=key,
        kind=reader.text(group, "kind", path, choices=LINK_KINDS),
        bandwidth_bytes_s=reader.quantity(group, "bandwidth_bytes_s", path, positive=True),
        latency_s=reader.quantity(group, "latency_s", path),
        pairs=tuple(pairs),
    )


def _check_links(reader: FieldReader, groups: Sequence[LinkGroup], components: Mapping[str, str]) -> None:
    """Each pair is declared once and every component is attached to the rest of the node."""
    graph = nx.Graph()
    graph.add_nodes_from(components)
    for group in groups:
        for a, b in group.pairs:
            if graph.has_edge(a, b):
                reader.fail(f"node.links.{group.name}",
                            f"{a}-{b} is already linked by node.links.{graph[a][b]['group']}")
            graph.add_edge(a, b, group=group.name)
    if len(components) > 1 and not nx.is_connected(graph):
        main = max(nx.connected_components(graph), key=len)
        stray = sorted(set(components) - main)
        reader.fail("node.links", f"{', '.join(stray)} not linked to the rest of the node; add pairs for them")


def read_cluster(reader: FieldReader, raw: Mapping[str, Any]) -> ClusterSpec:
    section = reader.section(raw, "cluster", "", required=False)
    if section is None:
        return ClusterSpec(nodes=1, fabric=None)
    reader.only(section, ("nodes", "fabric"), "cluster")
    nodes = reader.count(section, "nodes", "cluster", default=None)
    if nodes < 1:
        reader.fail("cluster.nodes", "expected at least 1 node")
    fabric_section = reader.section(section, "fabric", "cluster", required=nodes > 1)
    if fabric_section is None:
        return ClusterSpec(nodes=nodes, fabric=None)
    path = "cluster.fabric"
    reader.only(fabric_section, ("name", "kind", "bandwidth_bytes_s", "latency_s", "nics"), path)
    kind = reader.text(fabric_section, "kind", path, choices=FABRIC_KINDS)
    nic_names = [f"nic{i}" for i in range(reader.count(raw.get("node", {}), "nics", "node"))]
    nics = reader.name_list(fabric_section.get("nics", nic_names), f"{path}.nics")
    if not nics:
        reader.fail(f"{path}.nics", "the fabric needs NICs: declare node.nics and list them here (default: all)")
    for nic in nics:
        if nic not in nic_names:
            reader.fail(f"{path}.nics", f"unknown NIC {nic!r}; node.nics gives {', '.join(nic_names) or 'none'}")
    fabric = Fabric(
        name=reader.text(fabric_section, "name", path, default=kind),
        kind=kind,
        bandwidth_bytes_s=reader.quantity(fabric_section, "bandwidth_bytes_s", path, positive=True),
        latency_s=reader.quantity(fabric_section, "latency_s", path),
        nics=tuple(nics),
    )
    return ClusterSpec(nodes=nodes, fabric=fabric)
