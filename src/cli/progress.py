"""Progress of a long command on stderr, so that stdout keeps only its results (tables, ``--json``).

    with PhaseProgress("hpi validate", {"fit": "fitting held-out plans"}, counted=("fit",), after="read") as progress:
        result = validate(manifest, progress=progress)   # progress(phase, done, total)

On a terminal: one bar, redrawn at each report (no refresh thread: the work may fork a process pool, and
forking beside a running thread is what Python warns against). Elsewhere (a pipe, a log, CI): a line when a
phase starts, and one per unit done of the ``counted`` phases (``fitting held-out plans: 13/98 [1m55s]``),
each with the time since the start. The lines begin after the phase named ``after``, the one that reads and
checks the input: an input refused there stays the one line of the CLI's error.
"""

from __future__ import annotations

import sys
import time
from typing import Mapping, TextIO


def _elapsed(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes}m{s:02d}s" if minutes else f"{s}s"


class PhaseProgress:
    """A ``progress(phase, done, total)`` callback that shows where a command is; a context manager."""

    def __init__(self, command: str, labels: Mapping[str, str], counted: tuple[str, ...] = (),
                 after: str | None = None, stream: TextIO | None = None) -> None:
        self.command = command
        self.silent = after  # the phase whose end starts the lines
        self.labels = dict(labels)
        self.counted = counted
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.phase: str | None = None
        self._bar = None
        self._task = None

    def __enter__(self) -> "PhaseProgress":
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn(f"{self.command}: {{task.description}}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(file=self.stream), auto_refresh=False,
                                 transient=True)
            self._bar.start()
            self._task = self._bar.add_task("", total=None)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, phase: str, done: int, total: int) -> None:
        if total == 0:  # a phase with nothing to do shows nothing (the command's own line says why, if it fails)
            return
        label = self.labels.get(phase, phase)
        if self._bar is not None:
            self._bar.update(self._task, description=label, completed=done, total=total, refresh=True)
            return
        if phase == self.silent:
            return
        self.silent = None
        when = _elapsed(time.monotonic() - self.started)
        if phase in self.counted:
            if phase != self.phase or done:
                self._say(f"{label}: {done}/{total} [{when}]")
        elif phase != self.phase:
            self._say(f"{label} [{when}]")
        self.phase = phase

    def _say(self, text: str) -> None:
        self.stream.write(f"{self.command}: {text}\n")
        self.stream.flush()
