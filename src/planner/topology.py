"""The hardware as a graph: which GPU reaches what, over which links, and how concurrent traffic shares them.

``build_topology(profile)`` compiles a profile's ``node`` and ``cluster`` sections into a ``networkx.Graph``:

- nodes are components, named ``n<node>.<component>`` (``n0.gpu3``, ``n0.pcie1``, ``n0.cpu0``, ``n0.nvme0``,
  ``n0.nvswitch``, ``n0.nic2``) plus the fabric (``ib``); attribute ``kind`` is one of ``NODE_KINDS`` and
  ``node`` the node index (None for the fabric);
- edges are links with ``bandwidth_bytes_s`` (ONE direction), ``latency_s`` and ``kind`` (pcie, nvlink,
  socket, ib ...).

Routing rule: traffic between two components takes the widest path (max bottleneck bandwidth), then the
lowest latency; GPUs and NVMe arrays are end points, never transit (no PCIe forwarding through a GPU).
Where several such paths tie (two NICs behind one switch), concurrent transfers spread over them.

Sharing rule: transfers that run at once get max-min fair shares of every directed link they cross
(progressive filling): each link's bandwidth is split among the streams crossing it in that direction,
and a stream held back elsewhere leaves its unused share to the others. That is how two GPUs behind one
PCIe switch uplink, or eight GPUs reading one NVMe array, are modelled.

Results are cached per Topology (keyed by frozensets of GPUs), and ``build_topology`` per profile object.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from itertools import islice
from typing import Callable, Hashable, Iterable, Sequence

import networkx as nx

from hpi.planner.profiles import ProfileError
from hpi.planner.specs.hardware import HardwareProfile
from hpi.planner.specs.placement import Link
from hpi.planner.wiring import ClusterSpec, NodeSpec, parse_wiring

__all__ = ["NODE_KINDS", "Topology", "build_topology", "link_words", "max_min_rates"]

NODE_KINDS = ("gpu", "pcie_switch", "cpu", "nvme", "nvswitch", "nic", "fabric")
_ENDPOINT_KINDS = ("gpu", "nvme")  # never forward traffic for others
_MAX_ROUTES = 16  # equal-cost alternatives considered per pair
_REL_TOL = 1e-9
_KIND_WORDS = {"nvswitch": "NVSwitch", "nvlink": "NVLink", "pcie": "PCIe", "pcie-host": "PCIe through the CPU",
               "ib": "InfiniBand", "roce": "RoCE", "ethernet": "Ethernet", "local": "no link"}

Route = tuple[str, ...]  # graph nodes from source to destination


def link_words(kind: str) -> str:
    """Human name of a Link kind, for notes ("InfiniBand", "PCIe through the CPU")."""
    return _KIND_WORDS.get(kind, kind)


class Topology:
    """A compiled profile: the graph, the GPUs in placement order, and bandwidth queries on it."""

    def __init__(self, profile: HardwareProfile, graph: nx.Graph, gpus: Sequence[str], islands: dict[str, str]) -> None:
        self.profile = profile
        self.graph = graph
        self.gpus: tuple[str, ...] = tuple(gpus)  # by node, then NVLink island, then index
        self._island = islands
        self._index = {gpu: i for i, gpu in enumerate(self.gpus)}
        self._memo: dict[Hashable, object] = {}
        self.place_cache: dict[Hashable, object] = {}  # hpi.planner.ranks.place results, keyed (tp, dp, pp, name)

    def __repr__(self) -> str:
        return f"Topology({self.name!r}: {len(self.gpus)} GPUs, {self.graph.number_of_nodes()} components)"

    @property
    def name(self) -> str:
        return self.profile.name

    # ---- structure ------------------------------------------------------------------------------------
    def node_of(self, gpu: str) -> int:
        return self.graph.nodes[self._check_gpu(gpu)]["node"]

    def island_of(self, gpu: str) -> str:
        """NVLink/NVSwitch island id (``n0.nvl0``), or the GPU's own name when it has no NVLink peers."""
        return self._island[self._check_gpu(gpu)]

    def islands(self) -> list[tuple[str, ...]]:
        """GPU islands in placement order."""
        grouped: dict[str, list[str]] = {}
        for gpu in self.gpus:
            grouped.setdefault(self._island[gpu], []).append(gpu)
        return [tuple(members) for members in grouped.values()]

    def nodes_of(self, gpus: Iterable[str]) -> set[int]:
        return {self.node_of(g) for g in gpus}

    def home_cpu(self, gpu: str) -> str:
        """The socket whose memory feeds this GPU: widest, then nearest (NUMA-local pinned buffers)."""
        return self._memoized(("home", gpu), lambda: self._nearest(gpu, "cpu"))

    # ---- point to point -------------------------------------------------------------------------------
    def path(self, a: str, b: str) -> Link:
        """The link from component ``a`` to ``b`` alone: bottleneck bandwidth, summed latency."""
        if a == b:
            return Link.local()
        return self._link(self._routes(a, b)[0])

    # ---- groups ---------------------------------------------------------------------------------------
    def group_link(self, gpus: Iterable[str]) -> Link:
        """The slowest hop of a ring over these GPUs (in placement order), all hops sending at once."""
        return self.rings_link([tuple(gpus)])

    def rings_link(self, groups: Iterable[Sequence[str]]) -> Link:
        """Like ``group_link`` for several groups whose rings run at the same time (they may share links)."""
        pairs = []
        for group in groups:
            ring = sorted(set(group), key=self._order)
            if len(ring) > 1:
                pairs += [(ring[i], ring[(i + 1) % len(ring)]) for i in range(len(ring))]
        return self.concurrent_link(pairs)

    def concurrent_link(self, pairs: Iterable[tuple[str, str]]) -> Link:
        """The slowest of these point-to-point transfers when all run at once (``Link.local()`` if none)."""
        key = ("pairs", tuple(sorted({(a, b) for a, b in pairs if a != b})))
        return self._memoized(key, lambda: self._slowest([[p] for p in key[1]]))

    # ---- streaming ------------------------------------------------------------------------------------
    def host_to_gpu_bytes_s(self, gpus: Iterable[str], pinned: bool = True) -> dict[str, float]:
        """Per-GPU host->device bandwidth while all these GPUs stream from host memory at once."""
        members = self._gpu_set(gpus)

        def compute() -> tuple[tuple[str, float], ...]:
            order = sorted(members, key=self._order)
            cap = math.inf if pinned else (self.profile.host.h2d_pageable_bytes_s or math.inf)  # 0: unknown
            rates = self._rates([[(self.home_cpu(g), g)] for g in order], caps=[cap] * len(order))
            return tuple(zip(order, rates))

        return dict(self._memoized(("h2d", members, pinned), compute))

    def nvme_to_gpu_bytes_s(self, gpus: Iterable[str]) -> dict[str, float]:
        """Per-GPU share of NVMe reads, through host memory, while all these GPUs read at once (0: no NVMe)."""
        members = self._gpu_set(gpus)

        def compute() -> tuple[tuple[str, float], ...]:
            order = sorted(members, key=self._order)
            if not self.profile.has_nvme:
                return tuple((g, 0.0) for g in order)
            readers = [g for g in order if self._nearest(self.home_cpu(g), "nvme") is not None]
            flows = [[(self._nearest(self.home_cpu(g), "nvme"), self.home_cpu(g)), (self.home_cpu(g), g)]
                     for g in readers]
            rates = dict(zip(readers, self._rates(flows, caps=[math.inf] * len(flows))))
            return tuple((g, rates.get(g, 0.0)) for g in order)

        return dict(self._memoized(("nvme", members), compute))

    # ---- internals ------------------------------------------------------------------------------------
    def _memoized(self, key: Hashable, compute: Callable[[], object]):
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def _check_gpu(self, gpu: str) -> str:
        if gpu not in self._index:
            some = ", ".join(self.gpus[:4]) + (" ..." if len(self.gpus) > 4 else "")
            raise KeyError(f"{gpu!r} is not a GPU of {self.name}; GPUs: {some or 'none'}")
        return gpu

    def _gpu_set(self, gpus: Iterable[str]) -> frozenset[str]:
        return frozenset(self._check_gpu(g) for g in gpus)

    def _order(self, gpu: str) -> int:
        return self._index[gpu]

    def _nearest(self, source: str, kind: str) -> str | None:
        """The component of ``kind`` in source's node reached over the widest, then shortest, path."""
        node = self.graph.nodes[source]["node"]
        candidates = [n for n, d in self.graph.nodes(data=True) if d["kind"] == kind and d["node"] == node]
        reachable = [c for c in candidates if self._reachable(source, c)]
        if not reachable:
            return None
        return min(reachable,
                   key=lambda c: (-self.path(source, c).bandwidth_bytes_s, self.path(source, c).latency_s, c))

    def _reachable(self, a: str, b: str) -> bool:
        if a == b:
            return True
        view, start = self._routing_graph(0.0), self._route_start(a)
        return start in view and b in view and nx.has_path(view, start, b)

    def _route_start(self, component: str) -> str:
        return _source_twin(component) if self.graph.nodes[component]["kind"] in _ENDPOINT_KINDS else component

    def _routing_graph(self, min_bandwidth: float) -> nx.DiGraph:
        """The links of at least ``min_bandwidth``, directed so that endpoints never forward traffic.

        An endpoint (GPU, NVMe) keeps only its incoming edges; a route *from* it starts at its source
        twin, which has its outgoing ones. Built once per width: a concrete graph is far faster to
        search than a filtered view, whose filters run on every edge visit.
        """

        def build() -> nx.DiGraph:
            graph, view = self.graph, nx.DiGraph()
            for u, v, data in graph.edges(data=True):
                if data["bandwidth_bytes_s"] < min_bandwidth * (1 - _REL_TOL):
                    continue
                for x, y in ((u, v), (v, u)):
                    start = _source_twin(x) if graph.nodes[x]["kind"] in _ENDPOINT_KINDS else x
                    view.add_edge(start, y, latency_ps=data["latency_ps"])
                    if start != x:
                        view.add_node(x)
            return view

        return self._memoized(("routing-graph", min_bandwidth), build)

    def _routes(self, a: str, b: str) -> tuple[Route, ...]:
        """Widest paths from a to b, then lowest latency; the tied alternatives (at most _MAX_ROUTES)."""

        def compute() -> tuple[Route, ...]:
            widths = sorted({d["bandwidth_bytes_s"] for _, _, d in self.graph.edges(data=True)}, reverse=True)
            start = self._route_start(a)
            for width in widths:  # the first width that still connects a and b is the bottleneck
                view = self._routing_graph(width)
                if start in view and b in view and nx.has_path(view, start, b):
                    paths = nx.all_shortest_paths(view, start, b, weight="latency_ps")
                    return tuple((a, *p[1:]) for p in islice(paths, _MAX_ROUTES))
            raise ProfileError(f"{self.name}: no path from {a} to {b}: check node.links and cluster.fabric")

        return self._memoized(("routes", a, b), compute)

    def _link(self, route: Route, bandwidth: float | None = None) -> Link:
        edges = [self.graph[u][v] for u, v in zip(route, route[1:])]
        return Link(
            bandwidth_bytes_s=min(e["bandwidth_bytes_s"] for e in edges) if bandwidth is None else bandwidth,
            latency_s=sum(e["latency_s"] for e in edges),
            kind=self._kind(route),
            path=" -> ".join(route),
        )

    def _kind(self, route: Route) -> str:
        transit = {self.graph.nodes[n]["kind"] for n in route[1:-1]}
        edge_kinds = {self.graph[u][v]["kind"] for u, v in zip(route, route[1:])}
        if "fabric" in transit:
            return next(k for k in edge_kinds if k not in ("pcie", "nvlink", "socket"))
        if "nvswitch" in transit:
            return "nvswitch"
        if edge_kinds == {"nvlink"}:
            return "nvlink"
        return "pcie-host" if "cpu" in transit else "pcie"

    def _choose_routes(self, flows: Sequence[Sequence[tuple[str, str]]]) -> list[Route]:
        """One route per flow (a flow is a chain of legs); tied alternatives go to the least loaded."""
        load: Counter[tuple[str, str]] = Counter()
        chosen = []
        for legs in flows:
            route: list[str] = []
            for a, b in legs:
                best = max(self._routes(a, b), key=lambda r: self._headroom(r, load))
                route += best if not route else best[1:]
                load.update(zip(best, best[1:]))
            chosen.append(tuple(route))
        return chosen

    def _headroom(self, route: Route, load: Counter) -> float:
        return min(self.graph[u][v]["bandwidth_bytes_s"] / (load[(u, v)] + 1) for u, v in zip(route, route[1:]))

    def _rates(self, flows: Sequence[Sequence[tuple[str, str]]], caps: Sequence[float]) -> list[float]:
        routes = self._choose_routes(flows)
        edges = [list(zip(r, r[1:])) for r in routes]
        capacity = {e: self.graph[e[0]][e[1]]["bandwidth_bytes_s"] for es in edges for e in es}
        return max_min_rates(edges, capacity, caps)

    def _slowest(self, flows: Sequence[Sequence[tuple[str, str]]]) -> Link:
        if not flows:
            return Link.local()
        routes = self._choose_routes(flows)
        edges = [list(zip(r, r[1:])) for r in routes]
        capacity = {e: self.graph[e[0]][e[1]]["bandwidth_bytes_s"] for es in edges for e in es}
        rates = max_min_rates(edges, capacity, [math.inf] * len(flows))
        slowest = min(range(len(flows)), key=lambda i: (rates[i], -self._link(routes[i]).latency_s))
        return self._link(routes[slowest], bandwidth=rates[slowest])


def _source_twin(endpoint: str) -> str:
    """The name under which an endpoint starts routes in ``Topology._routing_graph``."""
    return f"{endpoint}@src"


def max_min_rates(
    flows: Sequence[Sequence[Hashable]], capacity: dict[Hashable, float], caps: Sequence[float]
) -> list[float]:
    """Max-min fair rates of flows over shared links (progressive filling), each also capped by ``caps[i]``.

    ``flows[i]`` lists the (directed) links flow i crosses; a flow with no links and no cap gets ``inf``.
    """
    rates = [0.0] * len(flows)
    residual = dict(capacity)
    active = set(range(len(flows)))
    while active:
        users = Counter(e for i in active for e in flows[i])
        step = min([residual[e] / n for e, n in users.items()] + [caps[i] - rates[i] for i in active])
        if math.isinf(step):
            for i in active:
                rates[i] = math.inf
            break
        for i in active:
            rates[i] += step
            for e in flows[i]:
                residual[e] -= step
        full = {e for e in users if residual[e] <= _REL_TOL * capacity[e]}
        active = {i for i in active if caps[i] - rates[i] > _REL_TOL * rates[i] and not full.intersection(flows[i])}
    return rates


# ---- building -----------------------------------------------------------------------------------------

_BUILT: dict[int, tuple[HardwareProfile, Topology]] = {}  # id(profile) -> (profile kept alive, topology)


def build_topology(profile: HardwareProfile) -> Topology:
    """Compile ``profile.raw``'s node and cluster sections into a Topology (cached per profile object)."""
    hit = _BUILT.get(id(profile))
    if hit is not None and hit[0] is profile:
        return hit[1]
    if len(_BUILT) > 256:
        _BUILT.clear()
    node, cluster = parse_wiring(profile.raw, where=f"profile {profile.name}")
    graph = _graph(profile, node, cluster)
    gpus, islands = _order_gpus(graph, node, cluster.nodes)
    topology = Topology(profile, graph, gpus, islands)
    _BUILT[id(profile)] = (profile, topology)
    return topology


def _graph(profile: HardwareProfile, node: NodeSpec, cluster: ClusterSpec) -> nx.Graph:
    graph = nx.Graph(name=profile.name)
    components = node.components()
    nvme_read = profile.nvme.read_bytes_s / max(node.nvme, 1) if profile.nvme else math.inf  # per array node
    for n in range(cluster.nodes):
        for name, kind in components.items():
            graph.add_node(f"n{n}.{name}", kind=kind, node=n)
        for group in node.links:
            for a, b in group.pairs:
                bandwidth = group.bandwidth_bytes_s
                if "nvme" in (components[a], components[b]):  # the array's read ceiling bounds its link
                    bandwidth = min(bandwidth, nvme_read)
                _add_link(graph, f"n{n}.{a}", f"n{n}.{b}", bandwidth, group.latency_s, group.kind)
    fabric = cluster.fabric
    if fabric is not None:
        graph.add_node(fabric.name, kind="fabric", node=None)
        for n in range(cluster.nodes):
            for nic in fabric.nics:
                _add_link(graph, f"n{n}.{nic}", fabric.name, fabric.bandwidth_bytes_s, fabric.latency_s, fabric.kind)
    if graph.number_of_nodes() > 1 and not nx.is_connected(graph):
        raise ProfileError(f"profile {profile.name}: the nodes are not connected: "
                           "cluster.fabric must attach their NICs")
    return graph


def _add_link(graph: nx.Graph, a: str, b: str, bandwidth: float, latency: float, kind: str) -> None:
    graph.add_edge(a, b, bandwidth_bytes_s=bandwidth, latency_s=latency, latency_ps=round(latency * 1e12), kind=kind)


def _order_gpus(graph: nx.Graph, node: NodeSpec, n_nodes: int) -> tuple[list[str], dict[str, str]]:
    """GPUs by node, then NVLink island (islands by their lowest GPU index), then index; island ids."""
    nvlinks = nx.Graph([(u, v) for u, v, d in graph.edges(data=True) if d["kind"] == "nvlink"])
    order: list[str] = []
    islands: dict[str, str] = {}
    for n in range(n_nodes):
        gpus = [f"n{n}.gpu{i}" for i in range(node.gpus)]
        groups: list[list[str]] = []
        seen: set[str] = set()
        for gpu in gpus:
            if gpu in seen:
                continue
            peers = nx.node_connected_component(nvlinks, gpu) if gpu in nvlinks else {gpu}
            members = sorted((p for p in peers if graph.nodes[p]["kind"] == "gpu"), key=_gpu_index)
            seen.update(members)
            groups.append(members)
        for k, members in enumerate(g for g in groups if len(g) > 1):
            islands.update({gpu: f"n{n}.nvl{k}" for gpu in members})
        for members in groups:
            islands.update({gpu: gpu for gpu in members if len(members) == 1})
            order += members
    return order, islands


def _gpu_index(name: str) -> int:
    return int(re.search(r"gpu(\d+)$", name).group(1))
