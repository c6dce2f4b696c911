"""Write a file so that no reader ever sees half of it: every file hpi writes goes through here.

Each writer puts the new contents in a temporary file in the target's own folder (the same file system, so
the rename cannot turn into a copy), flushes it to the disk (``fsync``) and renames it over the target
(``os.replace``, atomic on POSIX). A write stopped midway (an exception, Ctrl-C, a SIGKILL, a full disk)
leaves the old file as it was; only a SIGKILL can leave a ``.NAME.*.tmp`` file beside it.

Permissions: a file that exists keeps its mode; a new one gets what ``open()`` would give it (0666 less
the umask; ``tempfile.mkstemp`` would make every new file 0600).

Pure: the standard library only, so the planner and the executor may both import it.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

__all__ = ["write_bytes", "write_text", "write_json", "write_figure", "replace_symlink"]


def _temp_beside(path: Path) -> tuple[int, Path]:
    """An open, new, empty file next to ``path`` (O_EXCL: never someone else's), with open()'s default mode."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically (module docstring); creates the parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _keep_mode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return write_bytes(path, text.encode(encoding))


def write_json(path: str | os.PathLike, doc: Any, *, indent: int | None = 1, newline: bool = False,
               **dumps_kw: Any) -> Path:
    """``doc`` as JSON (``default=str`` unless given: dates and paths become strings), atomically.

    The document is serialized to memory first: a value that cannot be serialized raises before the file
    is touched."""
    dumps_kw.setdefault("default", str)
    return write_text(path, json.dumps(doc, indent=indent, **dumps_kw) + ("\n" if newline else ""))


def write_figure(path: str | os.PathLike, fig: Any, **savefig_kw: Any) -> Path:
    """A matplotlib figure, rendered in memory in the format the path's suffix names (png without one), then
    written atomically: an interrupted plot never leaves a truncated image."""
    import io

    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix[1:].lower() or "png", **savefig_kw)
    return write_bytes(path, buf.getvalue())


def replace_symlink(link: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Point ``link`` at ``target`` atomically: a new link under a temporary name, renamed over the old one.

    Refuses (``IsADirectoryError``) where ``link`` is a real folder: renaming over it would fail or, for an
    empty one, delete it."""
    link = Path(link)
    if link.is_dir() and not link.is_symlink():
        raise IsADirectoryError(f"{link} is a folder, not a link")
    for _ in range(100):
        tmp = link.with_name(f".{link.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.symlink(target, tmp)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temporary name beside {link}")
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return link


def _keep_mode(path: Path, tmp: Path) -> None:
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return
    os.chmod(tmp, mode)
