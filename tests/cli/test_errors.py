"""The one error path (hpi.cli.errors): a user's mistake is one line that names the fix, exit 2; an hpi bug is
one line that names the log file holding its traceback, exit 1; HPI_DEBUG=1 prints the traceback."""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from pathlib import Path

import pytest

import hpi.cli.plan
from hpi.cli import main
from hpi.cli.errors import install_line, one_line

PLAN = ["plan", "--model", "llama-3-8b", "--hardware", "h100-sxm-1gpu"]


@pytest.fixture()
def failing(monkeypatch, tmp_path):
    """Make ``hpi plan`` raise the given exception; logs go under tmp_path/cache."""
    monkeypatch.delenv("HPI_DEBUG", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def make(exc: BaseException) -> None:
        def handler(args):
            raise exc

        monkeypatch.setattr(hpi.cli.plan, "cmd_plan", handler)

    return make


def test_an_internal_error_is_one_line_naming_its_log(failing, capsys, tmp_path):
    failing(ZeroDivisionError("integer modulo by zero"))
    assert main(PLAN) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("hpi plan: internal error: ZeroDivisionError: integer modulo by zero; "
                          "the full traceback is in ")
    log = Path(re.search(r"the full traceback is in (\S+);", err).group(1))
    assert log.parent == tmp_path / "cache" / "hpi" / "errors"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "ZeroDivisionError: integer modulo by zero" in text
    assert "argv: " + " ".join(PLAN) in text


def test_hpi_debug_prints_the_traceback_and_writes_no_log(failing, capsys, monkeypatch, tmp_path):
    failing(ZeroDivisionError("boom"))
    monkeypatch.setenv("HPI_DEBUG", "1")
    assert main(PLAN) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)") and "ZeroDivisionError: boom" in err
    last = "hpi plan: internal error: ZeroDivisionError: boom (traceback above); please report it"
    assert err.splitlines()[-1] == last
    assert not (tmp_path / "cache").exists()
    failing(ValueError("--tp 3 does not divide 32 heads"))  # a user's mistake: the traceback too, then the line
    assert main(PLAN) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1] == "hpi plan: error: --tp 3 does not divide 32 heads"


@pytest.mark.parametrize("exc, code, line", [
    (ModuleNotFoundError("No module named 'optuna'", name="optuna"), 2,
     "hpi plan: error: needs optuna, which is not installed: pip install 'hybrid-parallel-inference[autotune]'"),
    (ModuleNotFoundError("No module named 'deepspeed.ops'", name="deepspeed.ops"), 2,
     "hpi plan: error: needs deepspeed, which is not installed: pip install 'hybrid-parallel-inference[executor]'"),
    (PermissionError(errno.EACCES, "Permission denied", "/srv/runs/x/record.json"), 2,
     "hpi plan: error: /srv/runs/x/record.json: Permission denied: choose a path you may write to (or fix its "
     "permissions)"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/x"), 2,
     "hpi plan: error: /data/x: No space left on device: the disk is full: free some space or choose another path"),
])  # fmt: skip
def test_what_the_user_can_fix_is_one_line_exit_2(failing, capsys, tmp_path, exc, code, line):
    failing(exc)
    assert main(PLAN) == code
    assert capsys.readouterr().err == line + "\n"
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("exc", [ModuleNotFoundError("No module named 'nosuchthing'", name="nosuchthing"),
                                 OSError(errno.EIO, "Input/output error"), TypeError("unsupported operand")])
def test_what_the_user_cannot_fix_is_an_internal_error(failing, capsys, exc):
    failing(exc)
    assert main(PLAN) == 1
    err = capsys.readouterr().err
    assert "internal error" in err and len(err.splitlines()) == 1


def test_an_interrupt_is_exit_130(failing, capsys):
    failing(KeyboardInterrupt())
    assert main(PLAN) == 130
    assert capsys.readouterr().err == "hpi plan: interrupted\n"


def test_sigterm_stops_a_command_like_ctrl_c_exit_143_and_the_handler_is_restored(monkeypatch, capsys):
    """A real SIGTERM to this process while a command runs (before any rank or trial exists): one line, exit 143."""
    def handler(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the signal's handler raises long before this ends
        return 0

    monkeypatch.setattr(hpi.cli.plan, "cmd_plan", handler)
    before = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    assert main(PLAN) == 143
    assert time.monotonic() - started < 5
    assert capsys.readouterr().err == "hpi plan: terminated by SIGTERM\n"
    assert signal.getsignal(signal.SIGTERM) is before


def test_one_line_folds_lines_and_shortens_long_words():
    assert one_line("first\n  second\n\nthird") == "first second third"
    text = one_line("unknown model " + "x" * 5000)
    assert len(text) < 200 and "(5000 characters)" in text


def test_install_lines_name_the_extra_that_installs_a_module():
    assert install_line("optuna.samplers") == "pip install 'hybrid-parallel-inference[autotune]'"
    assert install_line("fastapi") == "pip install 'hybrid-parallel-inference[serve]'"
    assert "scripts/dev-setup.sh" in install_line("torch") and "[executor]" in install_line("torch")
    assert install_line("left_pad") is None
