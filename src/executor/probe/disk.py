"""The offload disk: which filesystem a directory is on, whether it suits NVMe offload on this OS, and its
sequential O_DIRECT write and read rates (``measure_disk``, posix only; ``hpi check`` reuses it for a quick
read), and its O_DIRECT read rate by request size and requests in flight (``measure_read_grid``), which prices a
plan's aio settings."""

from __future__ import annotations

import mmap
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["mount_fs_type", "PathAdvice", "classify_path", "os_note", "ReadGrid", "measure_read_grid", "measure_disk"]


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
    """Offload-directory conventions per OS: native Windows has no libaio (CPU offload only); under WSL2 NVMe
    offload belongs on the distro's ext4, not a Windows drive behind the 9p bridge."""
    if re.match(r"^(\\\\|//)[^\\/]+[\\/]", path):
        return PathAdvice("unc", False, f"{path} is a network share (UNC): far too slow for offload; use a local "
                          "NVMe drive")
    if os_kind == "windows":
        return PathAdvice("windows-drive", False, f"{path}: native Windows has no libaio, so DeepSpeed NVMe offload "
                          "does not run; use --offload cpu, or run under WSL2 with the offload dir on the "
                          "distro's ext4")
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
    """One line for a profile's notes: what offload needs on this OS."""
    return {
        "linux": "Linux: NVMe offload needs libaio (apt install libaio-dev, or carry libaio1) and a local ext4/xfs dir",
        "wsl2": "WSL2: keep offload dirs on the distro's ext4 (not /mnt/c, the 9p Windows drive); CUDA passes through",
        "windows": "native Windows: no libaio, so no DeepSpeed NVMe offload: plan --offload cpu, or use WSL2 for NVMe",
    }[os_kind]


@dataclass(frozen=True)
class ReadGrid:
    """The (request bytes, requests in flight) points ``measure_read_grid`` times, and how much each reads."""

    request_bytes: tuple[int, ...]
    in_flight: tuple[int, ...]
    point_bytes: int  # bytes read per point, at least two rounds of every request in flight
    max_in_flight_bytes: int  # points with more bytes in flight are skipped (memory, time)

    def points(self, file_bytes: int) -> list[tuple[int, int]]:
        limit = min(self.max_in_flight_bytes, file_bytes)
        return [(r, q) for r in self.request_bytes for q in self.in_flight if r * q <= limit]


def _read_with_requests(fd: int, file_bytes: int, request: int, in_flight: int, total: int) -> float:
    """Bytes/s of ``total`` bytes of O_DIRECT reads of ``request`` bytes, ``in_flight`` of them outstanding: one
    thread per request, each a blocking pread (it releases the GIL), spread over the file."""
    slots = file_bytes // request
    count = max(in_flight, -(-total // request))
    buffers = [mmap.mmap(-1, request) for _ in range(in_flight)]  # page-aligned, as O_DIRECT needs
    start = threading.Barrier(in_flight + 1)

    def reader(i: int) -> None:
        start.wait()
        for k in range(i, count, in_flight):
            os.preadv(fd, [buffers[i]], (k % slots) * request)

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(in_flight)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    for b in buffers:
        b.close()
    return count * request / elapsed


def measure_read_grid(path: str, file_bytes: int, grid: ReadGrid) -> list[list[float]]:
    """[request_bytes, in_flight, read_bytes_s] of O_DIRECT reads of the file at ``path`` at each grid point:
    what DeepSpeed's aio reaches with requests of that size, that many at once (``hpi.planner.cost.aio``).
    Threads stand in for libaio's queue (the image may have no libaio): the drive sees the same requests."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        return [[float(r), float(q), _read_with_requests(fd, file_bytes, r, q, max(grid.point_bytes, 2 * r * q))]
                for r, q in grid.points(file_bytes)]
    finally:
        os.close(fd)


def measure_disk(directory: str, file_bytes: int, block_bytes: int, grid: ReadGrid | None = None) -> dict[str, Any]:
    """Sequential write (+ fsync) and read of a temporary file with O_DIRECT in aligned blocks (posix only); with
    ``grid``, the read rate by request size and requests in flight too (``measure_read_grid``, O_DIRECT only)."""
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
        if grid is not None and direct:
            start = time.perf_counter()
            out["read_grid"] = measure_read_grid(path, file_bytes, grid)
            out["read_grid_seconds"] = time.perf_counter() - start
    finally:
        buf.close()
        os.unlink(path)
    return out
