"""``hpi.processes``: pool workers end with the process that started them, however it ends (SIGKILL, SIGTERM,
Ctrl-C), and ``Interrupts`` raises SIGINT and SIGTERM as ``Interrupted`` except inside ``deferred()`` blocks.

The processes here are real: a Python child opens a ``worker_pool``, its workers print their pids, the test
signals the child and looks for the workers in /proc (issue 14: a ``timeout``-killed ``hpi validate`` left its
two workers fitting for 45 minutes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hpi.processes import Interrupted, Interrupts, exit_code, parent_death_signal

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

GONE_WITHIN_S = 5.0  # the polling fallback checks once a second


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped by init counts as gone: it runs nothing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _wait_gone(pids: list[int], within_s: float = GONE_WITHIN_S) -> list[int]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _kill_all(pids: list[int]) -> None:
    for pid in pids:  # only the workers this test started, if the code under test left them
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


POOL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from hpi import processes
    if sys.argv[1] == "polling":  # as on a system without prctl: the workers watch their parent themselves
        processes._set_parent_death_signal = lambda sig: False

    def hold(_):
        os.write(1, f"{os.getpid()}\\n".encode())  # one write: the two workers share the pipe
        time.sleep(120)

    with processes.worker_pool(2) as pool:
        futures = [pool.submit(hold, i) for i in range(2)]
        [f.result() for f in futures]
""")


def _start_pool(tmp_path: Path, how: str) -> tuple[subprocess.Popen, list[int]]:
    script = tmp_path / "pool.py"
    script.write_text(POOL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), how], stdout=subprocess.PIPE, text=True)
    workers = [int(proc.stdout.readline()) for _ in range(2)]
    assert len(set(workers)) == 2 and all(_alive(p) for p in workers)
    return proc, workers


@pytest.mark.parametrize("how", ["kernel", "polling"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_pool_workers_die_with_their_parent(tmp_path, sig, how):
    proc, workers = _start_pool(tmp_path, how)
    try:
        os.kill(proc.pid, sig)  # the parent alone: its workers get nothing from the test
        proc.wait(timeout=30)
        assert proc.returncode != 0
        assert _wait_gone(workers) == [], f"workers outlived their parent ({signal.Signals(sig).name}, {how})"
    finally:
        proc.kill()
        _kill_all(workers)


def test_pool_workers_ignore_a_ctrl_c_meant_for_the_terminal(tmp_path):
    """Ctrl-C reaches the whole process group: the workers leave the decision to their parent, which ends them."""
    proc, workers = _start_pool(tmp_path, "kernel")
    try:
        for pid in workers:
            os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        assert all(_alive(p) for p in workers) and proc.poll() is None
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
        assert _wait_gone(workers) == []
    finally:
        proc.kill()
        _kill_all(workers)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="hpi validate fits in a pool only with 2 or more cores")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=lambda s: s.name)
def test_a_killed_hpi_validate_leaves_no_worker(sig):
    """The repository's fidelity set (minutes of fits): killed once its pool is fitting, nothing is left."""
    proc = subprocess.Popen([sys.executable, "-m", "hpi.cli", "validate", "--json"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    workers: list[int] = []
    try:
        for line in proc.stderr:  # the progress lines: "fitting" comes once the pool has started
            if line.startswith("hpi validate: fitting"):
                break
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline:
            workers = _children(proc.pid)
            time.sleep(0.05)
        assert len(workers) >= 2, "hpi validate started no pool"
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        assert proc.returncode in (-sig, 128 + sig)  # killed, or stopped by a handler of hpi's
        assert _wait_gone(workers) == [], f"hpi validate's workers outlived it ({signal.Signals(sig).name})"
    finally:
        proc.kill()
        proc.wait()
        _kill_all(workers)


# ---- Interrupts -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_sigint_and_sigterm_raise_interrupted_with_the_shells_exit_code(sig):
    interrupts = Interrupts()
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as caught:
        with interrupts.installed():
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler raises long before
    assert isinstance(caught.value, KeyboardInterrupt) and caught.value.signum == sig
    assert exit_code(caught.value) == 128 + sig and interrupts.received == sig
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handlers are back


def test_a_signal_in_a_deferred_block_waits_for_its_end():
    interrupts = Interrupts()
    done = []
    with pytest.raises(Interrupted):
        with interrupts.installed():
            with interrupts.deferred():
                with interrupts.deferred():
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.05)
                    done.append("inner")
                done.append("outer")  # the inner block's end does not raise: the outer one is still open
            done.append("after")
    assert done == ["inner", "outer"]


def test_immediate_raises_a_waiting_signal_on_entry():
    interrupts = Interrupts()
    done = []
    with pytest.raises(Interrupted):
        with interrupts.installed():
            with interrupts.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                done.append("prepared")
                with interrupts.immediate():
                    done.append("ran")
    assert done == ["prepared"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_started_as_its_parent_dies_ends_instead_of_living_on():
    """The parent-death signal only fires for a parent that dies after it was set: a child whose parent was
    already gone when it set it (its parent id is not the launcher's) ends itself, and a normal one runs."""
    orphaned = subprocess.Popen(["sleep", "30"], preexec_fn=parent_death_signal(parent=os.getpid() + 1))
    assert orphaned.wait(timeout=10) == -signal.SIGTERM
    normal = subprocess.Popen([sys.executable, "-c", "pass"], preexec_fn=parent_death_signal())
    assert normal.wait(timeout=30) == 0
