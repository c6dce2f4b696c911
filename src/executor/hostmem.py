"""This process's host memory, from Linux's ``/proc/self/status``: resident now and the high-water mark.

The build's host peak (``hpi.planner.cost.build`` predicts it) is the high-water mark of the resident set
(``VmHWM``) between ``reset_peak`` and the end of the build. Writing 5 to ``/proc/self/clear_refs`` resets
that mark to the current resident set (Linux >= 4.0, proc(5)), so imports and earlier work do not count. The
kernel keeps the mark itself: no sampling thread can miss a short peak. Pinned (page-locked) host memory is
resident and counts, and so do the checkpoint reader's staging buffers (``hpi.executor.checkpoint``: 256 MiB by
default); the page cache its buffered reads fill does not (file-backed and reclaimable, it does not lead to an
OOM kill), nor do the pages of a memory-mapped checkpoint once unmapped (``SliceReader``). Elsewhere every
figure is 0: not measured.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["peak_bytes", "reset_peak", "resident_bytes"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int:
    try:
        text = _STATUS.read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # reported in kB
    return 0


def resident_bytes() -> int:
    """The resident set now (``VmRSS``)."""
    return _status_bytes("VmRSS")


def peak_bytes() -> int:
    """The resident set's high-water mark since the process started or ``reset_peak`` (``VmHWM``)."""
    return _status_bytes("VmHWM")


def reset_peak() -> bool:
    """Restart the high-water mark from the resident set now; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True
