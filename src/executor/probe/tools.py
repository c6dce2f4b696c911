"""What the machine's tools say, parsed: ``nvidia-smi topo -m`` (how the GPUs are linked), NVML or
``nvidia-smi --query-gpu`` (the GPU inventory), ``lscpu`` and ``/proc/meminfo`` (the host).

The parsers are pure (text in, data out; unit-tested with fixtures of real output); ``run_command``,
``read_topo`` and ``gather_gpus`` run the tools and never raise when one is missing.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from hpi.executor.probe.settings import MIB

__all__ = [
    "TopoMatrix",
    "GpuTopology",
    "parse_topo",
    "gpu_topology",
    "nvlink_count",
    "nvlink_link_bytes_s",
    "nvlinks_per_gpu",
    "numa_to_socket",
    "parse_lscpu",
    "parse_smi_query",
    "parse_meminfo_total",
    "run_command",
    "read_topo",
    "gather_gpus",
]

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
            raise ValueError(f"nvidia-smi topo -m: row {name} has {len(links)} link cells for {len(devices)} devices: "
                             f"{line!r}")
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
class GpuTopology:
    """How the GPUs of one node are linked (sockets, PCIe switches, NVLink), read from the topology matrix."""

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


def gpu_topology(topo: TopoMatrix | None, n_gpus: int, *, sockets: int = 1, numa_nodes: int = 1,
                 gpu_name: str = "") -> GpuTopology:
    """Sockets, PCIe switch groups and NVLink pairs (or one NVSwitch) of ``n_gpus`` GPUs.

    Without a matrix (no nvidia-smi) or one that disagrees with ``n_gpus``: every GPU alone on socket 0.
    """
    gpus = [f"GPU{i}" for i in range(n_gpus)]
    if topo is None or tuple(topo.gpus) != tuple(gpus):
        return GpuTopology(n_gpus=n_gpus, gpu_socket=(0,) * n_gpus, switch_groups=(), nvlink_pairs=())
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
        return GpuTopology(n_gpus, sockets_of, switch_groups, (), nvswitch_links=min(counts))
    nvlink_pairs = tuple((i, j, n) for (i, j), n in links.items() if n > 0)
    return GpuTopology(n_gpus, sockets_of, switch_groups, nvlink_pairs)


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


def run_command(argv: Sequence[str], timeout_s: float = 20.0) -> str | None:
    """A command's stdout, or None when it is missing, fails or hangs."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def read_topo() -> str | None:
    return run_command(["nvidia-smi", "topo", "-m"])


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
                         "memory_bytes": float(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                         "memory_source": "NVML total"})
        version = pynvml.nvmlSystemGetDriverVersion()
        info.update(source="nvidia-ml-py", driver_version=version.decode() if isinstance(version, bytes) else version)
        pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - absent, no driver, or any NVML error: fall through to nvidia-smi
        gpus = []
    if not gpus:
        smi = parse_smi_query(run_command(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
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
            info["note"] = (f"{len(gpus)} GPUs in {info['source']}, {n_cuda} visible to torch (CUDA_VISIBLE_DEVICES?): "
                            "using torch's")
        gpus = by_torch  # what a run can use, in bytes (the planner's memory budget)
    elif gpus:
        info["note"] = "GPUs listed but torch sees no CUDA device: nothing measured on them"
    return [{k: v for k, v in g.items() if k != "driver_version"} for g in gpus], info
