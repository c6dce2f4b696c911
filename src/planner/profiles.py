"""Hardware profiles: one YAML file per machine or cluster, each number with its provenance.

    profile = load_profile("dgx-h100")        # a name in the profiles folder, or a path to a .yaml
    profile_names()                            # ["a100-pcie-4gpu", "a6000-workstation", ...]

The profiles folder is ``<repo>/hardware_profiles`` (found from this file), or ``$HPI_PROFILES_DIR``.
The ``node:`` and ``cluster:`` sections are read by ``hpi.planner.wiring`` (``NodeSpec``, ``ClusterSpec``),
every field through ``hpi.planner.profile_fields.FieldReader``.

Schema (see ``hardware_profiles/*.yaml`` for complete examples)::

    name: h100-sxm-1gpu                  # optional; must equal the file name without .yaml
    extends: dgx-h100                    # optional; deep-merge over another profile of the same folder
    description: "..."
    os: linux                            # one of OS_KINDS
    notes: ["free text shown to users"]  # optional
    gpu:  {name: "...", memory_bytes: Q, bf16_flops: Q, hbm_bandwidth_bytes_s: Q, int8_flops: Q?}
    host: {dram_bytes: Q, pinnable_bytes: Q, cpu_cores: Q, h2d_pageable_bytes_s: Q, d2h_pageable_bytes_s: Q}
    nvme: {devices: 8, capacity_bytes: Q, read_bytes_s: Q, write_bytes_s: Q}     # optional / null
      # + read_grid: {source: probed, note: "...", points: [[request_bytes, in_flight, read_bytes_s], ...]}
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
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from hpi.planner.profile_fields import FieldReader, ProfileError
from hpi.planner.specs.hardware import (
    OS_KINDS,
    PROVENANCE_KINDS,
    AioReadPoint,
    Efficiency,
    GpuSpec,
    HardwareProfile,
    HostSpec,
    NvmeSpec,
    Provenance,
    is_fraction,
)
from hpi.planner.wiring import NodeSpec, read_cluster, read_node

__all__ = [
    "PROFILES_ENV",
    "DRAM_OS_SHARE",
    "ProfileError",
    "load_profile",
    "profile_names",
    "profiles_dir",
    "clear_cache",
    "malformed_yaml",
]

PROFILES_ENV = "HPI_PROFILES_DIR"
# The profiles ship inside the package (so a wheel install has them); the repository's top-level
# hardware_profiles/ is a link to this folder.
_DEFAULT_DIR = Path(__file__).resolve().parent / "hardware_profiles"
# The share of DRAM left to the OS and the page cache where a profile assumes what can be pinned: the
# shipped profiles' pinnable_bytes ("leave ~10% of DRAM to the OS and page cache"), what ``hpi probe`` writes
# and what ``hpi check`` warns beyond.
DRAM_OS_SHARE = 0.10

_TOP_KEYS = ("name", "extends", "description", "os", "notes", "gpu", "host", "nvme", "efficiency", "calibrated", "node",
             "cluster")
# What `hpi calibrate` writes in the calibrated: section (hpi.planner.calibrate); only coefficients is applied.
_CALIBRATED_KEYS = ("date", "records", "record_ids", "held_out", "seed", "error_before", "error_after", "unidentified",
                    "coefficients")


# ---- public API ---------------------------------------------------------------------------------------


def profiles_dir() -> Path:
    """``$HPI_PROFILES_DIR`` if set, else the profiles shipped with the package (``hardware_profiles/``)."""
    env = os.environ.get(PROFILES_ENV)
    if not env:
        return _DEFAULT_DIR
    folder = Path(env).expanduser()
    try:
        is_dir = folder.is_dir()
    except OSError as exc:
        raise ProfileError(f"{PROFILES_ENV}={env}: {exc.strerror}: point it at a folder of profile YAMLs or unset "
                           "it") from None
    if not is_dir:
        what = "is a file, not a folder" if folder.exists() else "no such folder"
        raise ProfileError(f"{PROFILES_ENV}={env}: {what}: point it at a folder of profile YAMLs or unset it")
    return folder


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


def profile_from_text(text: str, path: str | Path, *, calibrated: bool = True) -> HardwareProfile:
    """The profile ``text`` would be once written at ``path`` (the profile it extends read from path's folder):
    what a writer checks before it replaces a profile file, so that a file that would not load is never left."""
    path = Path(path).expanduser().absolute()
    raw, where = _read_with_bases(path, seen=(), text=text)
    return _build_profile(raw, path, where, calibrated)


def clear_cache() -> None:
    """Forget loaded profiles (they are otherwise reloaded only when a file's mtime changes)."""
    _load_cached.cache_clear()


# ---- files --------------------------------------------------------------------------------------------


def _resolve(name_or_path: str) -> Path:
    as_path = Path(name_or_path).expanduser()
    looks_like_path = as_path.suffix in (".yaml", ".yml") or "/" in name_or_path or os.sep in name_or_path
    try:
        if looks_like_path:
            if as_path.is_dir():
                raise ProfileError(f"hardware profile file {as_path} is a folder: name a profile YAML")
            if not as_path.is_file():
                raise ProfileError(f"hardware profile file {as_path} does not exist")
            return as_path.resolve()
        folder = profiles_dir()
        for suffix in (".yaml", ".yml"):
            candidate = folder / f"{name_or_path}{suffix}"
            if candidate.is_file():
                return candidate.resolve()
    except OSError as exc:  # a name too long for a path, a folder it may not enter
        raise ProfileError(f"hardware profile {name_or_path!r}: {exc.strerror}") from None
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


def _read_yaml(path: Path, text: str | None = None) -> dict[str, Any]:
    """The file's top-level mapping; ``text``: parse this instead of the file's content (a file about to be
    written)."""
    if text is None:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ProfileError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ProfileError(malformed_yaml(path, exc)) from exc
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a mapping of sections (gpu, host, node ...), got {type(data).__name__}")
    return data


def _read_with_bases(path: Path, seen: tuple[Path, ...], text: str | None = None) -> tuple[dict[str, Any], str]:
    """The file's YAML (or ``text``, as if it were the file's) deep-merged over the profile it ``extends``
    (recursively)."""
    if path in seen:
        chain = " -> ".join(p.name for p in (*seen, path))
        raise ProfileError(f"{path}: extends: cycle {chain}")
    data = _read_yaml(path, text)
    base = data.pop("extends", None)
    if base is None:
        return data, str(path)
    if not isinstance(base, str):
        raise ProfileError(f"{path}: extends: expected a profile name, got {base!r}")
    base_path = next((path.parent / f"{base}{s}" for s in (".yaml", ".yml")
                      if (path.parent / f"{base}{s}").is_file()), None)
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


# ---- the sections -------------------------------------------------------------------------------------


def _build_profile(raw: dict[str, Any], path: Path, where: str, calibrated: bool = True) -> HardwareProfile:
    reader = FieldReader(where)
    reader.only(raw, _TOP_KEYS, "")
    name = reader.text(raw, "name", "", default=path.stem)
    if name != path.stem:
        reader.fail("name", f"{name!r} must equal the file name {path.stem!r} (profiles are looked up by file name)")
    notes = raw.get("notes", [])
    if notes:
        reader.name_list(notes, "notes")
    node, cluster = read_node(reader, raw), read_cluster(reader, raw)
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


def _gpu(reader: FieldReader, raw: Mapping[str, Any], n_gpus: int) -> GpuSpec:
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


def _host(reader: FieldReader, raw: Mapping[str, Any], node: NodeSpec) -> HostSpec:
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


def _nvme(reader: FieldReader, raw: Mapping[str, Any]) -> NvmeSpec | None:
    section = reader.section(raw, "nvme", "", required=False)
    if section is None:
        return None
    reader.only(section, ("devices", "capacity_bytes", "read_bytes_s", "write_bytes_s", "read_grid"), "nvme")
    return NvmeSpec(
        capacity_bytes=reader.quantity(section, "capacity_bytes", "nvme", positive=True),
        read_bytes_s=reader.quantity(section, "read_bytes_s", "nvme", positive=True),
        write_bytes_s=reader.quantity(section, "write_bytes_s", "nvme", positive=True),
        devices=max(1, reader.count(section, "devices", "nvme", default=1)),
        read_grid=_read_grid(reader, section),
    )


def _read_grid(reader: FieldReader, section: Mapping[str, Any]) -> tuple[AioReadPoint, ...]:
    """``nvme.read_grid: {source, note, points: [[request_bytes, in_flight, read_bytes_s], ...]}``, the probe's
    O_DIRECT read rates (``hpi.executor.probe.disk.measure_read_grid``); absent in older profiles: ()."""
    grid = reader.section(section, "read_grid", "nvme", required=False)
    if grid is None:
        return ()
    path = "nvme.read_grid"
    reader.only(grid, ("points", "source", "note"), path)
    source = reader.text(grid, "source", path, choices=PROVENANCE_KINDS)
    note = reader.text(grid, "note", path, default="")
    points = grid.get("points")
    if not isinstance(points, list) or not points:
        reader.fail(f"{path}.points", f"expected a list of [request_bytes, in_flight, read_bytes_s], got {points!r}")
    out = []
    for i, point in enumerate(points):
        numbers = [_positive_number(v) for v in point] if isinstance(point, list) and len(point) == 3 else [None]
        if None in numbers:
            reader.fail(f"{path}.points[{i}]", f"expected [request_bytes, in_flight, read_bytes_s], each a number "
                        f"> 0, got {point!r}")
        out.append(AioReadPoint(*numbers))
    reader.provenance[path] = Provenance(source=source, note=note)
    return tuple(out)


def _positive_number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return float(value) if ok else None


def _efficiency(reader: FieldReader, raw: Mapping[str, Any]) -> Efficiency:
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


def _calibrated(reader: FieldReader, raw: Mapping[str, Any], efficiency: Efficiency) -> Efficiency:
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
            reader.fail(f"{path}.{key}.source", f"{provenance.source!r} in the calibrated section; write source: "
                        "calibrated (or move the value to efficiency:)")
        reader.provenance[f"efficiency.{key}"] = provenance
    return dataclasses.replace(efficiency, **values)
