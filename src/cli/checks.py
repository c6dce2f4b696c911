"""Checks of what a command will write, connect to and run on, made before it writes, connects or starts
anything: each refusal is one ``UsageError`` line that names the flag and the fix.

- output paths (``writable_dir``, ``writable_file``): every name short enough, no file where a folder must
  be, the nearest existing folder writable (tried with an unnamed temporary file: nothing is left behind);
- database URLs (``storage_url``): parsed, the dialect known, its driver installed, an SQLite file's folder
  there;
- names that become folders (``folder_name``: a study cannot leave its studies folder);
- the device (``cuda_available``: ``--device cuda`` on a machine torch sees no GPU on).

Importing this module stays cheap: SQLAlchemy and torch are imported by the checks that need them.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from hpi.cli.errors import UsageError, missing_dependency, one_line, require

NAME_MAX_BYTES = 255  # a file name on Linux, macOS and Windows file systems (os.pathconf where it answers)
PATH_MAX_BYTES = 4096


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return NAME_MAX_BYTES


def _nearest_existing(path: Path) -> Path:
    """The path itself or its nearest ancestor that exists (a file or a folder)."""
    for candidate in (path, *path.parents):
        try:
            candidate.stat()
            return candidate
        except OSError:
            continue
    return Path(path.anchor or ".")


def _shown(path: str) -> str:
    return one_line(path)


def _check_names(path: Path, flag: str, who: str) -> None:
    text = str(path)
    if not text.strip():
        raise UsageError(f"{who}: {flag} is empty: name a path")
    if "\0" in text:
        raise UsageError(f"{who}: {flag} holds a NUL character: name a path without one")
    if len(os.fsencode(text)) > PATH_MAX_BYTES:
        raise UsageError(f"{who}: {flag} {_shown(text)} is longer than {PATH_MAX_BYTES} bytes: use a shorter path")
    limit = _name_max(_nearest_existing(path.absolute()))
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > limit:
            raise UsageError(f"{who}: {flag} {_shown(text)}: a name in it is {size} bytes, longer than the file "
                             f"system's {limit}: use a shorter name")


def _check_creatable(path: Path, flag: str, who: str) -> None:
    """Whatever of ``path`` does not exist can be created: its nearest existing ancestor is a folder this
    process may write in."""
    base = _nearest_existing(path.absolute())
    if base != path.absolute() and not base.is_dir():
        raise UsageError(f"{who}: {flag} {_shown(str(path))}: {_shown(str(base))} is a file, not a folder: "
                         "choose another path")
    folder = base if base.is_dir() else base.parent
    try:
        with tempfile.TemporaryFile(dir=folder):  # O_TMPFILE where it works: no name ever appears
            pass
    except OSError as e:
        raise UsageError(f"{who}: {flag} {_shown(str(path))}: cannot write in {_shown(str(folder))} "
                         f"({e.strerror or e}): choose a folder you may write to") from None


def writable_dir(path: str, flag: str, who: str) -> Path:
    """A folder the command will create (or reuse) and write into, checked without creating anything."""
    p = Path(path).expanduser()
    _check_names(p, flag, who)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{who}: {flag} {_shown(path)} is a file, not a folder: choose another path")
    _check_creatable(p, flag, who)
    return p


def writable_file(path: str, flag: str, who: str, suffixes: tuple[str, ...] = ()) -> Path:
    """A file the command will write (creating its folders), checked without creating anything."""
    p = Path(path).expanduser()
    _check_names(p, flag, who)
    if suffixes and p.suffix.lower() not in suffixes:
        raise UsageError(f"{who}: {flag} {_shown(path)} must end in {' or '.join(suffixes)}")
    if p.is_dir():
        raise UsageError(f"{who}: {flag} {_shown(path)} is a folder: name a file in it")
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"{who}: {flag} {_shown(path)} is not writable: choose a file you may write")
    _check_creatable(p, flag, who)
    return p


def readable_file(path: str, flag: str, who: str) -> Path:
    """A file the command reads: there, a file, readable."""
    p = Path(path).expanduser()
    _check_names(p, flag, who)
    if not p.exists():
        raise UsageError(f"{who}: {flag} {_shown(path)}: no such file")
    if p.is_dir():
        raise UsageError(f"{who}: {flag} {_shown(path)} is a folder: name a file")
    if not os.access(p, os.R_OK):
        raise UsageError(f"{who}: {flag} {_shown(path)} is not readable: fix its permissions")
    return p


def existing_dir(path: str, flag: str, who: str) -> Path:
    """A folder the command reads from or writes into as it is (it is not created)."""
    p = Path(path).expanduser()
    _check_names(p, flag, who)
    if not p.is_dir():
        what = "is a file, not a directory" if p.exists() else "no such directory"
        raise UsageError(f"{who}: {flag} {_shown(path)}: {what}")
    return p


# ---- names ---------------------------------------------------------------------------------------------
_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def folder_name(name: str, flag: str, who: str) -> str:
    """A name that becomes one folder under another (a study under --studies-dir): letters, digits, '.', '_',
    '-', at most 100 characters, never '..' or a path."""
    if not _FOLDER_NAME.fullmatch(name) or ".." in name:
        raise UsageError(f"{who}: {flag} {_shown(name)!r} is not a plain name: use letters, digits, '.', '_' and "
                         "'-' (at most 100, no '..' and no '/'): it names a folder inside the studies folder")
    return name


# ---- database URLs -------------------------------------------------------------------------------------
# The package that installs each DB-API driver SQLAlchemy imports by default.
DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient", "pymysql": "pymysql",
                   "psycopg": "psycopg[binary]", "asyncpg": "asyncpg", "oracledb": "oracledb", "pyodbc": "pyodbc"}


def storage_url(url: str, flag: str, who: str) -> None:
    """An SQLAlchemy URL Optuna can open: it parses, its dialect exists, its driver is installed, and an SQLite
    file's folder exists and is writable. Opens no connection."""
    require(["sqlalchemy"], who)
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    example = "e.g. sqlite:///studies/x.db or postgresql://user@host/db"
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise UsageError(f"{who}: {flag} {_shown(url)!r} is not a database URL: write dialect[+driver]://... "
                         f"({example})") from None
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise UsageError(f"{who}: {flag} {_shown(url)!r}: no database kind {_shown(parsed.drivername)!r} "
                         f"({example})") from None
    try:
        (getattr(dialect, "import_dbapi", None) or dialect.dbapi)()
    except ImportError as e:
        module = (getattr(e, "name", None) or "").split(".")[0] or "its driver"
        package = DRIVER_PACKAGES.get(module, module)
        raise UsageError(f"{who}: {flag} {parsed.drivername}: the driver {module} is not installed: "
                         f"pip install '{package}'") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        db = Path(parsed.database).expanduser()
        if not db.parent.is_dir():
            raise UsageError(f"{who}: {flag} {_shown(url)}: the folder {_shown(str(db.parent))} does not exist: "
                             "create it or choose another path")
        writable_file(str(db), flag, who)


# ---- the device ----------------------------------------------------------------------------------------
EXECUTOR_MODULES = ("torch", "deepspeed", "transformers")


def executor_ready(device: str, who: str) -> None:
    """What a command that starts ranks needs here: the executor's libraries, and a CUDA GPU for --device cuda.
    Called after every other check: it imports torch for the CUDA question."""
    require(EXECUTOR_MODULES, who)
    if device == "cuda":
        cuda_available(who)


def cuda_available(who: str) -> None:
    """``--device cuda`` needs torch with a CUDA GPU it can see: refused in one line otherwise."""
    try:
        import torch
    except ImportError:
        raise missing_dependency("torch", who) from None
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
        raise UsageError(f"{who}: --device cuda, but torch sees no CUDA GPU here ({build}): run on a machine with "
                         "an NVIDIA GPU and driver, or pass --device cpu (small models, tests)")


# ---- the NVMe folder of a machine the config is written for ------------------------------------------------
_UNC = re.compile(r"^(\\\\|//)[^\\/]+[\\/][^\\/]+")  # \\server\share or //server/share
_DRIVE = re.compile(r"^([A-Za-z]):[\\/](.*)$")  # C:\nvme or C:/nvme
_WSL_WINDOWS_MOUNT = re.compile(r"^/mnt/[A-Za-z](/|$)")  # WSL2 mounts Windows drive C: at /mnt/c


def nvme_offload_path(path: str, os_kind: str, who: str) -> tuple[str, str | None]:
    """The NVMe offload folder as DeepSpeed on the profile's OS (linux, wsl2, windows) will read it, and a
    warning or None. Checked as text: the folder is on the machine the config is for, not necessarily this one.

    - a UNC share (``\\\\server\\share``): refused; DeepSpeed's swapper reads with O_DIRECT async I/O from a
      local file system, never a network share;
    - native Windows: refused; DeepSpeed's NVMe offload needs libaio, which Windows lacks (presets there offload
      to the CPU only);
    - a Windows drive path (``C:\\nvme``): on WSL2 it becomes ``/mnt/c/nvme`` (warned below); on Linux refused;
    - a relative path: refused (the ranks resolve it from wherever they start);
    - on WSL2, ``/mnt/<drive>/...``: warned; it is the Windows drive through WSL2's 9P file share, far slower
      than WSL's own ext4 disk.
    """
    if _UNC.match(path):
        raise UsageError(f"{who}: --nvme-path {_shown(path)} is a network share (UNC): NVMe offload reads a local "
                         "drive with O_DIRECT async I/O; pass a folder on a local NVMe drive")
    if os_kind == "windows":
        raise UsageError(f"{who}: --nvme-path on native Windows: DeepSpeed's NVMe offload needs libaio, which "
                         "Windows lacks; use --offload cpu, or run under WSL2 with a folder inside its Linux disk")
    drive = _DRIVE.match(path)
    if drive and os_kind != "wsl2":
        raise UsageError(f"{who}: --nvme-path {_shown(path)} is a Windows drive path, but the profile runs "
                         f"{os_kind}: pass a POSIX path such as /mnt/nvme/hpi")
    if drive:
        path = f"/mnt/{drive.group(1).lower()}/" + drive.group(2).replace("\\", "/")
    if not path.startswith("/"):
        raise UsageError(f"{who}: --nvme-path {_shown(path)} is relative: pass an absolute folder (the ranks resolve "
                         "a relative one from wherever they start)")
    if os_kind == "wsl2" and _WSL_WINDOWS_MOUNT.match(path):
        return path, (f"{path} is a Windows drive seen through WSL2's 9P file share: NVMe offload there is far "
                      "slower than the drive; put the folder inside WSL's own disk (e.g. under /home)")
    return path, None
