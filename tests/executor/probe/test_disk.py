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


def test_read_grid_points_skip_what_would_hold_too_much_in_flight():
    from hpi.executor.probe import ReadGrid

    grid = ReadGrid((1 << 20, 4 << 20, 16 << 20), (1, 8, 32, 128), 128 << 20, 256 << 20)
    points = grid.points(2 << 30)
    assert (16 << 20, 32) not in points and (16 << 20, 8) in points and (1 << 20, 128) in points
    assert len(points) == 9 and all(r * q <= 256 << 20 for r, q in points)
    assert grid.points(4 << 20) == [(1 << 20, 1), (4 << 20, 1)]  # a small file bounds what is in flight too


def test_disk_measurement_with_a_read_grid(tmp_path):
    """O_DIRECT reads at each grid point, one thread per request in flight; where the filesystem refuses
    O_DIRECT (tmpfs) no grid is measured: it would time the page cache, not the drive."""
    from hpi.executor.probe import ReadGrid

    grid = ReadGrid((256 << 10, 1 << 20), (1, 4), 2 << 20, 4 << 20)
    disk = measure_disk(str(tmp_path), 4 << 20, 1 << 20, grid)
    if not disk["o_direct"]:
        assert "read_grid" not in disk
        return
    assert [(r, q) for r, q, _ in disk["read_grid"]] == [(256 << 10, 1), (256 << 10, 4), (1 << 20, 1), (1 << 20, 4)]
    assert all(rate > 0 for _, _, rate in disk["read_grid"]) and disk["read_grid_seconds"] > 0
    assert list(tmp_path.iterdir()) == []  # the test file is removed
