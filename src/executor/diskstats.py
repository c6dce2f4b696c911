"""What the block device under an NVMe offload folder did during a measured run (Linux ``/proc/diskstats``).

ZeRO-3 reads each NVMe-offloaded partition through DeepSpeed's aio handle. Two counters of the kernel's
per-device statistics (Documentation/admin-guide/iostats.rst) tell what reached the drive:

- field 6, sectors read (512 bytes each, whatever the device's sector size): bytes read;
- field 11, weighted milliseconds spent doing I/O: summed over all in-flight requests, so its growth over
  a wall-clock interval is the average number of requests in flight, i.e. the achieved queue depth.

A folder on tmpfs, overlayfs or a network share has no such device: the snapshot is ``None`` and the record
says why instead of inventing a figure.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

DISKSTATS = Path("/proc/diskstats")
SECTOR_BYTES = 512  # /proc/diskstats counts 512-byte sectors on every device


@dataclass(frozen=True)
class DiskSnapshot:
    device: str
    read_bytes: int
    weighted_io_ms: int
    wall_s: float


@dataclass(frozen=True)
class DiskActivity:
    device: str
    read_bytes: int
    interval_s: float
    weighted_io_ms: int

    @property
    def read_bytes_s(self) -> float:
        return self.read_bytes / self.interval_s if self.interval_s > 0 else 0.0

    @property
    def avg_queue_depth(self) -> float:
        """Average requests in flight over the interval (weighted I/O time / wall time)."""
        return self.weighted_io_ms / 1e3 / self.interval_s if self.interval_s > 0 else 0.0


def device_of(path: str | os.PathLike) -> tuple[int, int]:
    st = os.stat(path)
    return os.major(st.st_dev), os.minor(st.st_dev)


def parse_line(line: str) -> tuple[int, int, str, int, int]:
    """(major, minor, name, sectors read, weighted io ms) of one /proc/diskstats line."""
    f = line.split()
    return int(f[0]), int(f[1]), f[2], int(f[5]), int(f[13])


def snapshot(path: str | os.PathLike, diskstats: Path = DISKSTATS) -> DiskSnapshot | None:
    """The counters of the device holding ``path``; None when no block device backs it (or not Linux)."""
    try:
        major, minor = device_of(path)
        lines = diskstats.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            ma, mi, name, sectors, weighted = parse_line(line)
        except (IndexError, ValueError):
            continue
        if (ma, mi) == (major, minor):
            return DiskSnapshot(name, sectors * SECTOR_BYTES, weighted, time.perf_counter())
    return None


def between(before: DiskSnapshot | None, after: DiskSnapshot | None) -> DiskActivity | None:
    if before is None or after is None or before.device != after.device:
        return None
    return DiskActivity(after.device, after.read_bytes - before.read_bytes, after.wall_s - before.wall_s,
                        after.weighted_io_ms - before.weighted_io_ms)
