"""Hardware profiles: one YAML file per machine or cluster, each number with its provenance.

    profile = load_profile("dgx-h100")        # a name in the profiles folder, or a path to a .yaml
    profile_names()                            # ["a100-pcie-4gpu", "a6000-workstation", ...]

The profiles folder is ``<repo>/hardware_profiles`` (found from this file), or ``$HPI_PROFILES_DIR``.

Schema (see ``hardware_profiles/*.yaml`` for complete examples)::

    name: h100-sxm-1gpu                  # optional; must equal the file name without .yaml
    extends: dgx-h100                    # optional; deep-merge over another profile of the same folder
    description: "..."
    os: linux                            # one of OS_KINDS
    notes: ["free text shown to users"]  # optional
    gpu:  {name: "...", memory_bytes: Q, bf16_flops: Q, hbm_bandwidth_bytes_s: Q, int8_flops: Q?}
    host: {dram_bytes: Q, pinnable_bytes: Q, cpu_cores: Q, h2d_pageable_bytes_s: Q, d2h_pageable_bytes_s: Q}
    nvme: {devices: 8, capacity_bytes: Q, read_bytes_s: Q, write_bytes_s: Q}     # optional / null
    efficiency: {h2d_stream_pinned: Q, ...}   # optional; any Efficiency field, defaults apply to the rest
    calibrated:                          # optional; written by `hpi calibrate`, applied over efficiency:
      date: "2026-11-22"                 # plus records, record_ids, held_out, error_before/after, unidentified
      coefficients: {h2d_stream_pinned: {value: 0.72, source: calibrated, note: "..."}, ...}
    node:                                # the components of ONE node and the links between them
      gpus: 8                            # gpu0..gpu7      (0: a CPU-only machine)
      cpus: 2                            # cpu0..cpu1      (a socket: its memory and PCIe root complex)
      pcie_switches: 4                   # pcie0..pcie3
      nvswitch: true                     # nvswitch
      nvme: 1                            # nvme0           (the node's NVMe array, see the nvme section)
      nics: 8                            # nic0..nic7
      links:                             # named link groups: one bandwidth for every pair in the group
        gpu_pcie: {kind: pcie, bandwidth_bytes_s: Q, latency_s: Q, pairs: [[gpu0, pcie0], [gpu1, pcie0]]}
    cluster:                             # optional; several identical nodes joined by a fabric
      nodes: 4
      fabric: {name: ib, kind: ib, bandwidth_bytes_s: Q, latency_s: Q, nics: [nic0, ...]}  # nics: default all

where every ``Q`` is a number with its provenance, ``{value: 48.0e9, source: datasheet, note: "..."}``;
``source`` is one of ``PROVENANCE_KINDS``. A bare number is rejected: a figure whose origin nobody wrote
down cannot be trusted or recalibrated later. Component counts (``node.gpus``, ``cluster.nodes``,
``nvme.devices`` ...) are structure, not measurements, and are plain integers. Link bandwidths are one
direction. YAML anchors (``&pcie5`` / ``*pcie5``) share one figure between several fields.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, NoReturn, Sequence

import networkx as nx
import yaml

from hpi.planner.specs.hardware import (
    OS_KINDS,
    PROVENANCE_KINDS,
    Efficiency,
    GpuSpec,
    HardwareProfile,
    HostSpec,
    NvmeSpec,
    Provenance,
    is_fraction,
)

__all__ = [
    "PROFILES_ENV",
    "ProfileError",
    "LinkGroup",
    "NodeLayout",
    "Fabric",
    "ClusterLayout",
    "LINK_KINDS",
    "FABRIC_KINDS",
    "load_profile",
    "profile_names",
    "profiles_dir",
    "parse_layout",
    "clear_cache",
]

PROFILES_ENV = "HPI_PROFILES_DIR"
# The profiles ship inside the package (so a wheel install has them); the repository's top-level
# hardware_profiles/ is a link to this folder.
_DEFAULT_DIR = Path(__file__).resolve().parent / "hardware_profiles"

FABRIC_KINDS = ("ib", "roce", "ethernet")  # inter-node fabrics (cluster.fabric.kind)
# Link kinds inside a node: PCIe lanes, NVLink (direct or into an NVSwitch), the inter-socket link
# (UPI / xGMI); a fabric kind is only valid between a NIC and the fabric.
LINK_KINDS = ("pcie", "nvlink", "socket")

# Component counts in node: -> (graph kind, name stem). Names are stem + index, except a lone NVSwitch.
_COMPONENTS = {
    "gpus": ("gpu", "gpu"),
    "cpus": ("cpu", "cpu"),
    "pcie_switches": ("pcie_switch", "pcie"),
    "nvme": ("nvme", "nvme"),
    "nics": ("nic", "nic"),
}
_TOP_KEYS = ("name", "extends", "description", "os", "notes", "gpu", "host", "nvme", "efficiency", "calibrated", "node",
             "cluster")
# What `hpi calibrate` writes in the calibrated: section (hpi.planner.calibrate); only coefficients is applied.
_CALIBRATED_KEYS = ("date", "records", "record_ids", "held_out", "seed", "error_before", "error_after", "unidentified",
                    "coefficients")
_QUANTITY_KEYS = ("value", "source", "note")


class ProfileError(ValueError):
    """A hardware profile that cannot be found or read; the message names the file and the field."""


# ---- the node and cluster layout (read by hpi.planner.topology) --------------------------------------------


@dataclass(frozen=True)
class LinkGroup:
    name: str  # the key under node.links, e.g. "gpu_pcie"
    kind: str  # one of LINK_KINDS
    bandwidth_bytes_s: float  # one direction, per pair
    latency_s: float  # one hop
    pairs: tuple[tuple[str, str], ...]  # component names inside one node, e.g. ("gpu0", "pcie0")


@dataclass(frozen=True)
class NodeLayout:
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
        for count_key, (kind, stem) in _COMPONENTS.items():
            for i in range(getattr(self, count_key)):
                names[f"{stem}{i}"] = kind
        if self.nvswitch:
            names["nvswitch"] = "nvswitch"
        return names


@dataclass(frozen=True)
class Fabric:
    name: str  # graph node name, e.g. "ib"
    kind: str  # one of FABRIC_KINDS
    bandwidth_bytes_s: float  # per NIC port, one direction
    latency_s: float  # NIC to fabric, one hop
    nics: tuple[str, ...]  # which NICs of every node attach to the fabric


@dataclass(frozen=True)
class ClusterLayout:
    nodes: int
    fabric: Fabric | None


# ---- public API ---------------------------------------------------------------------------------------


def profiles_dir() -> Path:
    """``$HPI_PROFILES_DIR`` if set, else the profiles shipped with the package (``hardware_profiles/``)."""
    env = os.environ.get(PROFILES_ENV)
    return Path(env).expanduser() if env else _DEFAULT_DIR


def profile_names() -> list[str]:
    """Names of the profiles in the profiles folder, sorted."""
    folder = profiles_dir()
    if not folder.is_dir():
        return []
    return sorted({p.stem for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()})


def load_profile(name_or_path: str, *, calibrated: bool = True) -> HardwareProfile:
    """Load and validate a profile by name (in ``profiles_dir()``) or by path; cached per file version.

    ``calibrated=False`` leaves out the ``calibrated:`` section: the probed ceilings and the ``efficiency:``
    priors only (what ``hpi calibrate`` fits from and ``hpi validate`` calls uncalibrated).
    """
    path = _resolve(str(name_or_path))
    return _load_cached(str(path), path.stat().st_mtime_ns, calibrated)


def clear_cache() -> None:
    """Forget loaded profiles (they are otherwise reloaded only when a file's mtime changes)."""
    _load_cached.cache_clear()


def parse_layout(raw: Mapping[str, Any], where: str = "profile") -> tuple[NodeLayout, ClusterLayout]:
    """Read the ``node`` and ``cluster`` sections of a parsed profile (``HardwareProfile.raw``)."""
    reader = _Reader(where)
    return _node_layout(reader, raw), _cluster_layout(reader, raw)


# ---- files --------------------------------------------------------------------------------------------


def _resolve(name_or_path: str) -> Path:
    as_path = Path(name_or_path).expanduser()
    looks_like_path = as_path.suffix in (".yaml", ".yml") or "/" in name_or_path or os.sep in name_or_path
    if looks_like_path:
        if not as_path.is_file():
            raise ProfileError(f"hardware profile file {as_path} does not exist")
        return as_path.resolve()
    folder = profiles_dir()
    for suffix in (".yaml", ".yml"):
        candidate = folder / f"{name_or_path}{suffix}"
        if candidate.is_file():
            return candidate.resolve()
    known = ", ".join(profile_names()) or f"none ({folder} has no .yaml files)"
    raise ProfileError(f"unknown hardware profile {name_or_path!r}; known: {known}")


@functools.lru_cache(maxsize=128)
def _load_cached(path: str, mtime_ns: int, calibrated: bool = True) -> HardwareProfile:  # mtime_ns: reload edited files
    raw, where = _read_with_bases(Path(path), seen=())
    return _build_profile(raw, Path(path), where, calibrated)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def malformed_yaml(path: Path, exc: yaml.YAMLError) -> str:
    """One line for a YAML parse error: the file, the line it broke on, and the parser's problem."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = f":{mark.line + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{path}{line}: malformed YAML: {problem}"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ProfileError(malformed_yaml(path, exc)) from exc
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a mapping of sections (gpu, host, node ...), got {type(data).__name__}")
    return data


def _read_with_bases(path: Path, seen: tuple[Path, ...]) -> tuple[dict[str, Any], str]:
    """The file's YAML deep-merged over the profile it ``extends`` (recursively)."""
    if path in seen:
        chain = " -> ".join(p.name for p in (*seen, path))
        raise ProfileError(f"{path}: extends: cycle {chain}")
    data = _read_yaml(path)
    base = data.pop("extends", None)
    if base is None:
        return data, str(path)
    if not isinstance(base, str):
        raise ProfileError(f"{path}: extends: expected a profile name, got {base!r}")
    base_path = next((path.parent / f"{base}{s}" for s in (".yaml", ".yml") if (path.parent / f"{base}{s}").is_file()), None)
    if base_path is None:
        raise ProfileError(f"{path}: extends: no profile {base!r} next to it in {path.parent}")
    base_data, base_where = _read_with_bases(base_path, (*seen, path))
    base_data.pop("name", None)  # the derived profile has its own name
    merged = _deep_merge(base_data, data)
    merged["extends"] = base  # kept in HardwareProfile.raw for the record
    return merged, f"{path} (extends {base_where})"


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value  # scalars, lists and null replace
    return merged


# ---- validation ---------------------------------------------------------------------------------------


class _Reader:
    """Reads typed fields out of the parsed YAML; every error names the file and the dotted field path."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.provenance: dict[str, Provenance] = {}

    def fail(self, path: str, message: str) -> NoReturn:
        raise ProfileError(f"{self.where}: {path}: {message}")

    def section(self, data: Mapping[str, Any], key: str, path: str, *, required: bool = True) -> Mapping[str, Any] | None:
        value = data.get(key)
        full = _join(path, key)
        if value is None:
            if required:
                self.fail(full, "missing section")
            return None
        if not isinstance(value, Mapping):
            self.fail(full, f"expected a mapping, got {type(value).__name__} {value!r}")
        return value

    def only(self, data: Mapping[str, Any], allowed: Sequence[str], path: str) -> None:
        unknown = [k for k in data if k not in allowed]
        if unknown:
            where = path or "top level"
            self.fail(_join(path, str(unknown[0])), f"unknown field in {where}; expected one of {', '.join(allowed)}")

    def text(self, data: Mapping[str, Any], key: str, path: str, *, default: str | None = None,
             choices: Sequence[str] | None = None) -> str:
        full = _join(path, key)
        value = data.get(key, default)
        if value is None:
            self.fail(full, "missing; expected a string")
        if not isinstance(value, str):
            self.fail(full, f"expected a string, got {type(value).__name__} {value!r}")
        if choices is not None and value not in choices:
            self.fail(full, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def count(self, data: Mapping[str, Any], key: str, path: str, *, default: int | None = 0) -> int:
        """A structural count: a plain integer >= 0 (a {value, source} form is accepted too)."""
        full = _join(path, key)
        value = data.get(key, default)
        if isinstance(value, Mapping):
            value = self.quantity(data, key, path)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if value is None or isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.fail(full, f"expected a whole number >= 0, got {value!r}")
        return value

    def quantity(self, data: Mapping[str, Any], key: str, path: str, *, required: bool = True,
                 positive: bool = False, at_most: float = math.inf) -> float | None:
        """A number with provenance, ``{value: 48.0e9, source: datasheet, note: "..."}``."""
        full = _join(path, key)
        entry = data.get(key)
        if entry is None:
            if required:
                kinds = "|".join(PROVENANCE_KINDS)
                self.fail(full, f"missing; expected {{value: <number>, source: <{kinds}>, note: <text>}}")
            return None
        if not isinstance(entry, Mapping):
            self.fail(full, f"a plain {entry!r} has no provenance; write {{value: {entry!r}, source: "
                      f"<{'|'.join(PROVENANCE_KINDS)}>, note: \"where it comes from\"}}")
        self.only(entry, _QUANTITY_KEYS, full)
        value = _number(entry.get("value"))
        if value is None:
            self.fail(_join(full, "value"), f"expected a number, got {entry.get('value')!r}")
        if not math.isfinite(value) or value < 0 or (positive and value == 0) or value > at_most:
            bound = f"> 0 and <= {at_most:g}" if at_most < math.inf else ("> 0" if positive else ">= 0")
            self.fail(_join(full, "value"), f"expected a finite number {bound}, got {value!r}")
        source = self.text(entry, "source", full, choices=PROVENANCE_KINDS)
        note = entry.get("note", "")
        if not isinstance(note, str):
            self.fail(_join(full, "note"), f"expected a string, got {note!r}")
        self.provenance[full] = Provenance(source=source, note=note)
        return value

    def name_list(self, value: Any, path: str) -> list[str]:
        if not isinstance(value, Sequence) or isinstance(value, str) or not all(isinstance(v, str) for v in value):
            self.fail(path, f"expected a list of names, got {value!r}")
        return list(value)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _number(value: Any) -> float | None:
    """YAML 1.1 (PyYAML) reads ``48.0e9`` as a string; accept numeric strings as numbers."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.replace("_", ""))
        except ValueError:
            return None
    return None


def _build_profile(raw: dict[str, Any], path: Path, where: str, calibrated: bool = True) -> HardwareProfile:
    reader = _Reader(where)
    reader.only(raw, _TOP_KEYS, "")
    name = reader.text(raw, "name", "", default=path.stem)
    if name != path.stem:
        reader.fail("name", f"{name!r} must equal the file name {path.stem!r} (profiles are looked up by file name)")
    notes = raw.get("notes", [])
    if notes:
        reader.name_list(notes, "notes")
    node, cluster = _node_layout(reader, raw), _cluster_layout(reader, raw)
    profile = HardwareProfile(
        name=name,
        description=reader.text(raw, "description", ""),
        os=reader.text(raw, "os", "", choices=OS_KINDS),
        n_nodes=cluster.nodes,
        gpus_per_node=node.gpus,
        gpu=_gpu(reader, raw, node.gpus),
        host=_host(reader, raw, node),
        nvme=_nvme(reader, raw),
        efficiency=_calibrated(reader, raw, _efficiency(reader, raw)) if calibrated else _efficiency(reader, raw),
        provenance=reader.provenance,
        raw=raw,
    )
    if node.nvme and profile.nvme is None:
        reader.fail("node.nvme", f"{node.nvme} NVMe component(s) but no nvme: section with their capacity and speed")
    return profile


def _gpu(reader: _Reader, raw: Mapping[str, Any], n_gpus: int) -> GpuSpec:
    section = reader.section(raw, "gpu", "", required=n_gpus > 0)
    if section is None:  # a CPU-only machine
        return GpuSpec(name="none", memory_bytes=0.0, bf16_flops=0.0, hbm_bandwidth_bytes_s=0.0)
    reader.only(section, ("name", "memory_bytes", "bf16_flops", "hbm_bandwidth_bytes_s", "int8_flops"), "gpu")
    return GpuSpec(
        name=reader.text(section, "name", "gpu"),
        memory_bytes=reader.quantity(section, "memory_bytes", "gpu", positive=True),
        bf16_flops=reader.quantity(section, "bf16_flops", "gpu", positive=True),
        hbm_bandwidth_bytes_s=reader.quantity(section, "hbm_bandwidth_bytes_s", "gpu", positive=True),
        int8_flops=reader.quantity(section, "int8_flops", "gpu", required=False) or 0.0,
    )


def _host(reader: _Reader, raw: Mapping[str, Any], node: NodeLayout) -> HostSpec:
    section = reader.section(raw, "host", "")
    keys = ("dram_bytes", "pinnable_bytes", "cpu_cores", "h2d_pageable_bytes_s", "d2h_pageable_bytes_s")
    reader.only(section, keys, "host")
    has_gpus = node.gpus > 0  # pageable copy speeds exist only where there is a GPU to copy to

    def copy_speed(key: str) -> float:
        return reader.quantity(section, key, "host", required=has_gpus, positive=True) or 0.0

    cores = reader.quantity(section, "cpu_cores", "host", positive=True)
    if not cores.is_integer():
        reader.fail("host.cpu_cores.value", f"expected a whole number, got {cores!r}")
    dram = reader.quantity(section, "dram_bytes", "host", positive=True)
    pinnable = reader.quantity(section, "pinnable_bytes", "host")
    if pinnable > dram:
        reader.fail("host.pinnable_bytes.value", f"{pinnable:g} > host.dram_bytes {dram:g}: cannot pin more than DRAM")
    return HostSpec(
        dram_bytes=dram,
        pinnable_bytes=pinnable,
        cpu_cores=int(cores),
        sockets=node.cpus,
        h2d_pageable_bytes_s=copy_speed("h2d_pageable_bytes_s"),
        d2h_pageable_bytes_s=copy_speed("d2h_pageable_bytes_s"),
    )


def _nvme(reader: _Reader, raw: Mapping[str, Any]) -> NvmeSpec | None:
    section = reader.section(raw, "nvme", "", required=False)
    if section is None:
        return None
    reader.only(section, ("devices", "capacity_bytes", "read_bytes_s", "write_bytes_s"), "nvme")
    return NvmeSpec(
        capacity_bytes=reader.quantity(section, "capacity_bytes", "nvme", positive=True),
        read_bytes_s=reader.quantity(section, "read_bytes_s", "nvme", positive=True),
        write_bytes_s=reader.quantity(section, "write_bytes_s", "nvme", positive=True),
        devices=max(1, reader.count(section, "devices", "nvme", default=1)),
    )


def _efficiency(reader: _Reader, raw: Mapping[str, Any]) -> Efficiency:
    section = reader.section(raw, "efficiency", "", required=False)
    if section is None:
        return Efficiency()
    names = [f.name for f in fields(Efficiency)]
    reader.only(section, names, "efficiency")
    values = {}
    for key in section:
        absolute = not is_fraction(key)  # seconds, bytes, factors; the others are fractions
        values[key] = reader.quantity(section, key, "efficiency", positive=True, at_most=math.inf if absolute else 1.0)
    return Efficiency(**values)


def _calibrated(reader: _Reader, raw: Mapping[str, Any], efficiency: Efficiency) -> Efficiency:
    """The ``calibrated:`` section's coefficients over ``efficiency`` (each must say ``source: calibrated``)."""
    section = reader.section(raw, "calibrated", "", required=False)
    if section is None:
        return efficiency
    reader.only(section, _CALIBRATED_KEYS, "calibrated")
    coefficients = reader.section(section, "coefficients", "calibrated")
    reader.only(coefficients, [f.name for f in fields(Efficiency)], "calibrated.coefficients")
    values = {}
    for key in coefficients:
        absolute = not is_fraction(key)
        path = "calibrated.coefficients"
        values[key] = reader.quantity(coefficients, key, path, positive=True, at_most=math.inf if absolute else 1.0)
        provenance = reader.provenance[f"{path}.{key}"]
        if provenance.source != "calibrated":
            reader.fail(f"{path}.{key}.source", f"{provenance.source!r} in the calibrated section; write source: calibrated "
                        "(or move the value to efficiency:)")
        reader.provenance[f"efficiency.{key}"] = provenance
    return dataclasses.replace(efficiency, **values)


def _node_layout(reader: _Reader, raw: Mapping[str, Any]) -> NodeLayout:
    section = reader.section(raw, "node", "")
    reader.only(section, (*_COMPONENTS, "nvswitch", "links"), "node")
    nvswitch = section.get("nvswitch", False)
    if not isinstance(nvswitch, bool):
        reader.fail("node.nvswitch", f"expected true or false, got {nvswitch!r}")
    counts = {key: reader.count(section, key, "node", default=1 if key == "cpus" else 0) for key in _COMPONENTS}
    if counts["cpus"] < 1:
        reader.fail("node.cpus", "a node needs at least one CPU socket (its host memory)")
    layout = NodeLayout(nvswitch=nvswitch, links=(), **counts)
    components = layout.components()
    links_section = reader.section(section, "links", "node", required=False) or {}
    groups = tuple(_link_group(reader, links_section, key, components) for key in links_section)
    _check_links(reader, groups, components)
    return NodeLayout(nvswitch=nvswitch, links=groups, **counts)


def _link_group(reader: _Reader, links: Mapping[str, Any], key: str, components: Mapping[str, str]) -> LinkGroup:
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


def _check_links(reader: _Reader, groups: Sequence[LinkGroup], components: Mapping[str, str]) -> None:
    """Each pair is declared once and every component is attached to the rest of the node."""
    graph = nx.Graph()
    graph.add_nodes_from(components)
    for group in groups:
        for a, b in group.pairs:
            if graph.has_edge(a, b):
                reader.fail(f"node.links.{group.name}", f"{a}-{b} is already linked by node.links.{graph[a][b]['group']}")
            graph.add_edge(a, b, group=group.name)
    if len(components) > 1 and not nx.is_connected(graph):
        main = max(nx.connected_components(graph), key=len)
        stray = sorted(set(components) - main)
        reader.fail("node.links", f"{', '.join(stray)} not linked to the rest of the node; add pairs for them")


def _cluster_layout(reader: _Reader, raw: Mapping[str, Any]) -> ClusterLayout:
    section = reader.section(raw, "cluster", "", required=False)
    if section is None:
        return ClusterLayout(nodes=1, fabric=None)
    reader.only(section, ("nodes", "fabric"), "cluster")
    nodes = reader.count(section, "nodes", "cluster", default=None)
    if nodes < 1:
        reader.fail("cluster.nodes", "expected at least 1 node")
    fabric_section = reader.section(section, "fabric", "cluster", required=nodes > 1)
    if fabric_section is None:
        return ClusterLayout(nodes=nodes, fabric=None)
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
    return ClusterLayout(nodes=nodes, fabric=fabric)
