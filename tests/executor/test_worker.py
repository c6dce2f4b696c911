"""hpi.executor.worker's process exit: a finished rank skips the interpreter's teardown, its output delivered."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("torch")

PROGRAM = """
import sys
from hpi.executor.worker import exit_now
sys.stdout.write("record-line")   # no newline: held in the pipe's buffer until flushed
sys.stderr.write("last-words")
exit_now(3)
raise SystemExit("exit_now returned")   # would print this, and exit 1, had it returned
"""


def test_exit_now_flushes_both_streams_then_exits_with_the_code_at_once():
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    assert done.stdout == "record-line"
    assert done.stderr.endswith("last-words")  # importing torch may warn first; nothing may follow

