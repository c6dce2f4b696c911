"""``hpi.cli.progress.PhaseProgress``: plain lines into a pipe (none while the input is read), a bar on a terminal."""

from __future__ import annotations

import io
import re

from hpi.cli.progress import PhaseProgress

LABELS = {"read": "reading", "fit": "fitting folds", "predict": "predicting"}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _drive(progress: PhaseProgress) -> None:
    with progress:
        for done in range(3):
            progress("read", done, 2)
        for done in range(4):
            progress("fit", done, 3)
        progress("predict", 0, 1)
        progress("predict", 1, 1)


def test_into_a_pipe_a_line_per_phase_and_per_counted_unit_after_the_input_is_read():
    out = io.StringIO()
    _drive(PhaseProgress("hpi x", LABELS, counted=("fit",), after="read", stream=out))
    lines = [re.sub(r" \[\d+s\]$", "", line) for line in out.getvalue().splitlines()]
    assert lines == ["hpi x: fitting folds: 0/3", "hpi x: fitting folds: 1/3", "hpi x: fitting folds: 2/3",
                     "hpi x: fitting folds: 3/3", "hpi x: predicting"]


def test_without_after_every_phase_is_announced_once():
    out = io.StringIO()
    _drive(PhaseProgress("hpi x", LABELS, stream=out))
    assert [re.sub(r" \[\d+s\]$", "", line) for line in out.getvalue().splitlines()] == [
        "hpi x: reading", "hpi x: fitting folds", "hpi x: predicting"]


def test_on_a_terminal_one_bar_is_redrawn_and_removed_at_the_end():
    out = Terminal()
    _drive(PhaseProgress("hpi x", LABELS, counted=("fit",), after="read", stream=out))
    drawn = out.getvalue()
    assert "\r\x1b[2Khpi x: fitting folds " in drawn and "3/3" in drawn  # redrawn over itself (carriage return)
    assert "fitting folds: " not in drawn  # no plain lines
    assert drawn.endswith("\x1b[1A\x1b[2K")  # erased at the end: the command's own output follows


def test_a_phase_with_nothing_to_do_shows_nothing():
    out = io.StringIO()
    with PhaseProgress("hpi x", LABELS, counted=("fit",), after="read", stream=out) as progress:
        progress("read", 0, 0)
        progress("fit", 0, 0)
        progress("predict", 0, 0)
    assert out.getvalue() == ""
