"""hpi.executor.probe.disk: offload-directory conventions per OS and filesystem, and the O_DIRECT measurement."""

from __future__ import annotations

from hpi.executor.probe import classify_path, measure_disk, mount_fs_type


def test_offload_path_conventions():
    assert classify_path("/mnt/c/offload", "wsl2").kind == "wsl2-windows-drive"
    assert classify_path("/home/me/offload", "wsl2", "ext4").ok_for_nvme_offload
    assert classify_path(r"\\server\share\offload", "windows").kind == "unc"
    assert "--offload cpu" in classify_path(r"D:\offload", "windows").message
    assert classify_path("/dev/shm/x", "linux", "tmpfs").kind == "tmpfs"
    mounts = "/dev/nvme0n1p1 / ext4 rw 0 0\ntmpfs /dev/shm tmpfs rw 0 0\nC:\\134 /mnt/c 9p rw 0 0\n"
    assert mount_fs_type("/dev/shm/a", mounts) == "tmpfs" and mount_fs_type("/mnt/c/x", mounts) == "9p"
    assert mount_fs_type("/home", mounts) == "ext4"


def test_disk_measurement(tmp_path):
    disk = measure_disk(str(tmp_path), 4 << 20, 1 << 20)
    assert disk["read_bytes_s"] > 0 and disk["write_bytes_s"] > 0 and disk["free_bytes"] > 0
    assert list(tmp_path.iterdir()) == []  # the test file is removed
