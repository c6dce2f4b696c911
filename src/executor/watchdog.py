"""The heartbeat watchdog: a rank that makes no progress for the hang timeout stops the run, by name.

The channel is the one the launcher already reads: each rank's stdout, which torchrun tees to its own stdout
with a ``[rank<r>]:`` prefix (``hpi.executor.render.launch_command``: ``--tee 3``). A rank prints a heartbeat
line (``heartbeat_line``) once its stage is built and every ``HEARTBEAT_EVERY`` forwards after that (prefill,
decode steps, warm-up); each lands in its ``stdout.log`` too, so the last lines of a failed rank say how far it
got. The launcher feeds every rank's stdout lines to ``Watchdog.saw`` and asks ``Watchdog.check`` about once a
second. A rank has hung when

- it printed its first heartbeat (its stage is built: building a 70B stage can take minutes with no line,
  and is left to ``--timeout``) and then printed nothing for the hang timeout; or
- its process has been stopped (state T: SIGSTOP, a debugger) for the hang timeout, in any phase.

When one rank stops, the others soon block in a collective waiting for it and fall silent too: the stopped
rank is named first, else the one silent longest. A serving run idles between requests, so only the second
rule watches it (``hpi.executor.serve_loop`` has its own step hang detection).

The default timeout is generous: ``max(300 s, 20 x (predicted decode step + prefill))`` where the run carries a
prediction (``spec.extra["predicted"]``, from ``--hardware``), else 1800 s; ``HEARTBEAT_EVERY`` forwards take at
most 8 of the 20 predicted steps, so a healthy rank always beats in time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["HEARTBEAT", "HEARTBEAT_EVERY", "PREDICTED_STEPS", "MIN_HANG_TIMEOUT_S", "UNPREDICTED_HANG_TIMEOUT_S",
           "heartbeat_line", "is_heartbeat", "default_hang_timeout_s", "Hang", "Watchdog", "rank_of_process"]

HEARTBEAT = "hpi heartbeat:"
HEARTBEAT_EVERY = 8  # forwards between two heartbeat lines
MIN_HANG_TIMEOUT_S = 300.0
UNPREDICTED_HANG_TIMEOUT_S = 1800.0
PREDICTED_STEPS = 20  # the default timeout in predicted (decode step + prefill) times


def heartbeat_line(rank: int, what: str) -> str:
    return f"{HEARTBEAT} rank {rank} {what}"


def is_heartbeat(text: str) -> bool:
    return text.startswith(HEARTBEAT)


def default_hang_timeout_s(spec) -> float:
    """The module docstring's default for ``spec`` (a ``RunSpec``): a serving run takes its own ``hang_timeout_s``."""
    if spec.mode == "serve" and spec.serve is not None:
        return float(spec.serve.hang_timeout_s)
    predicted: Mapping[str, Any] = spec.extra.get("predicted") or {}
    step, prefill = predicted.get("decode_step_s"), predicted.get("prefill_s")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in (step, prefill)):
        return UNPREDICTED_HANG_TIMEOUT_S
    return max(MIN_HANG_TIMEOUT_S, PREDICTED_STEPS * (step + prefill))


@dataclass(frozen=True)
class Hang:
    rank: int
    silent_s: float  # since its last stdout line (since the launch when it printed none)
    stopped: bool  # its process is stopped (state T)


@dataclass
class Watchdog:
    """Per-rank progress of one node's ranks (module docstring). ``timeout_s`` inf: never fires."""

    timeout_s: float
    silent_rule: bool = True  # False for a serving run: only stopped processes count
    started: float = field(default_factory=time.monotonic)
    last_line: dict[int, float] = field(default_factory=dict)
    beating: set[int] = field(default_factory=set)  # ranks that printed a heartbeat
    stopped_since: dict[int, float] = field(default_factory=dict)

    def saw(self, rank: int, text: str, now: float | None = None) -> None:
        """A stdout line of global rank ``rank``."""
        self.last_line[rank] = time.monotonic() if now is None else now
        if is_heartbeat(text):
            self.beating.add(rank)

    def check(self, stopped: set[int], now: float | None = None) -> Hang | None:
        """``stopped``: the ranks whose process is stopped right now. The hang to stop the run for, if any."""
        now = time.monotonic() if now is None else now
        self.stopped_since = {r: self.stopped_since.get(r, now) for r in stopped}
        long_stopped = [r for r, since in self.stopped_since.items() if now - since >= self.timeout_s]
        silent = [r for r in self.beating if now - self.last_line[r] >= self.timeout_s] if self.silent_rule else []
        if not long_stopped and not silent:
            return None
        culprit = min(self.stopped_since) if self.stopped_since else min(silent, key=lambda r: (self.last_line[r], r))
        return Hang(culprit, now - self.last_line.get(culprit, self.started), culprit in self.stopped_since)


def rank_of_process(pid: int) -> int | None:
    """The global rank torchrun gave a worker process (its RANK variable); None for torchrun itself or when gone."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            try:
                return int(item[5:])
            except ValueError:
                return None
    return None
