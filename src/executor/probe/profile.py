"""The hardware profile from the probe's measurement document (``hpi.planner.profiles`` schema), written as
YAML beside the raw document (``NAME.probe.json``).

Every figure is ``source: probed`` with the date and the method in its note, or ``assumed``/``datasheet``
where nothing here can measure it (inter-socket links, NVLink per-link rate, the share of DRAM the OS
keeps). Figures that failed to measure fall back to ``assumed`` values whose note says so, never silently.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from hpi import atomic
from hpi.executor.probe.disk import os_note
from hpi.executor.probe.efficiency import collective_efficiency, kernel_efficiency
from hpi.executor.probe.figures import copy_figure, gbs, q, step_error
from hpi.executor.probe.settings import GIB, MIB
from hpi.executor.probe.tools import GpuTopology, gpu_topology, nvlink_link_bytes_s, nvlinks_per_gpu, parse_topo
from hpi.planner.profiles import DRAM_OS_SHARE

__all__ = ["default_profile_name", "check_profile_name", "build_profile", "write_profile", "write_measurements",
           "measurements_path"]


def default_profile_name(hostname: str) -> str:
    """``probed-<host>`` with only the characters a profile file name keeps."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", hostname.split(".")[0]).strip("-.").lower() or "machine"
    return f"probed-{stem}"


def check_profile_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"hpi probe: profile name {name!r} must be letters, digits, '.', '_' or '-' (it is the "
                         "file name, NAME.yaml)")
    return name


def build_profile(doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The profile dict (``hpi.planner.profiles`` schema) for the measurement document ``doc``.

    Figures that failed to measure fall back to ``assumed`` values whose note says so, never silently.
    """
    date, os_kind = doc["date"], doc["os"]["kind"]
    gpus = doc.get("gpus") or []
    n_gpus = len(gpus)
    notes = [f"written by hpi probe{' --quick' if doc.get('quick') else ''} on {doc.get('hostname', '?')} {date}; "
             "raw measurements in the .probe.json beside this file", os_note(os_kind)]
    notes += list(doc.get("notes") or [])
    profile: dict[str, Any] = {"name": name, "description": _description(doc), "os": os_kind, "notes": notes}
    if n_gpus:
        profile["gpu"] = _gpu_section(doc)
    profile["host"] = _host_section(doc)
    disk = doc.get("disk") or {}
    has_disk = bool(disk.get("read_bytes_s")) and bool(disk.get("write_bytes_s"))
    if has_disk:
        profile["nvme"] = _nvme_section(doc)
    profile["node"] = _node_section(doc, _topology_of(doc), has_disk)
    efficiency = {**kernel_efficiency(doc), **collective_efficiency(doc, profile)}
    if efficiency:
        profile["efficiency"] = efficiency
    return profile


def _description(doc: Mapping[str, Any]) -> str:
    host, gpus = doc["host"], doc.get("gpus") or []
    ram = f"{host['dram_bytes'] / GIB:.0f} GiB RAM"
    cores = f"{host['cpu_cores']} cores"
    where = f"probed {doc['date']} on {doc.get('hostname', '?')}"
    if not gpus:
        return f"CPU only (no GPU found), {cores}, {ram} ({where})"
    links = sorted({c for c in ((doc.get("topo") or {}).get("gpu_codes") or []) if c.startswith("NV")})
    link_words = f", {'/'.join(links)} NVLink" if links else ""
    return f"{len(gpus)}x {gpus[0]['name']}{link_words}, {cores}, {ram} ({where})"


def _gpu_section(doc: Mapping[str, Any]) -> dict[str, Any]:
    date, gpus = doc["date"], doc["gpus"]
    first = gpus[0]
    section: dict[str, Any] = {"name": first["name"]}
    section["memory_bytes"] = q(first["memory_bytes"], "probed", f"{first.get('memory_source', '?')}, {date}"
                                + ("" if len({g['memory_bytes'] for g in gpus}) == 1
                                   else "; GPUs differ, GPU0's figure"))
    matmul = doc.get("matmul") or {}
    n = matmul.get("n", "?")
    others = ", ".join(f"{k} {v / 1e12:.0f}" for k, v in (matmul.get("flops") or {}).items()
                       if k not in ("bf16",) and v)
    bf16 = (matmul.get("flops") or {}).get("bf16")
    if bf16:
        section["bf16_flops"] = q(bf16, "probed", f"bf16 matmul {n}^3 on GPU0, median of {matmul.get('iters')} iters "
                                  f"(torch.mm, CUDA events), {date}"
                                  + (f"; TFLOP/s of the others: {others}" if others else ""))
    else:
        section["bf16_flops"] = q(1.0e14, "assumed", f"bf16 matmul not measured ({step_error(doc, 'matmul')}): a "
                                  "placeholder of 100 TFLOP/s; edit it from the GPU's datasheet")
    int8 = (matmul.get("flops") or {}).get("int8")
    if int8:
        section["int8_flops"] = q(int8, "probed", f"int8 torch._int_mm {n}^3 on GPU0, {date}")
    hbm = (doc.get("hbm") or {}).get("bytes_s")
    if hbm:
        section["hbm_bandwidth_bytes_s"] = q(hbm, "probed", "device-to-device copy of "
                                             f"{doc['hbm']['buffer_bytes'] / GIB:.2g} GiB on GPU0, read+write bytes, "
                                             f"median, {date}")
    else:
        section["hbm_bandwidth_bytes_s"] = q(1.0e12, "assumed", f"HBM copy not measured ({step_error(doc, 'hbm')}): a "
                                            "placeholder of 1 TB/s; edit it from the GPU's datasheet")
    return section


def _host_section(doc: Mapping[str, Any]) -> dict[str, Any]:
    date, host = doc["date"], doc["host"]
    dram = float(host["dram_bytes"])
    section = {
        "dram_bytes": q(dram, "probed", f"{host.get('dram_source', 'psutil')} total, {date} ({dram / GIB:.1f} GiB)"),
        "pinnable_bytes": _pinnable(doc),
        "cpu_cores": q(host["cpu_cores"], "probed", f"os.cpu_count() (logical CPUs); lscpu: {host.get('sockets', 1)} "
                       f"socket(s), {host.get('numa_nodes', 1)} NUMA node(s), {date}"),
    }
    if doc.get("gpus"):
        for key, kind in (("h2d_pageable_bytes_s", "h2d_pageable"), ("d2h_pageable_bytes_s", "d2h_pageable")):
            alone, together = copy_figure(doc, kind), copy_figure(doc, kind, "together")
            if alone:
                section[key] = q(alone, "probed",
                                 f"{_copy_words(doc, kind)}; all GPUs at once {gbs(together)} each, {date}")
            else:
                section[key] = q(8.0e9, "assumed", f"not measured ({step_error(doc, 'copies')}); 6-15 GB/s measured on "
                                 "the 1x H100 and 2x H200 of 2026-11-22 (docs/measured-facts.md)")
    return section


def _copy_words(doc: Mapping[str, Any], kind: str) -> str:
    copies = doc.get("copies") or {}
    direction = "host->device" if kind.startswith("h2d") else "device->host"
    memory = "pinned" if kind.endswith("pinned") else "pageable"
    size = copies.get("buffer_bytes", 0) / MIB
    return (f"{memory} {direction} copy, {size:.0f} MiB, one GPU alone, median of {copies.get('repeats', '?')} repeats "
            f"and of the GPUs")


def _pinnable(doc: Mapping[str, Any]) -> dict[str, Any]:
    """What the profile may pin: the trial proves pinning works; the budget itself is the profiles' assumption."""
    date, host = doc["date"], doc["host"]
    dram = float(host["dram_bytes"])
    trial = host.get("pin_trial") or {}
    memlock = host.get("memlock_soft_bytes")  # None: unlimited or unknown
    limit_words = "unlimited" if memlock is None else f"{memlock / MIB:,.0f} MiB"
    tried = (f"trial pin of {trial.get('bytes', 0) / GIB:.2g} GiB with {trial.get('method', '?')} "
             f"{'succeeded' if trial.get('ok') else 'FAILED: ' + str(trial.get('error'))} "
             f"({trial.get('seconds', 0):.2f} s)")
    budget = dram * (1 - DRAM_OS_SHARE)
    if not trial.get("ok"):
        return q(0.0, "probed", f"{tried}, {date}: nothing can be pinned; RLIMIT_MEMLOCK soft {limit_words}")
    if not doc.get("gpus") and memlock is not None and memlock < budget:
        # without CUDA, pinning is mlock(), which RLIMIT_MEMLOCK bounds
        return q(memlock, "probed", f"RLIMIT_MEMLOCK soft limit bounds mlock; {tried}, {date}")
    return q(budget, "assumed", f"leave ~10% of DRAM to the OS and page cache (as the other profiles); {tried}, "
             f"{date}; RLIMIT_MEMLOCK soft {limit_words} (bounds mlock; CUDA pins through its driver)")


def _nvme_section(doc: Mapping[str, Any]) -> dict[str, Any]:
    date, disk = doc["date"], doc["disk"]
    method = (f"{'O_DIRECT' if disk.get('o_direct') else 'buffered (O_DIRECT refused), page cache dropped'} "
              f"sequential, {disk['file_bytes'] / MIB:,.0f} MiB file in {disk['block_bytes'] / MIB:.0f} MiB blocks at "
              f"{disk['path']} ({disk.get('fs_type') or '?'}), {date}")
    return {
        "devices": 1,
        "capacity_bytes": q(disk["free_bytes"], "probed", f"shutil.disk_usage free at {disk['path']}, {date} "
                            f"(total {disk.get('total_bytes', 0) / 1e9:,.0f} GB)"),
        "read_bytes_s": q(disk["read_bytes_s"], "probed", f"read: {method}"),
        "write_bytes_s": q(disk["write_bytes_s"], "probed", f"write + fsync: {method}"),
        **read_grid_section(disk, date),
    }


def read_grid_section(disk: Mapping[str, Any], date: str) -> dict[str, Any]:
    """``read_grid`` where the probe measured it (disk.measure_read_grid; O_DIRECT only): it prices the aio knobs
    (hpi.planner.cost.aio)."""
    points = disk.get("read_grid")
    if not points:
        return {}
    note = (f"O_DIRECT reads of the {disk['file_bytes'] / MIB:,.0f} MiB probe file at {disk['path']}, one thread per "
            f"request in flight, [request_bytes, in_flight, read_bytes_s]; {date}")
    return {"read_grid": {"source": "probed", "note": note, "points": [list(p) for p in points]}}


def _topology_of(doc: Mapping[str, Any]) -> GpuTopology:
    host, gpus = doc["host"], doc.get("gpus") or []
    text = (doc.get("topo") or {}).get("text")
    topo = None
    if text:
        try:
            topo = parse_topo(text)
        except ValueError:
            topo = None
    return gpu_topology(topo, len(gpus), sockets=max(1, int(host.get("sockets") or 1)),
                      numa_nodes=max(1, int(host.get("numa_nodes") or 1)), gpu_name=gpus[0]["name"] if gpus else "")


_PCIE_LATENCY = {"value": 1.0e-6, "source": "assumed", "note": "order of magnitude of a PCIe hop"}
_NVLINK_LATENCY = {"value": 0.5e-6, "source": "assumed", "note": "one NVLink hop"}


def _node_section(doc: Mapping[str, Any], topology: GpuTopology, has_disk: bool) -> dict[str, Any]:
    date = doc["date"]
    sockets = max(1, int(doc["host"].get("sockets") or 1))
    node: dict[str, Any] = {"gpus": topology.n_gpus, "cpus": sockets}
    if topology.switch_groups:
        node["pcie_switches"] = len(topology.switch_groups)
    if topology.nvswitch_links:
        node["nvswitch"] = True
    if has_disk:
        node["nvme"] = 1
    links: dict[str, Any] = {}
    if topology.n_gpus:
        links.update(_pcie_links(doc, topology))
        links.update(_nvlink_links(doc, topology))
    if sockets > 1:
        links["socket"] = {"kind": "socket",
                           "bandwidth_bytes_s": q(100.0e9, "assumed", "inter-socket link (UPI / xGMI) not measured by "
                                                  "hpi probe; order of magnitude of a modern 2-socket server"),
                           "latency_s": {"value": 0.2e-6, "source": "assumed", "note": "one socket hop"},
                           "pairs": [[f"cpu{i}", f"cpu{i + 1}"] for i in range(sockets - 1)]}
    if has_disk:
        links["disk_host"] = {"kind": "pcie",
                              "bandwidth_bytes_s": q(doc["disk"]["read_bytes_s"], "probed",
                                                     f"the disk's read rate, {date}"),
                              "latency_s": dict(_PCIE_LATENCY), "pairs": [["nvme0", "cpu0"]]}
    if links:
        node["links"] = links
    return node


def _pcie_links(doc: Mapping[str, Any], topology: GpuTopology) -> dict[str, Any]:
    """GPU -> host links at the measured pinned host->device rate; PIX/PXB groups behind a switch uplink."""
    date = doc["date"]
    alone, together = copy_figure(doc, "h2d_pinned"), copy_figure(doc, "h2d_pinned", "together")
    d2h = copy_figure(doc, "d2h_pinned")
    if alone:
        gpu_bw = q(alone, "probed", f"{_copy_words(doc, 'h2d_pinned')}; all GPUs at once {gbs(together)} each; "
                   f"device->host {gbs(d2h)}, {date}")
    else:
        gpu_bw = q(25.0e9, "assumed",
                   f"pinned copies not measured ({step_error(doc, 'copies')}): PCIe Gen4 x16 order of magnitude")
    links: dict[str, Any] = {}
    in_switch = {g: k for k, group in enumerate(topology.switch_groups) for g in group}
    direct = [[f"gpu{g}", f"cpu{topology.gpu_socket[g]}"] for g in range(topology.n_gpus) if g not in in_switch]
    behind = [[f"gpu{g}", f"pcie{in_switch[g]}"] for g in range(topology.n_gpus) if g in in_switch]
    if direct:
        links["gpu_host"] = {"kind": "pcie", "bandwidth_bytes_s": gpu_bw, "latency_s": dict(_PCIE_LATENCY),
                             "pairs": direct}
    if behind:
        links["gpu_switch"] = {"kind": "pcie", "bandwidth_bytes_s": dict(gpu_bw), "latency_s": dict(_PCIE_LATENCY),
                               "pairs": behind}
    per_gpu_together = ((doc.get("copies") or {}).get("h2d_pinned") or {}).get("together") or []
    for k, group in enumerate(topology.switch_groups):
        shares = [per_gpu_together[g] for g in group if g < len(per_gpu_together) and per_gpu_together[g]]
        if len(shares) == len(group):
            uplink = q(sum(shares), "probed", f"GPUs {', '.join(map(str, group))} (PIX/PXB in nvidia-smi topo -m) "
                       f"copying host->device pinned at once: {' + '.join(f'{s / 1e9:.1f}' for s in shares)} GB/s, "
                       f"{date}")
        else:
            uplink = q(gpu_bw["value"], "assumed",
                       "switch uplink as fast as one GPU's link (together copies not measured)")
        links[f"pcie{k}_uplink"] = {"kind": "pcie", "bandwidth_bytes_s": uplink, "latency_s": dict(_PCIE_LATENCY),
                                    "pairs": [[f"pcie{k}", f"cpu{topology.gpu_socket[group[0]]}"]]}
    return links


def _nvlink_links(doc: Mapping[str, Any], topology: GpuTopology) -> dict[str, Any]:
    name = doc["gpus"][0]["name"]
    per_link = nvlink_link_bytes_s(name)
    words = (f"{per_link / 1e9:.0f} GB/s per link per direction (NVLink{'5' if per_link > 30e9 else '2-4'} datasheet) "
             f"x the NV# count of nvidia-smi topo -m, probed {doc['date']}")
    if topology.nvswitch_links:
        n = topology.nvswitch_links
        return {"nvlink": {"kind": "nvlink",
                           "bandwidth_bytes_s": q(n * per_link, "datasheet",
                                                  f"NV{n} between every pair of {topology.n_gpus} GPUs is more links "
                                                  f"than a GPU has ({nvlinks_per_gpu(name)}): an NVSwitch system, each "
                                                  f"GPU {n} links into it; {words}"),
                           "latency_s": dict(_NVLINK_LATENCY),
                           "pairs": [[f"gpu{g}", "nvswitch"] for g in range(topology.n_gpus)]}}
    groups: dict[int, list[list[str]]] = {}
    for i, j, n in topology.nvlink_pairs:
        groups.setdefault(n, []).append([f"gpu{i}", f"gpu{j}"])
    return {f"nv{n}": {"kind": "nvlink", "bandwidth_bytes_s": q(n * per_link, "datasheet", f"NV{n}: {words}"),
                       "latency_s": dict(_NVLINK_LATENCY), "pairs": pairs} for n, pairs in sorted(groups.items())}


def write_profile(profile: Mapping[str, Any], path: Path, header: str = "") -> None:
    """Write the YAML (a comment header, then the sections in schema order) atomically."""
    text = ("".join(f"# {line}\n" for line in header.splitlines())
            + yaml.safe_dump(dict(profile), sort_keys=False, width=200))
    atomic.write_text(path, text)


def measurements_path(profile_path: Path) -> Path:
    """``NAME.probe.json`` beside ``NAME.yaml``: the raw document every figure of the profile traces back to."""
    return profile_path.with_name(f"{profile_path.stem}.probe.json")


def write_measurements(doc: Mapping[str, Any], path: Path) -> None:
    """The measurement document ``run_probe`` returned, as JSON (every repeat's median, every size and group)."""
    atomic.write_json(path, doc, newline=True)
