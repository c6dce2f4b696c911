"""Processes hpi starts must not outlive it, and a signal must stop a command between two writes, not in one.

    with worker_pool(4) as pool:                 # workers die with hpi, however hpi ends
        futures = [pool.submit(f, x) for x in xs]

    interrupts = Interrupts()
    with interrupts.installed():                 # SIGINT and SIGTERM raise Interrupted (a KeyboardInterrupt)
        with interrupts.deferred():              # ... except here: a signal waits for the block to end
            write_both_halves()

Pool workers: each asks the kernel to kill it when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``; on
other systems a thread polls the parent), ignores SIGINT (a Ctrl-C at a terminal reaches the whole process
group: the parent decides what stops) and the pool kills its workers when the ``with`` body ends in an
exception. A ``timeout``-killed ``hpi validate`` once left its two workers fitting for 45 minutes (issue 14).

Pure: the standard library only (the planner's validation uses the pool).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_POLL_S = 1.0

__all__ = ["Interrupted", "Interrupts", "die_with_parent", "exit_code", "parent_death_signal", "signal_of",
           "worker_pool"]


# ---- workers that die with their parent ----------------------------------------------------------------


def _set_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send ``sig`` to this process when the thread that started it exits."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def parent_death_signal(parent: int | None = None) -> Callable[[], None] | None:
    """A ``preexec_fn`` for a child process hpi starts (torchrun, the server ``hpi eval`` starts): the child gets
    SIGTERM, its graceful stop, when ``parent`` (default: this process) dies. None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child
    except (OSError, AttributeError):
        return None

    parent = os.getpid() if parent is None else parent

    def set_pdeathsig() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died between fork and prctl: no signal will ever come
            signal.raise_signal(signal.SIGTERM)

    return set_pdeathsig


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _poll_parent(parent_pid: int) -> None:
    """End this process once ``parent_pid`` is gone: a child sees its parent id change (it was re-parented);
    a worker started by a fork server (not a child of ``parent_pid``) checks that the pid still exists."""
    direct = os.getppid() == parent_pid
    while (os.getppid() == parent_pid) if direct else _alive(parent_pid):
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def die_with_parent(parent_pid: int) -> None:
    """A pool worker's initializer: end when ``parent_pid`` ends (SIGKILL from the kernel, else polling)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler (``Interrupts``), if it was forked
    # The kernel's signal follows the process that forked this one: only when that is ``parent_pid`` (the fork
    # and spawn start methods; a fork server is a process of its own, then the thread polls).
    if os.getppid() == parent_pid and _set_parent_death_signal(signal.SIGKILL):
        if os.getppid() != parent_pid:  # the parent died before the request took effect: nobody waits for us
            os._exit(1)
        return
    threading.Thread(target=_poll_parent, args=(parent_pid,), daemon=True, name="hpi-parent-poll").start()


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    kill = getattr(pool, "kill_workers", None)  # Python >= 3.14
    if kill is not None:
        kill()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):  # noqa: SLF001 - no public list before 3.14
        with contextlib.suppress(OSError, ValueError, AttributeError):
            process.kill()


@contextlib.contextmanager
def worker_pool(max_workers: int) -> Iterator[ProcessPoolExecutor]:
    """A process pool whose workers end with this process: at the end of the block, when the block raises
    (the workers are killed, queued work is dropped) and when this process dies (killed by any signal)."""
    pool = ProcessPoolExecutor(max_workers=max_workers, initializer=die_with_parent, initargs=(os.getpid(),))
    try:
        yield pool
    except BaseException:
        _kill_workers(pool)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


# ---- signals as interrupts ------------------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM received: handled as Ctrl-C everywhere (``signum`` says which came)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def signal_of(e: BaseException) -> signal.Signals:
    """The signal that raised ``e``: its own (``Interrupted``), else SIGINT (a bare KeyboardInterrupt is Ctrl-C)."""
    return signal.Signals(getattr(e, "signum", signal.SIGINT))


def exit_code(e: BaseException) -> int:
    """The shell's code for a command stopped by a signal: 128 + its number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + int(signal_of(e))


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_handled(handler, signals: tuple[int, ...]) -> Iterator[None]:
    """``handler`` takes ``signals`` for the block; the previous handlers come back after it. Only the main
    thread can install one: elsewhere the block runs with the process's own handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def sigterm_as_interrupt() -> contextlib.AbstractContextManager[None]:
    """SIGTERM raised as ``Interrupted`` in the block, so it stops what runs the way Ctrl-C does."""
    return signals_handled(_raise_interrupted, (signal.SIGTERM,))


class Interrupts:
    """SIGINT and SIGTERM raised as ``Interrupted`` in the main thread, except inside ``deferred()`` blocks,
    where the signal waits until the outermost block ends (``immediate()`` lifts the deferral inside one)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._depth = 0
        self._pending: int | None = None
        self.received: int | None = None  # the last signal that came

    def _handle(self, signum: int, frame) -> None:
        self.received = signum
        if self._depth:
            self._pending = signum
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator["Interrupts"]:
        """Handle SIGINT and SIGTERM for the block (``signals_handled``: main thread only, the previous handlers
        back after it)."""
        with signals_handled(self._handle, self.SIGNALS):
            yield self

    def _raise_pending(self) -> None:
        if self._pending is not None and not self._depth:
            signum, self._pending = self._pending, None
            raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A signal in the block is raised when the outermost deferred block ends, not in the middle of it."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            self._raise_pending()

    @contextlib.contextmanager
    def immediate(self) -> Iterator[None]:
        """Inside a deferred block: signals raise at once again (one waiting is raised on entry)."""
        depth, self._depth = self._depth, 0
        try:
            self._raise_pending()
            yield
        finally:
            self._depth = depth
