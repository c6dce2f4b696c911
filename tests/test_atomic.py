"""hpi.atomic: a write either lands whole or leaves the old file as it was, and leaves no temporary file."""

from __future__ import annotations

import json
import os
import stat

import pytest

from hpi import atomic


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_write_json_round_trips_and_creates_the_folders(tmp_path):
    path = tmp_path / "a" / "b" / "doc.json"
    assert atomic.write_json(path, {"x": 1, "when": tmp_path}, newline=True) == path
    text = path.read_text()
    assert json.loads(text) == {"x": 1, "when": str(tmp_path)} and text.endswith("}\n")
    assert leftovers(path.parent) == []


def test_a_document_that_cannot_be_serialized_leaves_the_old_file_untouched(tmp_path):
    path = tmp_path / "doc.json"
    atomic.write_json(path, {"old": True})

    def refuse(obj):
        raise TypeError(f"{type(obj).__name__} is not JSON")

    with pytest.raises(TypeError, match="object is not JSON"):
        atomic.write_json(path, {"new": object()}, default=refuse)
    assert json.loads(path.read_text()) == {"old": True}
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_a_write_stopped_before_the_rename_keeps_the_old_contents_and_removes_its_temp(tmp_path, monkeypatch, stop):
    path = tmp_path / "report.md"
    path.write_text("old report")

    def fsync_fails(fd):
        raise stop

    monkeypatch.setattr(atomic.os, "fsync", fsync_fails)
    with pytest.raises(stop if isinstance(stop, type) else type(stop)):
        atomic.write_text(path, "new report, half written")
    assert path.read_text() == "old report"
    assert leftovers(tmp_path) == []


def test_an_existing_file_keeps_its_mode_and_a_new_one_gets_open_s_mode(tmp_path):
    kept = tmp_path / "kept.txt"
    kept.write_text("x")
    os.chmod(kept, 0o640)
    atomic.write_text(kept, "y")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text() == "y"

    umask = os.umask(0o022)
    try:
        fresh = atomic.write_text(tmp_path / "fresh.txt", "z")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # 0666 less the umask, not mkstemp's 0600


def test_a_folder_in_the_way_raises_and_leaves_no_temp(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(IsADirectoryError):
        atomic.write_bytes(tmp_path / "taken", b"data")
    assert (tmp_path / "taken").is_dir() and leftovers(tmp_path) == []


def test_write_figure_renders_the_format_of_the_suffix(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = atomic.write_figure(tmp_path / "plots" / "p.png", fig, dpi=50)
    svg = atomic.write_figure(tmp_path / "plots" / "p.svg", fig)
    plt.close(fig)
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert b"<svg" in svg.read_bytes()[:2000]
    assert leftovers(tmp_path / "plots") == []


def test_replace_symlink_repoints_a_link_and_refuses_a_real_folder(tmp_path):
    (tmp_path / "run-1").mkdir()
    (tmp_path / "run-2").mkdir()
    link = tmp_path / "latest"
    atomic.replace_symlink(link, "run-1")
    assert os.readlink(link) == "run-1"
    atomic.replace_symlink(link, "run-2")
    assert os.readlink(link) == "run-2" and link.resolve() == (tmp_path / "run-2").resolve()
    with pytest.raises(IsADirectoryError, match="is a folder, not a link"):
        atomic.replace_symlink(tmp_path / "run-1", "run-2")
    assert (tmp_path / "run-1").is_dir() and leftovers(tmp_path) == []
