"""``hpi probe``: measure this machine and write a hardware profile (``hpi.planner.profiles`` schema).

    doc = run_probe(ProbeSettings.full(), nvme_path="/mnt/nvme", progress=...)   # the raw measurements
    profile = build_profile(doc, name="my-box")                                  # a profile dict
    write_profile(profile, Path("hardware_profiles/my-box.yaml"))

Two layers, as everywhere in hpi:

- pure helpers (``parse_topo``, ``gpu_layout``, ``parse_lscpu``, ``detect_os``, ``classify_path``,
  ``build_profile`` ...): text and numbers in, data out; unit-tested on CPU with fixtures;
- measurements (``measure_*``, ``run_probe``): torch, subprocesses, files. torch is imported inside them
  only, so importing this module stays cheap and ``hpi probe`` works on a machine without torch or GPU.

Every figure in the written profile is ``source: probed`` with the date and the method in its note, or
``assumed``/``datasheet`` where nothing here can measure it (inter-socket links, NVLink per-link rate,
the share of DRAM the OS keeps). The raw document (``NAME.probe.json``) keeps every repeat's median, the
alone and together copy figures, every all-reduce size and group size, so a number can be traced.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as _dt
import json
import math
import mmap
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import yaml

__all__ = [
    "PROBE_VERSION",
    "ProbeSettings",
    "TopoMatrix",
    "GpuLayout",
    "parse_topo",
    "gpu_layout",
    "nvlink_link_bytes_s",
    "parse_lscpu",
    "parse_smi_query",
    "detect_os",
    "mount_fs_type",
    "classify_path",
    "PathAdvice",
    "default_profile_name",
    "build_profile",
    "write_profile",
    "run_probe",
    "measure_disk",
]

PROBE_VERSION = 1
GIB = 1 << 30
MIB = 1 << 20

# NVLink: bytes/s per link per direction. NVLink2/3/4 (V100/A100/H100/H200) are 25 GB/s per link per
# direction (H100: 18 links = 900 GB/s bidirectional; A100: 12 links = 600 GB/s); NVLink5 (Blackwell)
# doubles it (18 links = 1.8 TB/s). Source: NVIDIA NVLink product page / GPU datasheets.
_NVLINK_PER_LINK_BYTES_S = 25.0e9
_NVLINK5_PER_LINK_BYTES_S = 50.0e9
_NVLINK5_NAMES = ("B100", "B200", "B300", "GB200", "GB300")
# Links per GPU: a clique of NV# among n GPUs needs #*(n-1) links per GPU; more than the GPU has means the
# links go into NVSwitch chips (HGX/DGX baseboards), not to the peers directly.
_NVLINKS_PER_GPU = (("V100", 6), ("A100", 12), ("A800", 8), ("H800", 8))
_NVLINKS_PER_GPU_DEFAULT = 18  # H100/H200/B200
_DRAM_OS_SHARE = 0.10  # as the shipped profiles assume: leave ~10% of DRAM to the OS and page cache
_SHARED_PCIE_RATIO = 0.80  # together / alone below this: GPUs share an upstream PCIe link


# ---- settings -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeSettings:
    """How hard to measure. ``full()`` aims at < 120 s on a 4-GPU machine; ``small()`` (--quick) at seconds on CPU."""

    quick: bool
    copy_bytes: int  # host<->device buffer per GPU
    copy_repeats: int
    matmul_n: int  # n of the n^3 matmul
    matmul_iters: int
    hbm_bytes: int  # device-to-device copy buffer
    nccl_sizes_bytes: tuple[int, ...]
    nccl_iters: int
    nccl_timeout_s: float
    disk_file_bytes: int
    disk_block_bytes: int
    pin_trial_bytes: int  # upper bound of the trial pin (also bounded by 10% of DRAM)
    gemv_shape: tuple[int, int] = (28672, 8192)  # a 70B MLP projection, 470 MB in bf16 (rows, columns)
    # Real decoder layers timed in graphed decode (measure_decoder_layers): each model's shape built with each
    # layer count; two shapes of different bytes separate a layer's fixed device time from its read rate.
    layer_models: tuple[str, ...] = ("llama-3-8b", "llama-3-70b")
    layer_counts: tuple[int, int] = (2, 6)
    layer_prompt_len: int = 128
    layer_gen_len: int = 32
    layer_reps: int = 3

    @classmethod
    def full(cls) -> "ProbeSettings":
        return cls(quick=False, copy_bytes=GIB, copy_repeats=5, matmul_n=8192, matmul_iters=20, hbm_bytes=GIB,
                   nccl_sizes_bytes=(8 << 10, 1 << 20, 16 << 20, 256 << 20), nccl_iters=20, nccl_timeout_s=150.0,
                   disk_file_bytes=2 * GIB, disk_block_bytes=4 * MIB, pin_trial_bytes=8 * GIB)

    @classmethod
    def small(cls) -> "ProbeSettings":
        return cls(quick=True, copy_bytes=64 * MIB, copy_repeats=2, matmul_n=2048, matmul_iters=3, hbm_bytes=64 * MIB,
                   nccl_sizes_bytes=(8 << 10, 1 << 20), nccl_iters=5, nccl_timeout_s=90.0,
                   disk_file_bytes=16 * MIB, disk_block_bytes=1 * MIB, pin_trial_bytes=64 * MIB,
                   gemv_shape=(4096, 4096), layer_models=("llama-3-8b",), layer_counts=(1, 3), layer_gen_len=16,
                   layer_reps=1)


# ---- pure: nvidia-smi topo -m ---------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CELL_SPLIT = re.compile(r"\t|\s{2,}")  # tab-separated; some versions pad with spaces instead
_DEVICE = re.compile(r"^(GPU|NIC|NVSWITCH|mlx\S*)\d*$", re.IGNORECASE)
_LINK_CODES = ("X", "SYS", "NODE", "PHB", "PXB", "PIX")  # plus NV#


@dataclass(frozen=True)
class TopoMatrix:
    """``nvidia-smi topo -m`` as data: device names, the code of each pair, and the affinity columns."""

    devices: tuple[str, ...]  # GPU0.., NIC0.. in column order
    codes: Mapping[tuple[str, str], str]  # (row, column) -> "NV18" | "PIX" | "PXB" | "PHB" | "NODE" | "SYS" | "X"
    affinity: Mapping[str, Mapping[str, str]]  # device -> {"CPU Affinity": "0-31", "NUMA Affinity": "0", ...}

    @property
    def gpus(self) -> tuple[str, ...]:
        return tuple(d for d in self.devices if d.upper().startswith("GPU"))

    def code(self, a: str, b: str) -> str:
        return self.codes.get((a, b)) or self.codes.get((b, a)) or ""

    def numa_node(self, device: str) -> int | None:
        value = self.affinity.get(device, {}).get("NUMA Affinity", "")
        match = re.match(r"^(\d+)", value)
        return int(match.group(1)) if match else None


def _cells(line: str) -> list[str]:
    return [c.strip() for c in _CELL_SPLIT.split(_ANSI.sub("", line)) if c.strip()]


def parse_topo(text: str) -> TopoMatrix:
    """Parse ``nvidia-smi topo -m``; raises ValueError naming the line it cannot read."""
    lines = [_ANSI.sub("", line) for line in text.splitlines()]
    # the header names GPU0 and has no "X" cell (every device row has one, on its diagonal)
    header_at = next((i for i, line in enumerate(lines) if "GPU0" in _cells(line) and "X" not in _cells(line)), None)
    if header_at is None:
        raise ValueError("nvidia-smi topo -m: no header line with GPU0 found")
    header = _cells(lines[header_at])
    devices = tuple(h for h in header if _DEVICE.match(h))
    extra = [h for h in header if not _DEVICE.match(h)]  # CPU Affinity, NUMA Affinity, GPU NUMA ID
    codes: dict[tuple[str, str], str] = {}
    affinity: dict[str, dict[str, str]] = {}
    for line in lines[header_at + 1:]:
        cells = _cells(line)
        if not cells or cells[0] not in devices:
            if cells and cells[0].rstrip(":").lower() == "legend":
                break
            continue
        name, links, rest = cells[0], cells[1:1 + len(devices)], cells[1 + len(devices):]
        if len(links) != len(devices):
            raise ValueError(f"nvidia-smi topo -m: row {name} has {len(links)} link cells for {len(devices)} devices: {line!r}")
        for column, code in zip(devices, links):
            if code not in _LINK_CODES and not re.fullmatch(r"NV\d+", code):
                raise ValueError(f"nvidia-smi topo -m: row {name}, column {column}: unknown link code {code!r}")
            codes[(name, column)] = code
        affinity[name] = dict(zip(extra, rest))
    if not any(d.upper().startswith("GPU") for d in affinity):
        raise ValueError("nvidia-smi topo -m: no GPU rows found")
    return TopoMatrix(devices=devices, codes=codes, affinity=affinity)


def nvlink_count(code: str) -> int:
    """NV18 -> 18 (bonded NVLinks between the pair); anything else 0."""
    match = re.fullmatch(r"NV(\d+)", code)
    return int(match.group(1)) if match else 0


def nvlink_link_bytes_s(gpu_name: str) -> float:
    """Bytes/s per NVLink per direction for this GPU's NVLink generation (see _NVLINK_PER_LINK_BYTES_S)."""
    upper = gpu_name.upper()
    return _NVLINK5_PER_LINK_BYTES_S if any(n in upper for n in _NVLINK5_NAMES) else _NVLINK_PER_LINK_BYTES_S


def nvlinks_per_gpu(gpu_name: str) -> int:
    upper = gpu_name.upper()
    return next((n for key, n in _NVLINKS_PER_GPU if key in upper), _NVLINKS_PER_GPU_DEFAULT)


@dataclass(frozen=True)
class GpuLayout:
    """How the GPUs of one node hang together, read from the topology matrix."""

    n_gpus: int
    gpu_socket: tuple[int, ...]  # home CPU socket of each GPU
    switch_groups: tuple[tuple[int, ...], ...]  # GPUs behind one PCIe switch (PIX/PXB), groups of >= 2
    nvlink_pairs: tuple[tuple[int, int, int], ...]  # (i, j, links) for direct NVLink pairs, i < j
    nvswitch_links: int = 0  # > 0: every GPU reaches an NVSwitch with this many links (then nvlink_pairs is empty)

    @property
    def has_nvlink(self) -> bool:
        return bool(self.nvlink_pairs) or self.nvswitch_links > 0


def numa_to_socket(numa: int | None, numa_nodes: int, sockets: int) -> int:
    """NUMA node -> socket, assuming nodes split evenly over sockets (NPS1/2/4, SNC): node * sockets // nodes."""
    if numa is None or sockets <= 1:
        return 0
    return min(sockets - 1, numa * sockets // max(numa_nodes, sockets))


def gpu_layout(topo: TopoMatrix | None, n_gpus: int, *, sockets: int = 1, numa_nodes: int = 1,
               gpu_name: str = "") -> GpuLayout:
    """Sockets, PCIe switch groups and NVLink pairs (or one NVSwitch) of ``n_gpus`` GPUs.

    Without a matrix (no nvidia-smi) or one that disagrees with ``n_gpus``: every GPU alone on socket 0.
    """
    gpus = [f"GPU{i}" for i in range(n_gpus)]
    if topo is None or tuple(topo.gpus) != tuple(gpus):
        return GpuLayout(n_gpus=n_gpus, gpu_socket=(0,) * n_gpus, switch_groups=(), nvlink_pairs=())
    sockets_of = tuple(numa_to_socket(topo.numa_node(g), numa_nodes, sockets) for g in gpus)
    # PIX (one switch) / PXB (several switches, no host bridge): the GPUs share a switch's uplink
    parent = list(range(n_gpus))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    pairs = [(i, j) for i in range(n_gpus) for j in range(i + 1, n_gpus)]
    for i, j in pairs:
        if topo.code(gpus[i], gpus[j]) in ("PIX", "PXB"):
            parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(n_gpus):
        groups.setdefault(root(i), []).append(i)
    switch_groups = tuple(tuple(g) for g in groups.values() if len(g) > 1)
    links = {(i, j): nvlink_count(topo.code(gpus[i], gpus[j])) for i, j in pairs}
    counts = set(links.values())
    clique = n_gpus >= 3 and len(counts) == 1 and min(counts) > 0
    if clique and min(counts) * (n_gpus - 1) > nvlinks_per_gpu(gpu_name):
        # e.g. NV18 among 4 H200: 18 * 3 = 54 links > 18 per GPU: the links go to NVSwitch chips
        return GpuLayout(n_gpus, sockets_of, switch_groups, (), nvswitch_links=min(counts))
    nvlink_pairs = tuple((i, j, n) for (i, j), n in links.items() if n > 0)
    return GpuLayout(n_gpus, sockets_of, switch_groups, nvlink_pairs)


# ---- pure: host facts ---------------------------------------------------------------------------------


def parse_lscpu(text: str) -> dict[str, int]:
    """``lscpu`` -> {"cpus", "sockets", "numa_nodes", "cores_per_socket", "threads_per_core"} (those present)."""
    keys = {"CPU(s)": "cpus", "Socket(s)": "sockets", "NUMA node(s)": "numa_nodes",
            "Core(s) per socket": "cores_per_socket", "Thread(s) per core": "threads_per_core"}
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys and value.strip().isdigit():
            out[keys[key.strip()]] = int(value.strip())
    return out


def parse_smi_query(text: str) -> list[dict[str, Any]]:
    """``nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader,nounits``."""
    gpus = []
    for line in text.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 3 or not cells[0].isdigit():
            continue
        try:
            memory = float(cells[2]) * MIB  # MiB with nounits
        except ValueError:
            continue
        gpus.append({"index": int(cells[0]), "name": cells[1], "memory_bytes": memory,
                     "driver_version": cells[3] if len(cells) > 3 else None})
    return gpus


def parse_meminfo_total(text: str) -> float | None:
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    return float(match.group(1)) * 1024 if match else None


# ---- pure: OS and path conventions ----------------------------------------------------------------------


def detect_os(system: str, proc_version: str = "") -> str:
    """``platform.system()`` and ``/proc/version`` -> one of planner OS_KINDS (linux, windows, wsl2).

    WSL2's kernel says "microsoft" in /proc/version (e.g. ``...-microsoft-standard-WSL2``). Other POSIX
    systems (macOS) are reported as linux: the same path and O_DIRECT conventions are the closest fit.
    """
    if system.lower().startswith(("windows", "cygwin", "msys")):
        return "windows"
    if "microsoft" in proc_version.lower():
        return "wsl2"
    return "linux"


def mount_fs_type(path: str, mounts_text: str) -> str | None:
    """The filesystem type of the longest mount point containing ``path`` (``/proc/mounts`` text)."""
    best, fs = "", None
    target = os.path.abspath(path)
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/") or point == "/"
        if inside and len(point) >= len(best):
            best, fs = point, parts[2]
    return fs


@dataclass(frozen=True)
class PathAdvice:
    """What an offload directory is and whether it suits NVMe offload."""

    kind: str  # "local" | "tmpfs" | "wsl2-windows-drive" | "windows-drive" | "unc" | "network"
    ok_for_nvme_offload: bool
    message: str  # one line: what it is and what to do


_NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p", "drvfs", "v9fs", "fuse.s3fs", "lustre")


def classify_path(path: str, os_kind: str, fs_type: str | None = None) -> PathAdvice:
    """Offload-directory conventions per OS (design: CPU offload on native Windows, WSL2 ext4 for NVMe)."""
    if re.match(r"^(\\\\|//)[^\\/]+[\\/]", path):
        return PathAdvice("unc", False, f"{path} is a network share (UNC): far too slow for offload; use a local "
                          "NVMe drive")
    if os_kind == "windows":
        return PathAdvice("windows-drive", False, f"{path}: native Windows has no libaio, so DeepSpeed NVMe offload "
                          "does not run; use --offload cpu, or run under WSL2 with the offload dir on the distro's ext4")
    if os_kind == "wsl2" and (re.match(r"^/mnt/[a-zA-Z](/|$)", path) or fs_type in ("9p", "drvfs", "v9fs")):
        return PathAdvice("wsl2-windows-drive", False, f"{path} is a Windows drive seen through WSL2's 9p bridge "
                          "(a few hundred MB/s at best); put the offload dir on the distro's ext4, e.g. ~/hpi-offload")
    if fs_type in ("tmpfs", "ramfs"):
        return PathAdvice("tmpfs", False, f"{path} is on {fs_type}: that is RAM, not disk, and O_DIRECT fails "
                          "there; point --nvme-path at an NVMe filesystem")
    if fs_type in _NETWORK_FS:
        return PathAdvice("network", False, f"{path} is on {fs_type} (network/bridged): too slow for offload; use "
                          "a local NVMe filesystem")
    return PathAdvice("local", True, f"{path} is a local {fs_type or 'filesystem'}")


def os_note(os_kind: str) -> str:
    return {
        "linux": "Linux: NVMe offload needs libaio (apt install libaio-dev, or carry libaio1) and a local ext4/xfs dir",
        "wsl2": "WSL2: keep offload dirs on the distro's ext4 (not /mnt/c, the 9p Windows drive); CUDA passes through",
        "windows": "native Windows: no libaio, so no DeepSpeed NVMe offload: plan --offload cpu, or use WSL2 for NVMe",
    }[os_kind]


def default_profile_name(hostname: str) -> str:
    """``probed-<host>`` with only the characters a profile file name keeps."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", hostname.split(".")[0]).strip("-.").lower() or "machine"
    return f"probed-{stem}"


def check_profile_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"hpi probe: profile name {name!r} must be letters, digits, '.', '_' or '-' (it is the "
                         "file name, NAME.yaml)")
    return name


# ---- pure: the profile from the measurements ---------------------------------------------------------------


def q(value: float, source: str, note: str) -> dict[str, Any]:
    """A quantity with provenance, as every profile number must be; measured rates keep 4 significant digits."""
    value = float(value)
    return {"value": value if value.is_integer() else float(f"{value:.4g}"), "source": source, "note": note}


def _median(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return statistics.median(values) if values else None


def _gbs(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 1e9:.1f} GB/s"


def _copy_figure(doc: Mapping[str, Any], kind: str, when: str = "alone") -> float | None:
    """Median over GPUs of one host<->device figure: kind h2d_pinned|d2h_pinned|h2d_pageable|d2h_pageable."""
    per_gpu = ((doc.get("copies") or {}).get(kind) or {}).get(when) or []
    return _median(per_gpu)


def build_profile(doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The profile dict (``hpi.planner.profiles`` schema) for the measurement document ``doc``.

    Figures that failed to measure fall back to ``assumed`` values whose note says so, never silently.
    """
    date, host, os_kind = doc["date"], doc["host"], doc["os"]["kind"]
    gpus = doc.get("gpus") or []
    n_gpus = len(gpus)
    sockets = max(1, int(host.get("sockets") or 1))
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
    profile["node"] = _node_section(doc, _layout_of(doc), has_disk)
    efficiency = {**_kernel_efficiency(doc), **_efficiency_section(doc, profile)}
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
                                + ("" if len({g['memory_bytes'] for g in gpus}) == 1 else "; GPUs differ, GPU0's figure"))
    matmul = doc.get("matmul") or {}
    n = matmul.get("n", "?")
    others = ", ".join(f"{k} {v / 1e12:.0f}" for k, v in (matmul.get("flops") or {}).items() if k not in ("bf16",) and v)
    bf16 = (matmul.get("flops") or {}).get("bf16")
    if bf16:
        section["bf16_flops"] = q(bf16, "probed", f"bf16 matmul {n}^3 on GPU0, median of {matmul.get('iters')} iters "
                                  f"(torch.mm, CUDA events), {date}" + (f"; TFLOP/s of the others: {others}" if others else ""))
    else:
        section["bf16_flops"] = q(1.0e14, "assumed", f"bf16 matmul not measured ({_error(doc, 'matmul')}): a "
                                  "placeholder of 100 TFLOP/s; edit it from the GPU's datasheet")
    int8 = (matmul.get("flops") or {}).get("int8")
    if int8:
        section["int8_flops"] = q(int8, "probed", f"int8 torch._int_mm {n}^3 on GPU0, {date}")
    hbm = (doc.get("hbm") or {}).get("bytes_s")
    if hbm:
        section["hbm_bandwidth_bytes_s"] = q(hbm, "probed", f"device-to-device copy of {doc['hbm']['buffer_bytes'] / GIB:.2g} "
                                            f"GiB on GPU0, read+write bytes, median, {date}")
    else:
        section["hbm_bandwidth_bytes_s"] = q(1.0e12, "assumed", f"HBM copy not measured ({_error(doc, 'hbm')}): a "
                                            "placeholder of 1 TB/s; edit it from the GPU's datasheet")
    return section


def _error(doc: Mapping[str, Any], step: str) -> str:
    return (doc.get("errors") or {}).get(step, "skipped")


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
            alone, together = _copy_figure(doc, kind), _copy_figure(doc, kind, "together")
            if alone:
                section[key] = q(alone, "probed", f"{_copy_words(doc, kind)}; all GPUs at once {_gbs(together)} each, {date}")
            else:
                section[key] = q(8.0e9, "assumed", f"not measured ({_error(doc, 'copies')}); 6-15 GB/s measured on "
                                 "other machines (design.md)")
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
             f"{'succeeded' if trial.get('ok') else 'FAILED: ' + str(trial.get('error'))} ({trial.get('seconds', 0):.2f} s)")
    budget = dram * (1 - _DRAM_OS_SHARE)
    if not trial.get("ok"):
        return q(0.0, "probed", f"{tried}, {date}: nothing can be pinned; RLIMIT_MEMLOCK soft {limit_words}")
    if not doc.get("gpus") and memlock is not None and memlock < budget:
        # without CUDA, pinning is mlock(), which RLIMIT_MEMLOCK bounds
        return q(memlock, "probed", f"RLIMIT_MEMLOCK soft limit bounds mlock; {tried}, {date}")
    return q(budget, "assumed", f"leave ~10% of DRAM to the OS and page cache (as the other profiles); {tried}, {date}; "
             f"RLIMIT_MEMLOCK soft {limit_words} (bounds mlock; CUDA pins through its driver)")


def _nvme_section(doc: Mapping[str, Any]) -> dict[str, Any]:
    date, disk = doc["date"], doc["disk"]
    method = (f"{'O_DIRECT' if disk.get('o_direct') else 'buffered (O_DIRECT refused), page cache dropped'} sequential, "
              f"{disk['file_bytes'] / MIB:,.0f} MiB file in {disk['block_bytes'] / MIB:.0f} MiB blocks at {disk['path']} "
              f"({disk.get('fs_type') or '?'}), {date}")
    return {
        "devices": 1,
        "capacity_bytes": q(disk["free_bytes"], "probed", f"shutil.disk_usage free at {disk['path']}, {date} "
                            f"(total {disk.get('total_bytes', 0) / 1e9:,.0f} GB)"),
        "read_bytes_s": q(disk["read_bytes_s"], "probed", f"read: {method}"),
        "write_bytes_s": q(disk["write_bytes_s"], "probed", f"write + fsync: {method}"),
    }


def _layout_of(doc: Mapping[str, Any]) -> GpuLayout:
    host, gpus = doc["host"], doc.get("gpus") or []
    text = (doc.get("topo") or {}).get("text")
    topo = None
    if text:
        try:
            topo = parse_topo(text)
        except ValueError:
            topo = None
    return gpu_layout(topo, len(gpus), sockets=max(1, int(host.get("sockets") or 1)),
                      numa_nodes=max(1, int(host.get("numa_nodes") or 1)), gpu_name=gpus[0]["name"] if gpus else "")


_PCIE_LATENCY = {"value": 1.0e-6, "source": "assumed", "note": "order of magnitude of a PCIe hop"}
_NVLINK_LATENCY = {"value": 0.5e-6, "source": "assumed", "note": "one NVLink hop"}


def _node_section(doc: Mapping[str, Any], layout: GpuLayout, has_disk: bool) -> dict[str, Any]:
    date = doc["date"]
    sockets = max(1, int(doc["host"].get("sockets") or 1))
    node: dict[str, Any] = {"gpus": layout.n_gpus, "cpus": sockets}
    if layout.switch_groups:
        node["pcie_switches"] = len(layout.switch_groups)
    if layout.nvswitch_links:
        node["nvswitch"] = True
    if has_disk:
        node["nvme"] = 1
    links: dict[str, Any] = {}
    if layout.n_gpus:
        links.update(_pcie_links(doc, layout))
        links.update(_nvlink_links(doc, layout))
    if sockets > 1:
        links["socket"] = {"kind": "socket",
                           "bandwidth_bytes_s": q(100.0e9, "assumed", "inter-socket link (UPI / xGMI) not measured by "
                                                  "hpi probe; order of magnitude of a modern 2-socket server"),
                           "latency_s": {"value": 0.2e-6, "source": "assumed", "note": "one socket hop"},
                           "pairs": [[f"cpu{i}", f"cpu{i + 1}"] for i in range(sockets - 1)]}
    if has_disk:
        links["disk_host"] = {"kind": "pcie",
                              "bandwidth_bytes_s": q(doc["disk"]["read_bytes_s"], "probed", f"the disk's read rate, {date}"),
                              "latency_s": dict(_PCIE_LATENCY), "pairs": [["nvme0", "cpu0"]]}
    if links:
        node["links"] = links
    return node


def _pcie_links(doc: Mapping[str, Any], layout: GpuLayout) -> dict[str, Any]:
    """GPU -> host links at the measured pinned host->device rate; PIX/PXB groups behind a switch uplink."""
    date = doc["date"]
    alone, together = _copy_figure(doc, "h2d_pinned"), _copy_figure(doc, "h2d_pinned", "together")
    d2h = _copy_figure(doc, "d2h_pinned")
    if alone:
        gpu_bw = q(alone, "probed", f"{_copy_words(doc, 'h2d_pinned')}; all GPUs at once {_gbs(together)} each; "
                   f"device->host {_gbs(d2h)}, {date}")
    else:
        gpu_bw = q(25.0e9, "assumed", f"pinned copies not measured ({_error(doc, 'copies')}): PCIe Gen4 x16 order of magnitude")
    links: dict[str, Any] = {}
    in_switch = {g: k for k, group in enumerate(layout.switch_groups) for g in group}
    direct = [[f"gpu{g}", f"cpu{layout.gpu_socket[g]}"] for g in range(layout.n_gpus) if g not in in_switch]
    behind = [[f"gpu{g}", f"pcie{in_switch[g]}"] for g in range(layout.n_gpus) if g in in_switch]
    if direct:
        links["gpu_host"] = {"kind": "pcie", "bandwidth_bytes_s": gpu_bw, "latency_s": dict(_PCIE_LATENCY), "pairs": direct}
    if behind:
        links["gpu_switch"] = {"kind": "pcie", "bandwidth_bytes_s": dict(gpu_bw), "latency_s": dict(_PCIE_LATENCY),
                               "pairs": behind}
    per_gpu_together = ((doc.get("copies") or {}).get("h2d_pinned") or {}).get("together") or []
    for k, group in enumerate(layout.switch_groups):
        shares = [per_gpu_together[g] for g in group if g < len(per_gpu_together) and per_gpu_together[g]]
        if len(shares) == len(group):
            uplink = q(sum(shares), "probed", f"GPUs {', '.join(map(str, group))} (PIX/PXB in nvidia-smi topo -m) copying "
                       f"host->device pinned at once: {' + '.join(f'{s / 1e9:.1f}' for s in shares)} GB/s, {date}")
        else:
            uplink = q(gpu_bw["value"], "assumed", "switch uplink as fast as one GPU's link (together copies not measured)")
        links[f"pcie{k}_uplink"] = {"kind": "pcie", "bandwidth_bytes_s": uplink, "latency_s": dict(_PCIE_LATENCY),
                                    "pairs": [[f"pcie{k}", f"cpu{layout.gpu_socket[group[0]]}"]]}
    return links


def _nvlink_links(doc: Mapping[str, Any], layout: GpuLayout) -> dict[str, Any]:
    name = doc["gpus"][0]["name"]
    per_link = nvlink_link_bytes_s(name)
    words = (f"{per_link / 1e9:.0f} GB/s per link per direction (NVLink{'5' if per_link > 30e9 else '2-4'} datasheet) "
             f"x the NV# count of nvidia-smi topo -m, probed {doc['date']}")
    if layout.nvswitch_links:
        n = layout.nvswitch_links
        return {"nvlink": {"kind": "nvlink",
                           "bandwidth_bytes_s": q(n * per_link, "datasheet", f"NV{n} between every pair of {layout.n_gpus} "
                                                  f"GPUs is more links than a GPU has ({nvlinks_per_gpu(name)}): an NVSwitch "
                                                  f"system, each GPU {n} links into it; {words}"),
                           "latency_s": dict(_NVLINK_LATENCY),
                           "pairs": [[f"gpu{g}", "nvswitch"] for g in range(layout.n_gpus)]}}
    groups: dict[int, list[list[str]]] = {}
    for i, j, n in layout.nvlink_pairs:
        groups.setdefault(n, []).append([f"gpu{i}", f"gpu{j}"])
    return {f"nv{n}": {"kind": "nvlink", "bandwidth_bytes_s": q(n * per_link, "datasheet", f"NV{n}: {words}"),
                       "latency_s": dict(_NVLINK_LATENCY), "pairs": pairs} for n, pairs in sorted(groups.items())}


@dataclass(frozen=True)
class LayerFit:
    """A decoder layer's graphed decode time as the cost model prices it: ``fixed_s + bytes / read_bytes_s``
    (``cost.overhead.layer_device_time`` plus the roofline of ``cost.compute`` at ``hbm`` of the ceiling)."""

    fixed_s: float
    read_bytes_s: float
    how: str  # "fit": a line through the shapes; "ceiling": the fitted rate beat the copy ceiling, held there;
    #           "given": one shape (or a line with no physical reading), the rate given, the fixed time its residual


def fit_layer_cost(points: Sequence[tuple[float, float]], ceiling_bytes_s: float,
                   given_bytes_s: float | None = None) -> LayerFit:
    """``fixed_s`` and ``read_bytes_s`` of ``seconds = fixed_s + bytes / read_bytes_s`` through (bytes, seconds)
    of real layers: least squares where the points have two sizes or more. A rate above the ceiling (the
    profile's HBM copy rate, which ``hbm`` is a fraction of) is held at the ceiling, and so is a rate given;
    with the rate held, the fixed time is the mean residual (at least 0)."""
    if not points:
        raise ValueError("fit_layer_cost: no (bytes, seconds) point")
    b = np.array([p[0] for p in points], dtype=float)
    t = np.array([p[1] for p in points], dtype=float)

    def held(rate: float, how: str) -> LayerFit:
        return LayerFit(max(0.0, float(np.mean(t - b / rate))), rate, how)

    if len(set(b.tolist())) >= 2:
        slope, intercept = np.polyfit(b, t, 1)
        if slope > 0 and intercept >= 0:
            rate = 1.0 / slope
            return LayerFit(float(intercept), float(rate), "fit") if rate <= ceiling_bytes_s else held(ceiling_bytes_s, "ceiling")
    return held(min(given_bytes_s or ceiling_bytes_s, ceiling_bytes_s), "given")


def _layer_figures(layers: Mapping[str, Any], copy: float, gemv_bytes_s: float | None, date: str) -> dict[str, Any]:
    """hbm, layer_device_overhead_s and graphed_step_overhead_s from real decoder layers timed in graphed decode."""
    shapes = layers["shapes"]
    fit = fit_layer_cost([(s["layer_bytes"], s["layer_s"]) for s in shapes], copy, gemv_bytes_s)
    lo = min(layers["counts"])
    # What a step costs beyond its layers and the LM head's read: the graph's launch, the host's sampling,
    # input copies and the synchronization after each forward (cost.overhead.step_overhead_time). An eager
    # step also launches the embedding, norm and head: step_overhead_s stays the prior's for that.
    step = float(np.median([s["step_s"][str(lo)] - lo * s["layer_s"] - s["head_bytes"] / fit.read_bytes_s for s in shapes]))
    timed = "; ".join(f"{s['model']} {s['layer_s'] * 1e6:.0f} us for {s['layer_bytes'] / 1e6:,.0f} MB" for s in shapes)
    how = {"fit": "a line through", "ceiling": "the rate held at the copy ceiling (the line's was faster) over",
           "given": f"the {'GEMV' if gemv_bytes_s else 'copy'}'s read rate over"}[fit.how]
    where = (f"real decoder layers in graphed decode at batch 1 ({layers['counts'][0]} and {layers['counts'][1]} "
             f"layers, difference per layer): {timed}; {how} these, {date}")
    return {
        "hbm": q(fit.read_bytes_s / copy, "probed", f"{fit.read_bytes_s / 1e12:.2f} TB/s against the device copy's "
                 f"{copy / 1e12:.2f} TB/s, from {where}"),
        "layer_device_overhead_s": q(fit.fixed_s, "probed", f"fixed device time per layer, from {where}"),
        "graphed_step_overhead_s": q(max(0.0, step), "probed", f"graphed step at {lo} layers less its layers and LM head read "
                             f"(median over {len(shapes)} shape(s)), {date}"),
    }


def _kernel_efficiency(doc: Mapping[str, Any]) -> dict[str, Any]:
    """hbm, layer_device_overhead_s (and graphed_step_overhead_s) from real decoder layers timed in graphed decode,
    where the probe timed them; else hbm from a GEMV's read rate over the HBM copy ceiling and
    layer_device_overhead_s as KERNELS_PER_LAYER times a tiny kernel's time in a CUDA graph."""
    from hpi.planner.cost.dequant import KERNELS_PER_LAYER

    kernels, copy = doc.get("kernels") or {}, (doc.get("hbm") or {}).get("bytes_s")
    if kernels.get("layers") and copy:
        return _layer_figures(kernels["layers"], copy, kernels.get("gemv_bytes_s"), doc["date"])
    out: dict[str, Any] = {}
    if kernels.get("gemv_bytes_s") and copy:
        rows, cols = kernels["gemv_shape"]
        ratio = kernels["gemv_bytes_s"] / copy
        out["hbm"] = q(min(1.0, ratio), "probed", f"bf16 GEMV [1, {cols}] x [{cols}, {rows}] reads "
                       f"{kernels['gemv_bytes_s'] / 1e12:.2f} TB/s against the device copy's {copy / 1e12:.2f} TB/s"
                       f"{' (clipped to 1)' if ratio > 1 else ''}, {doc['date']}")
    if kernels.get("tiny_kernel_s"):
        per_kernel = kernels["tiny_kernel_s"]
        out["layer_device_overhead_s"] = q(KERNELS_PER_LAYER * per_kernel, "probed", f"{KERNELS_PER_LAYER:.0f} kernels a "
                                           f"decoder layer x {per_kernel * 1e6:.2f} us, a tiny kernel's time in a CUDA "
                                           f"graph of {kernels['tiny_kernels']}, {doc['date']}")
    return out


def _latency(by_size: Mapping[int, float]) -> tuple[float, int]:
    """(seconds, size) of one collective's fixed cost: the least time over the latency-bound sizes (up to
    ``GRAPHED_MAX_BYTES``). Time cannot fall as a message grows, so a small size measured slower than a
    larger one was disturbed: the 4x H200 probe of 2026-11-22 timed 8 KB at 185 us and 1 MB at 37 us over
    4 GPUs, and its CUDA-graphed 70B TP 4 decode (4x H200 run 4) spent about 45-63 us per all-reduce."""
    small = {size: t for size, t in by_size.items() if size <= GRAPHED_MAX_BYTES} or {min(by_size): by_size[min(by_size)]}
    size = min(small, key=small.get)
    return small[size], size


def _us_table(results: Mapping[str, Mapping[str, float]]) -> str:
    return "; ".join(f"{g} GPUs: " + ", ".join(f"{_size_words(int(s))} {t * 1e6:,.0f} us"
                                               for s, t in sorted(r.items(), key=lambda kv: int(kv[0])))
                     for g, r in sorted(results.items(), key=lambda kv: int(kv[0])) if r)


HOST_BOUND_RATIO = 1.25  # eager over graphed time per all-reduce beyond which the eager loop waited on the host


def _efficiency_section(doc: Mapping[str, Any], profile: Mapping[str, Any]) -> dict[str, Any]:
    """allreduce_latency_s, collective_bandwidth and collective_host_overhead_s from the NCCL figures of the
    largest group.

    alpha is the GPU's time per latency-bound all-reduce: the CUDA-graphed figure where the probe has one
    (no host between calls), else the eager loop's. Where the eager loop is clearly slower than the graph
    (``HOST_BOUND_RATIO``), the host issued the calls no faster than the eager time per call, which becomes
    ``collective_host_overhead_s`` (the host side of the cost model's module rule, cost.collectives)."""
    nccl = doc.get("nccl") or {}
    results = nccl.get("seconds") or {}  # {"k": {"bytes": seconds}}
    if not results:
        return {}
    date = doc["date"]
    k = max(int(g) for g in results)
    by_size = {int(size): float(t) for size, t in results[str(k)].items()}
    graphed = {int(size): float(t) for size, t in ((nccl.get("graphed_seconds") or {}).get(str(k)) or {}).items()}
    largest = max(by_size)
    eager_s, eager_size = _latency(by_size)
    tables = f"eager: {_us_table(results)}"
    if graphed:
        tables += f"; CUDA-graphed: {_us_table(nccl['graphed_seconds'])}"
    out: dict[str, Any] = {}
    if graphed:
        alpha_s, alpha_size = _latency(graphed)
        out["allreduce_latency_s"] = q(alpha_s, "probed", f"NCCL all-reduce, {k} GPUs, bf16, {_size_words(alpha_size)}, "
                                       f"{nccl.get('graphed_calls', GRAPHED_CALLS)} captured as one CUDA graph "
                                       f"(NCCL_NVLS_ENABLE=0), {date}; {tables}")
        if eager_s > HOST_BOUND_RATIO * alpha_s:
            out["collective_host_overhead_s"] = q(
                eager_s, "probed", f"eager NCCL all-reduce loop, {k} GPUs, {_size_words(eager_size)}: one call every "
                f"{eager_s * 1e6:,.0f} us where the GPU needs {alpha_s * 1e6:,.0f} us (graphed): host-bound, {date}")
    else:
        out["allreduce_latency_s"] = q(eager_s, "probed", f"NCCL all-reduce, {k} GPUs, bf16, least time up to "
                                       f"{_size_words(GRAPHED_MAX_BYTES)} ({_size_words(eager_size)}; "
                                       f"NCCL_NVLS_ENABLE=0), {date}; {tables}")
    busbw = largest / by_size[largest] * 2 * (k - 1) / k
    link = _group_link_bytes_s(profile, k)
    if link and largest >= (16 << 20):
        ratio = min(1.0, busbw / link)
        out["collective_bandwidth"] = q(ratio, "probed", f"NCCL all-reduce {_size_words(largest)}, {k} GPUs: bus "
                                        f"bandwidth {busbw / 1e9:.0f} GB/s over the profile's ring link of {link / 1e9:.0f} "
                                        f"GB/s per direction{' (clipped to 1)' if busbw > link else ''}, {date}")
    return out


def _size_words(size: int) -> str:
    return f"{size >> 20} MB" if size >= (1 << 20) else f"{size >> 10} KB"


def _group_link_bytes_s(profile: Mapping[str, Any], k: int) -> float | None:
    """The ring link the cost model sees for the first k GPUs: compiled by the planner from this very profile."""
    from hpi.planner.profiles import load_profile
    from hpi.planner.topology import build_topology

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{profile['name']}.yaml"
        path.write_text(yaml.safe_dump(dict(profile), sort_keys=False))
        topology = build_topology(load_profile(str(path)))
        return topology.group_link(topology.gpus[:k]).bandwidth_bytes_s if len(topology.gpus) >= k else None


def write_profile(profile: Mapping[str, Any], path: Path, header: str = "") -> None:
    """Write the YAML (a comment header, then the sections in schema order) atomically."""
    text = "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(dict(profile), sort_keys=False, width=200)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- measurements (effectful) ---------------------------------------------------------------------------

Step = Callable[[str], Any]  # progress: step(name) -> context manager


def _run(argv: Sequence[str], timeout_s: float = 20.0) -> str | None:
    """A command's stdout, or None when it is missing, fails or hangs."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def gather_os() -> dict[str, Any]:
    proc_version = ""
    try:
        proc_version = Path("/proc/version").read_text()
    except OSError:
        pass
    return {"kind": detect_os(platform.system(), proc_version or platform.release()), "system": platform.system(),
            "release": platform.release(), "proc_version": proc_version.strip(), "python": sys.version.split()[0]}


def gather_host(settings: ProbeSettings, cuda_ok: bool) -> dict[str, Any]:
    host: dict[str, Any] = {"cpu_cores": os.cpu_count() or 1}
    try:
        import psutil

        host["dram_bytes"], host["dram_source"] = float(psutil.virtual_memory().total), "psutil.virtual_memory()"
    except ImportError:
        total = None
        try:
            total = parse_meminfo_total(Path("/proc/meminfo").read_text())
        except OSError:
            pass
        host["dram_bytes"], host["dram_source"] = (total, "/proc/meminfo MemTotal") if total else (
            float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "sysconf")
    lscpu = parse_lscpu(_run(["lscpu"]) or "")
    host["sockets"] = lscpu.get("sockets", 1)
    host["numa_nodes"] = lscpu.get("numa_nodes", 1)
    host["lscpu"] = lscpu
    host["memlock_soft_bytes"], host["memlock_hard_bytes"] = _memlock()
    host["pin_trial"] = _pin_trial(min(settings.pin_trial_bytes, int(host["dram_bytes"] * 0.10)), cuda_ok,
                                   host["memlock_soft_bytes"])
    host["libaio"] = ctypes.util.find_library("aio")
    return host


def _memlock() -> tuple[float | None, float | None]:
    try:
        import resource
    except ImportError:  # Windows
        return None, None
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    as_bytes = lambda v: None if v == resource.RLIM_INFINITY else float(v)  # noqa: E731
    return as_bytes(soft), as_bytes(hard)


def _pin_trial(nbytes: int, cuda_ok: bool, memlock_soft: float | None) -> dict[str, Any]:
    """Prove pinning works: cudaHostAlloc through torch with CUDA, else mlock() within RLIMIT_MEMLOCK."""
    start = time.perf_counter()
    if cuda_ok:
        try:
            import torch

            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            buf.fill_(1)
            ok = bool(buf.is_pinned())
            del buf
            return {"method": "torch pin_memory (cudaHostAlloc)", "bytes": nbytes, "ok": ok,
                    "seconds": time.perf_counter() - start, "error": None if ok else "not pinned"}
        except (RuntimeError, MemoryError) as exc:
            return {"method": "torch pin_memory (cudaHostAlloc)", "bytes": nbytes, "ok": False,
                    "seconds": time.perf_counter() - start, "error": str(exc).splitlines()[0]}
    if memlock_soft is not None:  # half the limit: the process may already hold locked pages
        nbytes = int(min(nbytes, memlock_soft // 2)) // mmap.PAGESIZE * mmap.PAGESIZE
    libc_name = ctypes.util.find_library("c")
    if os.name != "posix" or not libc_name or nbytes <= 0:
        return {"method": "mlock", "bytes": 0, "ok": False, "seconds": 0.0,
                "error": "no mlock here" if nbytes > 0 else "RLIMIT_MEMLOCK is 0"}
    libc = ctypes.CDLL(libc_name, use_errno=True)
    buf = mmap.mmap(-1, nbytes)
    view = (ctypes.c_char * nbytes).from_buffer(buf)
    try:
        address = ctypes.c_void_p(ctypes.addressof(view))  # a bare int would be passed as a 32-bit C int
        rc = libc.mlock(address, ctypes.c_size_t(nbytes))
        error = None if rc == 0 else os.strerror(ctypes.get_errno())
        if rc == 0:
            libc.munlock(address, ctypes.c_size_t(nbytes))
    finally:
        del view
        buf.close()
    return {"method": "mlock", "bytes": nbytes, "ok": error is None, "seconds": time.perf_counter() - start, "error": error}


def _torch_cuda() -> tuple[Any, int]:
    """(torch, visible CUDA devices) or (None, 0). GPU indices follow PCI bus order, as nvidia-smi's do."""
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    try:
        import torch
    except ImportError:
        return None, 0
    try:
        return torch, (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    except RuntimeError:
        return torch, 0


def gather_gpus(torch: Any, n_cuda: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """GPU inventory from nvidia-ml-py, else nvidia-smi, else torch; memory from torch where it runs."""
    gpus: list[dict[str, Any]] = []
    info: dict[str, Any] = {"source": None, "driver_version": None, "cuda_version": None}
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                         "memory_bytes": float(pynvml.nvmlDeviceGetMemoryInfo(handle).total), "memory_source": "NVML total"})
        version = pynvml.nvmlSystemGetDriverVersion()
        info.update(source="nvidia-ml-py", driver_version=version.decode() if isinstance(version, bytes) else version)
        pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - absent, no driver, or any NVML error: fall through to nvidia-smi
        gpus = []
    if not gpus:
        smi = parse_smi_query(_run(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
                                    "--format=csv,noheader,nounits"]) or "")
        for g in smi:
            g["memory_source"] = "nvidia-smi memory.total (MiB)"
        gpus = smi
        if gpus:
            info.update(source="nvidia-smi", driver_version=gpus[0].get("driver_version"))
    if torch is not None and n_cuda:
        info["cuda_version"] = torch.version.cuda
        props = [torch.cuda.get_device_properties(i) for i in range(n_cuda)]
        by_torch = [{"index": i, "name": p.name, "memory_bytes": float(p.total_memory),
                     "memory_source": "torch total_memory"} for i, p in enumerate(props)]
        if not gpus:
            info["source"] = "torch.cuda"
        elif len(gpus) != n_cuda:
            info["note"] = f"{len(gpus)} GPUs in {info['source']}, {n_cuda} visible to torch (CUDA_VISIBLE_DEVICES?): using torch's"
        gpus = by_torch  # what a run can use, in bytes (the planner's memory budget)
    elif gpus:
        info["note"] = "GPUs listed but torch sees no CUDA device: nothing measured on them"
    return [{k: v for k, v in g.items() if k != "driver_version"} for g in gpus], info


def _median_time(fn: Callable[[], float], repeats: int) -> float:
    fn()  # warm-up: first-touch, allocator, lazy CUDA init
    return statistics.median(fn() for _ in range(repeats))


def measure_copies(torch: Any, n_gpus: int, settings: ProbeSettings) -> dict[str, Any]:
    """Host<->device rates, pinned and pageable, per GPU alone and all GPUs at once (one thread and stream each)."""
    size = settings.copy_bytes
    out: dict[str, Any] = {"buffer_bytes": size, "repeats": settings.copy_repeats,
                           "method": "torch copy_ on one CUDA stream per GPU, wall time to synchronize; together: "
                                     "one thread per GPU released by a barrier"}
    devs = [torch.empty(size, dtype=torch.uint8, device=f"cuda:{i}") for i in range(n_gpus)]
    for pinned in (True, False):
        hosts = [torch.ones(size, dtype=torch.uint8, pin_memory=pinned) for _ in range(n_gpus)]  # ones: pages touched
        streams = [torch.cuda.Stream(device=i) for i in range(n_gpus)]
        for direction in ("h2d", "d2h"):
            def one(i: int) -> float:
                dst, src = (devs[i], hosts[i]) if direction == "h2d" else (hosts[i], devs[i])
                with torch.cuda.device(i), torch.cuda.stream(streams[i]):
                    start = time.perf_counter()
                    dst.copy_(src, non_blocking=True)
                    streams[i].synchronize()
                    return time.perf_counter() - start

            key = f"{direction}_{'pinned' if pinned else 'pageable'}"
            alone = [size / _median_time(lambda i=i: one(i), settings.copy_repeats) for i in range(n_gpus)]
            together = _together(one, n_gpus, settings.copy_repeats, size) if n_gpus > 1 else list(alone)
            out[key] = {"alone": alone, "together": together}
        del hosts
    del devs
    return out


def _together(one: Callable[[int], float], n: int, repeats: int, size: int) -> list[float]:
    barrier = threading.Barrier(n)

    def run(i: int) -> list[float]:
        times = []
        for _ in range(repeats + 1):
            barrier.wait()
            times.append(one(i))
        return times[1:]  # the first round warms up

    with ThreadPoolExecutor(max_workers=n) as pool:
        per_gpu = list(pool.map(run, range(n)))
    return [size / statistics.median(t) for t in per_gpu]


def measure_matmul(torch: Any, settings: ProbeSettings) -> dict[str, Any]:
    """Dense matmul FLOP/s on GPU0 per dtype (tf32 = fp32 inputs with TF32 tensor cores allowed)."""
    n, iters = settings.matmul_n, settings.matmul_iters
    flops: dict[str, float] = {}
    errors: dict[str, str] = {}
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("tf32", torch.float32), ("int8", torch.int8)):
            try:
                if dtype is torch.int8:
                    a = torch.randint(-8, 8, (n, n), dtype=torch.int8, device="cuda:0")
                    b = torch.randint(-8, 8, (n, n), dtype=torch.int8, device="cuda:0")
                    op = lambda: torch._int_mm(a, b)  # noqa: E731
                else:
                    a = torch.randn(n, n, dtype=dtype, device="cuda:0")
                    b = torch.randn(n, n, dtype=dtype, device="cuda:0")
                    op = lambda: torch.mm(a, b)  # noqa: E731
                flops[label] = 2.0 * n**3 / _event_time(torch, op, iters)
            except (RuntimeError, AttributeError) as exc:
                errors[label] = str(exc).splitlines()[0][:200]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return {"n": n, "iters": iters, "flops": flops, "errors": errors}


def _event_time(torch: Any, op: Callable[[], Any], iters: int) -> float:
    """Median seconds of op on the current stream, timed with CUDA events, after 3 warm-ups."""
    for _ in range(3):
        op()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        op()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_hbm(torch: Any, settings: ProbeSettings) -> dict[str, Any]:
    size = settings.hbm_bytes
    src = torch.ones(size, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty_like(src)
    seconds = _event_time(torch, lambda: dst.copy_(src), settings.matmul_iters)
    return {"buffer_bytes": size, "bytes_s": 2.0 * size / seconds, "method": "device-to-device copy, read+write bytes"}


TINY_KERNELS = 200  # kernels per captured graph when timing a kernel's fixed cost


def measure_decode_kernels(torch: Any, settings: ProbeSettings) -> dict[str, Any]:
    """What a decode step's kernels reach on GPU0: the read rate of a bf16 GEMV (one token through a weight
    matrix, the bulk of a decode step) and the device time of a tiny kernel in a CUDA graph (the fixed cost
    every kernel pays: the gap between two kernels, ramp and tail; what a layer's norms, rotary, residual adds
    and cache writes cost)."""
    rows, cols = settings.gemv_shape
    w = torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda:0")
    x = torch.randn(1, cols, dtype=torch.bfloat16, device="cuda:0")
    gemv_s = _event_time(torch, lambda: torch.nn.functional.linear(x, w), settings.matmul_iters)
    del w
    from hpi.executor.graphs import capture

    a = torch.zeros(256, device="cuda:0")

    def tiny_kernels() -> None:
        for _ in range(TINY_KERNELS):
            a.add_(1.0)

    graph, _ = capture(tiny_kernels)
    graph_s = _event_time(torch, graph.replay, max(5, settings.matmul_iters))
    return {"gemv_shape": [rows, cols], "gemv_s": gemv_s, "gemv_bytes_s": rows * cols * 2 / gemv_s,
            "tiny_kernels": TINY_KERNELS, "tiny_kernel_s": graph_s / TINY_KERNELS,
            "method": "bf16 F.linear of one row, weight bytes / median event time; a CUDA graph of "
                      f"{TINY_KERNELS} in-place adds on 256 floats, replay time / kernels"}


def _with_layers(config: Any, n: int) -> Any:
    cfg = deepcopy(config)
    cfg.num_hidden_layers = n
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:n]
    return cfg


def measure_decoder_layers(torch: Any, settings: ProbeSettings, device: str = "cuda:0") -> dict[str, Any]:
    """Real decoder layers on the executor's own graphed decode path (``hpi.executor.generate`` with
    ``decode_graphs``, ``hpi.executor.graphs``): each of ``settings.layer_models`` built with each of the two
    ``layer_counts`` (seeded random weights, bf16 on a GPU), batch 1, the median decode step over
    ``layer_reps`` generations after one warm-up. The step difference over the layer difference is one
    layer's time, free of the embedding, the head and the loop; the layer's bytes come from its parameters.
    Where the tiny kernel (``measure_decode_kernels``) gives every kernel's floor, this gives what a real
    layer's norms, rotary, attention and small GEMVs cost: the 8B's graphed step ran 13-38% slower than
    that floor predicts (``hpi validate``, 2026-11-22)."""
    from hpi.executor.modeling import load_hf_config

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shapes, skipped = [], {}
    for model in settings.layer_models:
        try:
            shapes.append(time_layers(torch, settings, load_hf_config(model), model, dev, dtype))
        except torch.cuda.OutOfMemoryError:  # a small GPU: the shapes that fit still make the figures
            skipped[model] = "out of GPU memory"
            torch.cuda.empty_cache()
    if not shapes:
        raise RuntimeError(f"no decoder layer shape fits this GPU: {skipped}")
    return {"counts": list(settings.layer_counts), "prompt_len": settings.layer_prompt_len,
            "gen_len": settings.layer_gen_len, "batch": 1, "shapes": shapes, "skipped": skipped,
            "method": "executor graphed decode, bs 1; per layer = step difference / layer difference"}


def time_layers(torch: Any, settings: ProbeSettings, config: Any, model: str, dev: Any, dtype: Any,
                 batch: int = 1) -> dict[str, Any]:
    """One shape of ``measure_decoder_layers``: its step at each layer count, and one layer's time and bytes
    (``benchmarks/layer_scaling.py`` times it at other batches and prompt lengths)."""
    from transformers import DynamicCache

    from hpi.executor.generate import PipelineGenerator, Sampler
    from hpi.executor.groups import Groups
    from hpi.executor.modeling import ShardSpec, build_stage

    prompt_len, gen_len = settings.layer_prompt_len, settings.layer_gen_len
    ids = torch.randint(3, config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    step_s: dict[str, float] = {}
    param_bytes: dict[int, int] = {}
    for n in settings.layer_counts:
        stage = build_stage(_with_layers(config, n), ShardSpec.whole(n), dtype=dtype, device=dev, seed=0).eval()
        param_bytes[n] = sum(p.numel() * p.element_size() for p in stage.parameters())
        head_bytes = stage.lm_head.weight.numel() * stage.lm_head.weight.element_size()

        def generate() -> list[float]:
            g = PipelineGenerator(stage=stage, groups=Groups.alone(), new_cache=DynamicCache,
                                  hidden_size=config.hidden_size, dtype=dtype, device=dev, micro_batches=1,
                                  sampler=Sampler(), decode_graphs=True)
            g.run(ids, batch, prompt_len, gen_len, chat=False)
            ends = g.times.forward_end_s
            return [b - a for a, b in zip(ends[1:], ends[2:])]  # decode steps after the captured first one

        generate()  # warm-up: allocator pools, cuBLAS heuristics
        steps = [s for _ in range(settings.layer_reps) for s in generate()]
        step_s[str(n)] = statistics.median(steps)
        del stage
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    lo, hi = settings.layer_counts
    return {"model": model, "batch": batch, "prompt_len": prompt_len, "step_s": step_s, "head_bytes": head_bytes,
            "layer_bytes": (param_bytes[hi] - param_bytes[lo]) / (hi - lo),
            "layer_s": (step_s[str(hi)] - step_s[str(lo)]) / (hi - lo)}


GRAPHED_MAX_BYTES = 1 << 20  # all-reduces this small are latency-bound: the ones a decode step issues
GRAPHED_CALLS = 20  # back-to-back all-reduces per captured graph


def _allreduce_worker(rank: int, world: int, backend: str, init_file: str, sizes: Sequence[int], iters: int,
                      out_path: str) -> None:
    """One rank: all-reduce bf16 of each size over ranks 0..k-1 for every k in 2..world; rank 0 writes seconds.

    backend "nccl" on GPU rank (the probe); "gloo" on CPU runs the same schedule so CI tests the machinery.
    On GPUs the latency-bound sizes are timed a second way, captured as a CUDA graph (``_graphed_seconds``):
    the eager loop's time per call is the larger of the GPU's and the host's (torch.distributed's dispatch
    and NCCL's enqueue), the graph's is the GPU's alone.
    """
    import torch
    import torch.distributed as dist

    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off on the lent machines
    cuda = backend == "nccl"
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    barrier_kw = {"device_ids": [rank]} if cuda else {}
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    seconds: dict[str, dict[str, float]] = {}
    graphed: dict[str, dict[str, float]] = {}

    def slowest(elapsed_s: float, group) -> float:
        t = torch.tensor([elapsed_s], device=device, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)  # the slowest rank sets the pace
        return float(t.item())

    for k in range(2, world + 1):
        group = dist.new_group(list(range(k)))  # every rank must enter new_group, members or not
        if rank < k:
            seconds[str(k)], graphed[str(k)] = {}, {}
            for size in sizes:
                buf = torch.zeros(size // 2, dtype=torch.bfloat16, device=device)  # zeros: no overflow to inf
                n_iters = max(5, iters if size <= (16 << 20) else iters // 2)
                for _ in range(5):
                    dist.all_reduce(buf, group=group)
                sync()
                dist.barrier(group=group, **barrier_kw)
                start = time.perf_counter()
                for _ in range(n_iters):
                    dist.all_reduce(buf, group=group)
                sync()
                seconds[str(k)][str(size)] = slowest((time.perf_counter() - start) / n_iters, group)
                if cuda and size <= GRAPHED_MAX_BYTES:
                    per_call = _graphed_seconds(torch, dist, buf, group, replays=max(3, iters // 4))
                    dist.barrier(group=group, **barrier_kw)
                    graphed[str(k)][str(size)] = slowest(per_call, group)
                del buf
        dist.barrier(**barrier_kw)
    if rank == 0:
        Path(out_path).write_text(json.dumps({"seconds": seconds, "graphed_seconds": graphed if cuda else {}}))
    dist.destroy_process_group()


def _graphed_seconds(torch: Any, dist: Any, buf: Any, group: Any, replays: int) -> float:
    """Seconds per all-reduce of ``GRAPHED_CALLS`` back-to-back all-reduces captured as one CUDA graph and
    replayed: the GPU's time per collective with no host in between, as in a graphed decode step
    (hpi.executor.graphs). Warmed up on a side stream first, as the executor does before its capture."""
    from hpi.executor.graphs import capture

    def all_reduces() -> None:
        for _ in range(GRAPHED_CALLS):
            dist.all_reduce(buf, group=group)

    graph, _ = capture(all_reduces)
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / (replays * GRAPHED_CALLS)


def measure_allreduce(n_ranks: int, settings: ProbeSettings, backend: str = "nccl") -> dict[str, Any]:
    """All-reduce times for group sizes 2..n in ONE spawned job (a process group per size), killed at the timeout."""
    import torch.multiprocessing as mp

    os.environ["NCCL_NVLS_ENABLE"] = "0"  # inherited by the ranks; see _allreduce_worker
    with tempfile.TemporaryDirectory(prefix="hpi-probe-allreduce-") as folder:
        init_file, out_path = os.path.join(folder, "init"), os.path.join(folder, "seconds.json")
        args = (n_ranks, backend, init_file, settings.nccl_sizes_bytes, settings.nccl_iters, out_path)
        ctx = mp.start_processes(_allreduce_worker, args=args, nprocs=n_ranks, join=False, start_method="spawn")
        deadline = time.monotonic() + settings.nccl_timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{backend} all-reduce did not finish in {settings.nccl_timeout_s:.0f} s")
        finally:
            for proc in ctx.processes:  # only the ranks this function started
                if proc.is_alive():
                    proc.kill()
        measured = json.loads(Path(out_path).read_text())
    return {**measured, "graphed_calls": GRAPHED_CALLS, "backend": backend, "dtype": "bf16", "groups": "ranks (GPUs) 0..k-1 for k = 2..N",
            "env": {"NCCL_NVLS_ENABLE": "0"}, "method": "torch.distributed all_reduce, wall time of the loop / "
            "iterations after 5 warm-ups, max over ranks; graphed_seconds: the same all-reduces (sizes up to "
            f"{_size_words(GRAPHED_MAX_BYTES)}) captured {GRAPHED_CALLS} to a CUDA graph, replay time / calls"}


def measure_disk(directory: str, file_bytes: int, block_bytes: int) -> dict[str, Any]:
    """Sequential write (+ fsync) and read of a temporary file with O_DIRECT in aligned blocks (posix only)."""
    usage = shutil.disk_usage(directory)
    out: dict[str, Any] = {"path": os.path.abspath(directory), "free_bytes": float(usage.free),
                           "total_bytes": float(usage.total), "block_bytes": block_bytes}
    try:
        out["fs_type"] = mount_fs_type(directory, Path("/proc/mounts").read_text())
    except OSError:
        out["fs_type"] = None
    if os.name != "posix":
        out["skipped"] = "O_DIRECT measurement is posix only"
        return out
    file_bytes = max(block_bytes, min(file_bytes, int(usage.free * 0.5)) // block_bytes * block_bytes)
    out["file_bytes"] = file_bytes
    buf = mmap.mmap(-1, block_bytes)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(block_bytes))  # incompressible
    fd_num, path = tempfile.mkstemp(prefix=".hpi-probe-", dir=directory)
    os.close(fd_num)
    direct = getattr(os, "O_DIRECT", 0)
    try:
        out["o_direct"] = bool(direct)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | direct)
        except OSError:  # tmpfs and some overlay filesystems refuse O_DIRECT
            out["o_direct"], direct = False, 0
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        start = time.perf_counter()
        try:
            for _ in range(file_bytes // block_bytes):
                os.write(fd, buf)
            os.fsync(fd)
        finally:
            os.close(fd)
        out["write_bytes_s"] = file_bytes / (time.perf_counter() - start)
        fd = os.open(path, os.O_RDONLY | direct)
        try:
            if not direct and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop the cached pages we just wrote
            start, total = time.perf_counter(), 0
            while total < file_bytes:
                got = os.readv(fd, [buf])
                if got <= 0:
                    break
                total += got
            out["read_bytes_s"] = total / (time.perf_counter() - start)
        finally:
            os.close(fd)
    finally:
        buf.close()
        os.unlink(path)
    return out


def read_topo() -> str | None:
    return _run(["nvidia-smi", "topo", "-m"])


@contextmanager
def _no_progress(name: str) -> Iterator[None]:
    yield


def run_probe(settings: ProbeSettings, nvme_path: str | None = None, step: Callable[[str], Any] = _no_progress) -> dict[str, Any]:
    """Measure this machine; every step that fails is recorded under ``errors`` instead of aborting the probe."""
    started = time.perf_counter()
    doc: dict[str, Any] = {"probe_version": PROBE_VERSION, "date": _dt.date.today().isoformat(),
                           "hostname": socket.gethostname(), "quick": settings.quick, "settings": asdict(settings),
                           "errors": {}, "notes": []}

    def attempt(name: str, fn: Callable[[], Any]) -> Any:
        with step(name):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - one failed measurement must not lose the others
                doc["errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                return None

    doc["os"] = gather_os()
    torch, n_cuda = attempt("CUDA", _torch_cuda) or (None, 0)
    doc["torch_version"] = getattr(torch, "__version__", None)
    gpus, gpu_info = attempt("GPU inventory", lambda: gather_gpus(torch, n_cuda)) or ([], {})
    doc["gpu_info"] = gpu_info
    doc["gpus"] = gpus if n_cuda else []  # the profile plans on GPUs we could use
    if gpus and not n_cuda:
        doc["notes"].append(f"{len(gpus)} GPU(s) listed by {gpu_info.get('source')} but torch sees no CUDA device: "
                            "profile written without GPUs")
    doc["host"] = attempt("host memory, CPUs, pinning", lambda: gather_host(settings, n_cuda > 0))
    if doc["host"] is None:
        raise RuntimeError(f"hpi probe: cannot read the host's memory and CPUs: {doc['errors']}")
    if n_cuda:
        text = attempt("topology (nvidia-smi topo -m)", read_topo)
        codes = []
        if text:
            try:
                topo = parse_topo(text)
                codes = sorted({topo.code(a, b) for a in topo.gpus for b in topo.gpus if a != b})
            except ValueError as exc:
                doc["errors"]["topology"] = str(exc)
        doc["topo"] = {"text": text, "gpu_codes": codes}
        doc["copies"] = attempt("host<->device copies", lambda: measure_copies(torch, n_cuda, settings))
        doc["matmul"] = attempt("matmul", lambda: measure_matmul(torch, settings))
        doc["hbm"] = attempt("HBM copy", lambda: measure_hbm(torch, settings))
        doc["kernels"] = attempt("decode kernels", lambda: measure_decode_kernels(torch, settings))
        layers = attempt("decoder layers, graphed", lambda: measure_decoder_layers(torch, settings))
        if doc["kernels"] is not None and layers is not None:
            doc["kernels"]["layers"] = layers
        torch.cuda.empty_cache()  # give the copy and matmul buffers back before the NCCL ranks start
        if n_cuda > 1:
            doc["nccl"] = attempt(f"NCCL all-reduce, 2..{n_cuda} GPUs", lambda: measure_allreduce(n_cuda, settings))
        _note_shared_pcie(doc)
    directory = nvme_path or tempfile.gettempdir()
    doc["disk"] = attempt(f"disk at {directory}", lambda: measure_disk(directory, settings.disk_file_bytes, settings.disk_block_bytes))
    if doc["disk"] and doc["disk"].get("fs_type"):
        advice = classify_path(directory, doc["os"]["kind"], doc["disk"]["fs_type"])
        if not advice.ok_for_nvme_offload:
            doc["notes"].append(f"disk figures: {advice.message}")
    doc["seconds"] = time.perf_counter() - started
    return doc


def _note_shared_pcie(doc: dict[str, Any]) -> None:
    alone, together = _copy_figure(doc, "h2d_pinned"), _copy_figure(doc, "h2d_pinned", "together")
    if alone and together and len(doc["gpus"]) > 1 and together < _SHARED_PCIE_RATIO * alone:
        doc["notes"].append(f"pinned host->device: {together / 1e9:.1f} GB/s per GPU with all GPUs at once vs "
                            f"{alone / 1e9:.1f} GB/s alone: the GPUs share an upstream PCIe/host link; model it with "
                            "node.pcie_switches if nvidia-smi topo -m did not show it")
