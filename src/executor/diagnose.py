"""What went wrong in a run that produced no record: the rank that failed first and why, in words.

``diagnose`` reads torchrun's ChildFailedError summary (root cause first) and each rank's log folder
(``<log_dir>/<rdzv id>_<random>/attempt_0/<local rank>/{stdout,stderr}.log, error.json``) and picks the culprit:
out of memory before an error of its own before a death without words before an error that only echoes another
rank's death (a closed connection, torchrun's SIGTERM). ``where_ranks_were`` gives the last lines of every rank
(a stopped, timed-out or hung run). Moved out of ``hpi.executor.launch``, which starts and watches the processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

__all__ = ["LaunchError", "TAIL_LINES", "diagnose", "hang_error", "where_ranks_were", "attempt_dir", "tail_lines",
           "strip_prefixes"]

TAIL_LINES = 10


class LaunchError(RuntimeError):
    """A run that did not produce a record. ``str(e)`` is one fact per line, the first one the summary."""

    def __init__(self, message: str, *, rank: int | None = None, exit_code: int | None = None,
                 out_of_memory: bool = False, log_dir: str | None = None, reason: str = "failed",
                 signum: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason  # "failed" | "interrupted" | "timeout" | "hung"
        self.signum = signum  # "interrupted": SIGINT (Ctrl-C, a cancel) or SIGTERM; hpi run exits 128 + it
        self.rank = rank
        self.exit_code = exit_code
        self.out_of_memory = out_of_memory
        self.log_dir = log_dir


# Errors a rank sees because ANOTHER rank died: never the root cause when a better candidate exists.
_SECONDARY = re.compile(
    r"Connection closed by peer|remote worker crashing|Connection reset by peer|Broken pipe|"
    r"NCCL communicator was aborted|ProcessGroupNCCL.*(?:watchdog|abort)|DistStoreError|"
    r"TCPStore.*(?:failed|closed)|recvBytes|sendBytes",
    re.I,
)
_OOM = [
    re.compile(r"CUDA out of memory\.?[^\n]*", re.I),
    re.compile(r"(?:torch\.)?(?:cuda\.)?OutOfMemoryError:[^\n]*"),
    re.compile(r"DefaultCPUAllocator: can't allocate memory[^\n]*"),
    re.compile(r"\bMemoryError\b:?[^\n]*"),
    re.compile(r"Cannot allocate memory[^\n]*"),
    re.compile(r"\bout of memory\b[^\n]*", re.I),
]
_SIZE = re.compile(r"\d+(?:\.\d+)?\s*(?:[KMGTP]i?B|bytes)\b")


@dataclass
class _Failure:
    rank: int | None  # global rank
    local_rank: int
    exit_code: int | None
    root_cause: bool = False
    error_file: Path | None = None


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _parse_torchrun_failures(text: str) -> list[_Failure]:
    """The failure entries of torchrun's ChildFailedError summary, root cause(s) first."""
    if "Root Cause" not in text:
        return []
    others, _, root = text.rpartition("Root Cause")
    others = others[others.rfind("Failures:"):] if "Failures:" in others else ""
    found: list[_Failure] = []
    for block, is_root in ((root, True), (others, False)):
        for entry in re.split(r"\n\s*\[\d+\]:\s*\n", block)[1:]:
            m = re.search(r"rank\s*:\s*(-?\d+)\s*\(local_rank:\s*(\d+)\)", entry)
            if not m:
                continue
            code = re.search(r"exitcode\s*:\s*(-?\d+)", entry)
            efile = re.search(r"error_file\s*:\s*(\S+)", entry)
            path = Path(efile.group(1)) if efile and efile.group(1) != "<N/A>" else None
            found.append(_Failure(int(m.group(1)), int(m.group(2)), int(code.group(1)) if code else None,
                                  root_cause=is_root, error_file=path))
    return found


def attempt_dir(log_dir: Path) -> Path | None:
    attempts = sorted(log_dir.glob("*/attempt_*"), key=lambda p: p.stat().st_mtime)
    return attempts[-1] if attempts else None


def tail_lines(path: Path, n: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return []
    return [line.rstrip() for line in lines if line.strip()][-n:]


def where_ranks_were(log_dir: Path, per_rank: int = 2, max_ranks: int = 16) -> list[str]:
    """The last lines each local rank printed before it was stopped: where a hung run hung."""
    attempt = attempt_dir(log_dir)
    if attempt is None:
        return ["no rank had started"]
    lines = []
    ranks = sorted((d for d in attempt.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
    for d in ranks[:max_ranks]:
        tail = tail_lines(d / "stdout.log", per_rank) + tail_lines(d / "stderr.log", per_rank)
        lines.append(f"local rank {d.name} last printed: " + (" | ".join(strip_prefixes(t).strip() for t in tail)
                                                              if tail else "nothing"))
    return lines


def _error_json_message(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        msg = doc.get("message", {})
        return msg.get("message") if isinstance(msg, dict) else str(msg)
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def strip_prefixes(line: str) -> str:
    """Drop torch's ``[rank0]:`` line prefixes, keep the indentation after them."""
    return re.sub(r"^(?:\[(?:rank|default)?\d+\]: ?)+", "", line).rstrip()


def _out_of_memory(texts: Iterable[str]) -> str | None:
    """The out-of-memory statement of a log, if any: its line, trimmed, figures kept."""
    lines = [strip_prefixes(line) for text in texts for line in text.splitlines()]
    for pattern in _OOM:
        for line in reversed(lines):
            m = pattern.search(line)
            if m:
                statement = re.sub(r"^(?:torch\.)?(?:cuda\.)?(?:OutOfMemoryError|MemoryError|RuntimeError):\s*", "",
                                   m.group(0).strip()).strip()
                return statement[:400] or "out of memory"
    return None


def diagnose(returncode: int, torchrun_stderr: str, log_dir: Path, node_rank: int, nproc: int) -> LaunchError:
    attempt = attempt_dir(log_dir)
    failures = _parse_torchrun_failures(torchrun_stderr)
    if not failures and attempt is not None:  # no summary (torchrun itself died): look at the rank folders
        for d in sorted(attempt.iterdir(), key=lambda p: p.name):
            if d.is_dir() and d.name.isdigit() and (d / "error.json").is_file():
                failures.append(_Failure(None, int(d.name), None, error_file=d / "error.json"))

    def logs_of(f: _Failure) -> dict[str, list[str]]:
        if attempt is None:
            return {}
        d = attempt / str(f.local_rank)
        return {name: tail_lines(d / name, 200) for name in ("stdout.log", "stderr.log")}

    def score(f: _Failure) -> tuple[int, int]:
        texts = ["\n".join(v) for v in logs_of(f).values()] + [_error_json_message(f.error_file) or ""]
        joined = "\n".join(texts)
        if _out_of_memory(texts):
            kind = 0
        elif _SECONDARY.search(joined) or f.exit_code == -signal.SIGTERM:
            kind = 3
        elif f.error_file is not None and f.error_file.is_file():
            kind = 1
        else:
            kind = 2
        return kind, 0 if f.root_cause else 1

    if not failures:
        tail = [line.rstrip() for line in torchrun_stderr.splitlines() if line.strip()][-TAIL_LINES:]
        lines = [f"torchrun exited with code {returncode} before any rank reported a failure",
                 f"logs: {log_dir}", "last lines of torchrun:"] + [f"  | {line}" for line in tail]
        return LaunchError("\n".join(lines), exit_code=returncode, log_dir=str(log_dir))

    culprit = min(failures, key=score)
    logs = logs_of(culprit)
    rank = culprit.rank if culprit.rank is not None else node_rank * nproc + culprit.local_rank
    where = f"rank {rank} (node {node_rank}, local rank {culprit.local_rank})"
    code = culprit.exit_code
    if code is None:
        how = "failed"
    elif code < 0:
        how = f"was killed by {_signal_name(code)}"
    else:
        how = f"exited with code {code}"
    error_message = _error_json_message(culprit.error_file)
    oom = _out_of_memory(["\n".join(v) for v in logs.values()] + [error_message or ""])
    lines = [f"{where} ran out of memory: {oom}" if oom else f"{where} {how}"]
    if oom:
        sizes = _SIZE.findall(oom)
        lines.append(f"{where} {how}" + (f"; figures: {', '.join(sizes)}" if sizes else ""))
    elif code == -signal.SIGKILL and not error_message:
        lines.append("a SIGKILL with no error in the log is usually the kernel's out-of-memory killer: see dmesg")
    if error_message and not oom:
        lines.append(f"error: {error_message[:400]}")
    others = [f for f in failures if f is not culprit]
    if others:
        lines.append("then: " + "; ".join(
            f"rank {f.rank} " + ("stopped by torchrun (SIGTERM)" if f.exit_code == -signal.SIGTERM else
                                 f"exit code {f.exit_code}") for f in others))
    if attempt is not None:
        lines.append(f"log: {attempt / str(culprit.local_rank)}")
    for name, tail in logs.items():
        if tail:
            lines.append(f"last lines of rank {rank} {name}:")
            lines += [f"  | {strip_prefixes(line)}" for line in tail[-TAIL_LINES:]]
    return LaunchError("\n".join(lines), rank=rank, exit_code=code, out_of_memory=bool(oom), log_dir=str(log_dir))


def hang_error(hang, timeout_s: float, log_dir: Path, local_rank: int) -> LaunchError:
    """The watchdog's verdict (``hpi.executor.watchdog.Hang``) in words: the rank, why, its last lines (its
    heartbeats: how far it got), then where every rank was."""
    why = ("its process has been stopped (SIGSTOP or a debugger)" if hang.stopped
           else f"it printed nothing for {hang.silent_s:.0f} s")
    lines = [f"rank {hang.rank} (local rank {local_rank}) made no progress: {why}; hang timeout {timeout_s:g} s "
             f"(--hang-timeout)", f"logs: {log_dir}"]
    attempt = attempt_dir(log_dir)
    tail = tail_lines(attempt / str(local_rank) / "stdout.log", 3) if attempt is not None else []
    if tail:
        lines.append(f"last lines of rank {hang.rank} stdout.log:")
        lines += [f"  | {strip_prefixes(line)}" for line in tail]
    return LaunchError("\n".join(lines + where_ranks_were(log_dir)), rank=hang.rank, log_dir=str(log_dir),
                       reason="hung")
