"""hpi.executor.diskstats: bytes read and achieved queue depth from /proc/diskstats counters."""

from __future__ import annotations

import os

import pytest

from hpi.executor.diskstats import DiskSnapshot, between, parse_line, snapshot

# A real line's layout (Documentation/admin-guide/iostats.rst): major minor name, then reads completed,
# reads merged, sectors read, ms reading, writes..., in flight, ms doing io, weighted ms doing io, ...
LINE = " 259       0 nvme0n1 1200 3 409600 800 50 0 1000 20 0 900 1640 0 0 0 0 0 0"


def test_parse_line_reads_sectors_and_weighted_time():
    assert parse_line(LINE) == (259, 0, "nvme0n1", 409600, 1640)


def test_activity_gives_bytes_rate_and_queue_depth():
    before = DiskSnapshot("nvme0n1", 1_000_000, 10_000, 100.0)
    after = DiskSnapshot("nvme0n1", 1_000_000 + 4_000_000_000, 10_000 + 8_000, 102.0)
    act = between(before, after)
    assert act.read_bytes == 4_000_000_000
    assert act.read_bytes_s == pytest.approx(2e9)
    assert act.avg_queue_depth == pytest.approx(4.0)  # 8 s of request time over 2 s of wall time


def test_no_device_or_a_changed_device_gives_none(tmp_path):
    assert between(None, DiskSnapshot("sda", 0, 0, 1.0)) is None
    assert between(DiskSnapshot("sda", 0, 0, 0.0), DiskSnapshot("sdb", 0, 0, 1.0)) is None
    fake = tmp_path / "diskstats"
    fake.write_text(" 4095 1048575 elsewhere 1 0 8 0 0 0 0 0 0 0 0\n")  # no folder lives on that device
    assert snapshot(tmp_path, diskstats=fake) is None
    assert snapshot(tmp_path / "missing", diskstats=fake) is None


def test_snapshot_finds_the_device_of_a_folder(tmp_path):
    major, minor = os.major(os.stat(tmp_path).st_dev), os.minor(os.stat(tmp_path).st_dev)
    fake = tmp_path / "diskstats"
    fake.write_text(f"   8 0 sda 1 0 8 0 0 0 0 0 0 0 0\n {major} {minor} mine 5 0 16 1 0 0 0 0 0 3 7\n")
    snap = snapshot(tmp_path, diskstats=fake)
    assert (snap.device, snap.read_bytes, snap.weighted_io_ms) == ("mine", 16 * 512, 7)
