"""The one error path of the ``hpi`` command line.

Every failure ends in exactly one line on stderr:

- a failure the user can fix (an argument, a file, a path, a permission, a database URL, a missing optional
  dependency, no CUDA for ``--device cuda``) names the fix and exits 2 (``EXIT_USAGE``);
- anything else is an hpi bug: one line that says where the full traceback was written (a log file), exit 1
  (``EXIT_INTERNAL``).

``HPI_DEBUG=1`` prints the traceback on stderr as well (before the line). Importing this module stays cheap.
"""

from __future__ import annotations

import datetime as _dt
import errno
import importlib.util
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Sequence

EXIT_USAGE = 2
EXIT_INTERNAL = 1
DEBUG_ENV = "HPI_DEBUG"
DIST = "hybrid-parallel-inference"  # the distribution that installs the hpi package (pyproject's name)


class UsageError(Exception):
    """Anything the user can fix: printed as one line, exit code 2."""


# ---- optional dependencies ---------------------------------------------------------------------------
# The modules pyproject's extras install, by the extra that installs them.
EXTRAS: dict[str, str] = {
    "optuna": "autotune", "sqlalchemy": "autotune",
    "fastapi": "serve", "uvicorn": "serve", "openai": "serve",
    "lm_eval": "eval",
    "transformers": "executor", "deepspeed": "executor", "safetensors": "executor", "accelerate": "executor",
}  # fmt: skip
# What the base install brings (a broken environment: reinstalling hpi fixes it).
BASE_MODULES = ("numpy", "scipy", "networkx", "yaml", "rich", "matplotlib")
TORCH_LINE = ("install torch first (bash scripts/dev-setup.sh pins the CPU build; pip install torch for a CUDA one), "
              f"then pip install '{DIST}[executor]'")


def install_line(module: str) -> str | None:
    """The command that installs ``module`` (a top-level name) for hpi, or None when hpi does not depend on it."""
    top = module.split(".")[0]
    if top == "torch":
        return TORCH_LINE
    if top in EXTRAS:
        return f"pip install '{DIST}[{EXTRAS[top]}]'"
    if top in BASE_MODULES:
        return f"pip install '{DIST}'"
    return None


def missing_dependency(module: str, who: str) -> UsageError:
    """The one line for a missing optional dependency: who needs it and the install command."""
    return UsageError(f"{who} needs {module.split('.')[0]}, which is not installed: {install_line(module)}")


def require(modules: Sequence[str], who: str) -> None:
    """Refuse (``UsageError``) before anything starts when one of ``modules`` cannot be imported; imports
    nothing (``importlib.util.find_spec``)."""
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module set to None in sys.modules
            found = False
        if not found:
            raise missing_dependency(module, who)


# ---- one line -----------------------------------------------------------------------------------------
_LONG_WORD = re.compile(r"\S{121,}")


def _shorten(match: re.Match) -> str:
    word = match.group(0)
    return f"{word[:60]}...({len(word)} characters)...{word[-20:]}"


def one_line(message: str) -> str:
    """``message`` on one line: line breaks folded, over-long words (a 5,000-character --model) shortened."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return _LONG_WORD.sub(_shorten, text)


_OS_FIXES = {
    errno.EACCES: "choose a path you may write to (or fix its permissions)",
    errno.EPERM: "choose a path you may write to (or fix its permissions)",
    errno.EROFS: "it is on a read-only file system: choose another path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder: name a file",
    errno.ENAMETOOLONG: "use a shorter name",
    errno.ENOSPC: "the disk is full: free some space or choose another path",
    errno.EEXIST: "it exists already: choose another path",
    errno.EADDRINUSE: "the address is in use: choose another port",
    errno.EADDRNOTAVAIL: "this machine has no such address: choose another host",
}


def os_error_line(e: OSError) -> str | None:
    """One line for an OSError the user can fix (a path, a permission, a port), or None for one they cannot."""
    fix = _OS_FIXES.get(e.errno)
    if fix is None:
        return None
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or os.strerror(e.errno)}: {fix}"


def user_line(e: BaseException) -> str | None:
    """The one line of a failure the user can fix, or None for an internal error."""
    from hpi.planner.catalog import ModelConfigError
    from hpi.planner.profiles import ProfileError

    if isinstance(e, (UsageError, ModelConfigError, ProfileError, ValueError)):
        return str(e)
    if isinstance(e, ModuleNotFoundError) and e.name and install_line(e.name):
        return f"needs {e.name.split('.')[0]}, which is not installed: {install_line(e.name)}"
    if isinstance(e, OSError):
        return os_error_line(e)
    return None


# ---- the report ---------------------------------------------------------------------------------------
def log_dir() -> Path:
    """Where internal errors' tracebacks go: ``$XDG_CACHE_HOME/hpi/errors`` (``~/.cache/hpi/errors``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "hpi" / "errors"


def write_log(e: BaseException, argv: Sequence[str]) -> Path | None:
    """The full traceback in a new log file (the cache folder, else the temp folder); None when neither takes it."""
    from hpi import __version__

    stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    text = (f"hpi {__version__}, Python {sys.version.split()[0]}, {stamp}\n"
            f"argv: {' '.join(argv)}\n\n" + "".join(traceback.format_exception(type(e), e, e.__traceback__)))
    for folder in (log_dir(), Path(tempfile.gettempdir()) / "hpi-errors"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"hpi-{stamp}-{os.getpid()}.log"
            path.write_text(text)
            return path
        except OSError:
            continue
    return None


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def report(e: BaseException, prog: str, argv: Sequence[str]) -> int:
    """Print ``e`` as one line on stderr (after its traceback with HPI_DEBUG=1); the exit code."""
    if debugging():
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    line = user_line(e)
    if line is not None:
        line = one_line(line)
        sys.stderr.write((line if line.startswith("hpi") else f"{prog}: error: {line}") + "\n")
        return EXIT_USAGE
    what = one_line(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    if debugging():
        sys.stderr.write(f"{prog}: internal error: {what} (traceback above); please report it\n")
        return EXIT_INTERNAL
    log = write_log(e, argv)
    where = f"the full traceback is in {log}" if log else "no log could be written: HPI_DEBUG=1 prints the traceback"
    sys.stderr.write(f"{prog}: internal error: {what}; {where}; please report it\n")
    return EXIT_INTERNAL
