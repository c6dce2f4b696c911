"""Run folders: one run at a time writes a folder, and by default every run gets a fresh one.

The lock: ``<folder>/.hpi-node<k>.lock``, held with ``fcntl.flock`` (exclusive, non-blocking) from the moment
a run claims the folder until ``launch`` returns. A second run on the same folder (and node) is refused with
``RunFolderBusy`` before it writes or starts anything, naming the run that holds it. The kernel drops a
flock when its holder's file is closed, so a run killed with SIGKILL leaves no stale lock behind; the lock
file stays (its text says who held it last). One lock per node rank: the nodes of a multi-node run may share
one folder (a shared file system, or several nodes on one host), each writing its own ``logs/node<k>/``.

A fresh folder (``hpi run`` without ``--out``): ``runs/<UTC time>-<plan label>/`` (``-2``, ``-3``, ... when two
runs start in the same second), and ``runs/latest`` a relative symlink to it, replaced atomically
(``hpi.atomic.replace_symlink``). A ``runs/latest`` that is a real folder (what hpi wrote before run folders
were fresh) is left alone, with a warning.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import os
import re
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from hpi.atomic import replace_symlink

__all__ = ["RUNS_ROOT", "LATEST", "RunFolderBusy", "FolderLock", "lock_path", "fresh_run_folder", "claim_run_folder",
           "hold_for_launch"]

RUNS_ROOT = "runs"
LATEST = "latest"
_UNSAFE = re.compile(r"[^A-Za-z0-9+._-]+")
_NAME_MAX = 120  # characters of a fresh folder's name (file systems allow 255)


class RunFolderBusy(ValueError):
    """Another run holds the folder's lock: one line naming it and what to do (a user error: exit 2)."""


def lock_path(folder: str | os.PathLike, node_rank: int = 0) -> Path:
    return Path(folder) / f".hpi-node{node_rank}.lock"


@dataclass
class FolderLock:
    """An flock held on a run folder's lock file; ``release`` closes it (idempotent)."""

    folder: Path
    node_rank: int
    fd: int | None

    @classmethod
    def acquire(cls, folder: str | os.PathLike, node_rank: int = 0) -> "FolderLock":
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise RunFolderBusy(f"run folder {folder} is a file, not a folder: pass another --out")
        folder.mkdir(parents=True, exist_ok=True)
        path = lock_path(folder, node_rank)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            node = f" (node {node_rank})" if node_rank else ""
            raise RunFolderBusy(f"run folder {folder}{node} is in use by another hpi run{holder}: wait for it to end, "
                                f"or pass another --out (hpi run without --out makes a fresh folder under runs/)"
                                ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {_now().isoformat(timespec='seconds')}: "
                      f"{' '.join(sys.argv)[:500]}\n".encode(), 0)
        return cls(folder, node_rank, fd)

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)  # closing the only descriptor drops the flock


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 600, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return f" ({text.splitlines()[0][:300]})" if text else ""


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def fresh_run_folder(label: str, root: str | os.PathLike = RUNS_ROOT, now: _dt.datetime | None = None) -> Path:
    """A new, empty ``<root>/<UTC time>-<label>/`` (created here, so two runs never get the same one)."""
    stamp = (now or _now()).astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H-%M-%S")
    safe = _UNSAFE.sub("-", label).strip("-.") or "run"
    name = f"{stamp}-{safe}"[:_NAME_MAX]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        folder = root / (name if n == 1 else f"{name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"no free run folder name {name}-N under {root}")


def point_latest(folder: Path) -> str | None:
    """``<folder's parent>/latest`` -> ``folder`` (relative, atomic); a warning instead where it is a real folder."""
    link = folder.parent / LATEST
    if link.is_dir() and not link.is_symlink():
        return (f"{link} is a folder from an older hpi run, left as it is; rename it to let {link} point at the "
                f"newest run")
    replace_symlink(link, folder.name)
    return None


# Claims made before the launch (``claim_run_folder``), each taken over by the next ``launch`` of its folder.
_CLAIMS: dict[tuple[str, int], FolderLock] = {}
_CLAIMS_LOCK = threading.Lock()


def _key(folder: str | os.PathLike, node_rank: int) -> tuple[str, int]:
    return os.path.realpath(folder), node_rank


def claim_run_folder(deployment, *, root: str | os.PathLike = RUNS_ROOT, prog: str = "hpi run"):
    """Lock the deployment's run folder before anything is written to it; no folder given (``spec.out_dir``
    None or empty): a fresh one under ``root`` with ``root/latest`` pointing at it. Returns the deployment
    with its folder set. The lock is held until the ``launch`` of that folder returns (or this process ends);
    a busy folder raises ``RunFolderBusy``."""
    spec, node_rank = deployment.spec, deployment.nodes.node_rank
    fresh = not spec.out_dir
    folder = fresh_run_folder(spec.plan.label, root) if fresh else Path(spec.out_dir)
    with _CLAIMS_LOCK:
        unlaunched = _CLAIMS.pop(_key(folder, node_rank), None)
    if unlaunched is not None:  # this process claimed it before and never launched (one command at a time)
        unlaunched.release()
    lock = FolderLock.acquire(folder, node_rank)
    with _CLAIMS_LOCK:
        _CLAIMS[_key(folder, node_rank)] = lock
    if fresh:
        warning = point_latest(folder)
        if warning:
            sys.stderr.write(f"{prog}: warning: {warning}\n")
        deployment = replace(deployment, spec=replace(spec, out_dir=str(folder)))
    return deployment


def hold_for_launch(folder: str | os.PathLike, node_rank: int = 0) -> FolderLock:
    """The lock ``launch`` holds while it runs: the claim made for this folder, else a new one (busy: raises)."""
    with _CLAIMS_LOCK:
        claimed = _CLAIMS.pop(_key(folder, node_rank), None)
    return claimed if claimed is not None and claimed.held else FolderLock.acquire(folder, node_rank)
