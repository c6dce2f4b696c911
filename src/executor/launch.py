"""Start a run's ranks, watch them, and bring back the RunRecord or a clear failure. The only code that
starts processes.

``launch(spec)`` takes the run folder's lock (``hpi.executor.rundir``: a folder another run holds is refused),
binds the rendezvous port on the master address (``hpi.executor.torchrun``), writes ``<out_dir>/spec.json``,
starts torchrun (``render.launch_command``) in a new session, streams rank 0's stdout lines to a callback as
they come, feeds every rank's lines to the watchdog (``hpi.executor.watchdog``), and waits:

- success: rank 0 wrote ``<out_dir>/record.json`` (its last stdout line is the same JSON document, the
  fallback when the file is missing) -> the ``hpi.records.RunRecord`` (on another node: a ``NodeSummary``);
- failure: ``LaunchError`` naming the rank that failed first, its exit code or signal, out-of-memory in
  words with the figures its log shows, and the last lines of its log;
- Ctrl-C, SIGTERM, timeout or a hung rank: the whole tree is stopped (SIGTERM, then SIGKILL after a grace
  period) and ``LaunchError("interrupted" | "terminated by SIGTERM" | "timed out after N s" | "rank R ... made
  no progress ...")`` is raised (``hpi.executor.diagnose`` words every failure).

No process outlives ``launch``: torchrun starts each worker in a session of its own (its
``subprocess_handler`` passes ``start_new_session=True``), so killing torchrun's process group is not
enough; the launcher tracks torchrun's descendants while they run (``/proc``) and kills any survivor itself.

Logs: ``<out_dir>/logs/node<k>/`` holds torchrun's own output (``torchrun.log``) and, under
``hpi_<random>/attempt_0/<local rank>/``, each rank's ``stdout.log``, ``stderr.log`` and ``error.json``
(written when the worker's entry point is wrapped in torch's ``@record``).
"""

from __future__ import annotations

import collections
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from hpi.atomic import write_json
from hpi.executor.diagnose import LaunchError, diagnose, hang_error, where_ranks_were
from hpi.executor.render import DEFAULT_WORKER, MULTICAST_OFF_ENV, launch_command
from hpi.executor.rundir import hold_for_launch
from hpi.executor.spec import RunSpec
from hpi.executor.torchrun import LISTEN_FD_ENV, bind_listener, interface_of
from hpi.executor.watchdog import Hang, Watchdog, default_hang_timeout_s, is_heartbeat, rank_of_process
from hpi.processes import parent_death_signal, signal_of, sigterm_as_interrupt
from hpi.records import RecordError, RunRecord

__all__ = ["LaunchError", "NodeSummary", "launch", "start", "launch_env", "free_port", "WORKER", "RECORD_FILE",
           "SPEC_FILE"]

SPEC_FILE = "spec.json"
RECORD_FILE = "record.json"
LOG_PREFIX_TEMPLATE = "[rank${rank}]:"  # torchrun's console prefix: the GLOBAL rank
WORKER: tuple[str, ...] = DEFAULT_WORKER  # tests point this at a stand-in worker
GRACE_S = 5.0  # SIGTERM -> SIGKILL

_CONSOLE_LINE = re.compile(r"^\[rank(\d+)\]:(.*)$", re.S)


@dataclass(frozen=True)
class NodeSummary:
    """What ``launch`` returns on a node other than 0 (which does not run rank 0 and so holds no record)."""

    node_rank: int
    nnodes: int
    local_world_size: int  # ranks this node ran
    log_dir: str

    def to_json(self) -> dict[str, Any]:
        return {"node_rank": self.node_rank, "nnodes": self.nnodes, "local_world_size": self.local_world_size,
                "log_dir": self.log_dir}


# ---- environment and ports ----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free right now on this host (the OS picks it; another process could still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def launch_env(spec: RunSpec, *, visible_gpus: Sequence[int] | None = None,
               base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment torchrun and its ranks get: ``base`` (default ``os.environ``) plus

    - always: NVLink multicast off (``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``,
      ``NVSHMEM_DISABLE_NVLS=1``), unbuffered Python output, torchrun's console prefix ``[rank<r>]:``;
    - ``device == "cpu"``: ``DS_ACCELERATOR=cpu`` (DeepSpeed on the CPU, gloo) and ``OMP_NUM_THREADS=1``
      (one thread per rank: ranks share the cores); CUDA_VISIBLE_DEVICES is left alone;
    - ``visible_gpus``: ``CUDA_VISIBLE_DEVICES`` in local-rank order (local rank i drives ``visible_gpus[i]``).
    """
    env = dict(os.environ if base is None else base)
    env.update(MULTICAST_OFF_ENV)
    env["PYTHONUNBUFFERED"] = "1"
    env["TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"] = LOG_PREFIX_TEMPLATE
    if spec.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env["OMP_NUM_THREADS"] = "1"
    if visible_gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(int(g)) for g in visible_gpus)
    return env


# ---- processes ----------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time in clock ticks) of a live process, from /proc; None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    rest = text.rsplit(")", 1)[-1].split()
    try:
        return int(rest[1]), rest[0], int(rest[19])
    except (IndexError, ValueError):
        return None


def _descendants(root: int) -> dict[int, int]:
    """``{pid: start time}`` of every live descendant of ``root`` (empty where /proc is missing)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    starts: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return {}
    for name in entries:
        if not name.isdigit():
            continue
        st = _proc_stat(int(name))
        if st is not None and st[1] != "Z":
            children[st[0]].append(int(name))
            starts[int(name)] = st[2]
    found: dict[int, int] = {}
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        if pid in found or pid not in starts:
            continue
        found[pid] = starts[pid]
        todo.extend(children.get(pid, ()))
    return found


def _alive(pid: int, start: int) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[1] != "Z" and st[2] == start


def _signal(pid: int, start: int, sig: int) -> None:
    if _alive(pid, start):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class _Torchrun:
    """One torchrun process, its output pumps and the descendants seen so far."""

    proc: Any
    stdout_q: "queue.Queue[str | None]" = field(default_factory=queue.Queue)
    stderr_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=2000))
    tracked: dict[int, int] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)
    last_track: float = 0.0
    ranks: dict[int, int | None] = field(default_factory=dict)  # worker pid -> its global rank

    def start_pumps(self, log_path: Path) -> None:
        def pump_stdout() -> None:
            for line in self.proc.stdout:
                self.stdout_q.put(line)
            self.stdout_q.put(None)

        def pump_stderr() -> None:
            with open(log_path, "a", encoding="utf-8", errors="replace") as log:
                for line in self.proc.stderr:
                    log.write(line)
                    log.flush()
                    self.stderr_tail.append(line)

        for target in (pump_stdout, pump_stderr):
            t = threading.Thread(target=target, daemon=True, name=f"hpi-{target.__name__}")
            t.start()
            self.threads.append(t)

    def track(self, every_s: float = 0.5) -> None:
        now = time.monotonic()
        if now - self.last_track >= every_s and self.proc.poll() is None:
            self.tracked.update(_descendants(self.proc.pid))
            self.last_track = now

    def stopped_ranks(self) -> set[int]:
        """The global ranks whose worker process (a child of torchrun) is stopped (state T) right now."""
        stopped = set()
        for pid, start in list(self.tracked.items()):
            st = _proc_stat(pid)
            if st is None or st[2] != start or st[0] != self.proc.pid or st[1] not in ("T", "t"):
                continue
            if pid not in self.ranks:
                self.ranks[pid] = rank_of_process(pid)
            if self.ranks[pid] is not None:
                stopped.add(self.ranks[pid])
        return stopped

    def survivors(self) -> dict[int, int]:
        return {pid: start for pid, start in self.tracked.items() if _alive(pid, start)}

    def terminate(self, grace_s: float) -> None:
        """SIGTERM torchrun's group and every rank, wait ``grace_s``, then SIGKILL whatever is left.

        A second Ctrl-C during the grace period skips straight to SIGKILL.
        """
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is None:
                self.tracked.update(_descendants(self.proc.pid))
                try:
                    os.killpg(self.proc.pid, sig)  # torchrun's own group; it forwards SIGTERM to its workers
                except (ProcessLookupError, PermissionError):
                    pass
            for pid, start in self.survivors().items():
                _signal(pid, start, sig)
                if sig == signal.SIGTERM:
                    _signal(pid, start, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
            deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
            try:
                while time.monotonic() < deadline and (self.proc.poll() is None or self.survivors()):
                    self.track(every_s=0.25)  # ranks torchrun was still starting
                    time.sleep(0.05)
            except KeyboardInterrupt:
                continue
            if self.proc.poll() is not None and not self.survivors():
                break
        self.proc.wait()

    def close(self) -> None:
        """After torchrun exited: kill any descendant it left behind, drain the pipes."""
        for pid, start in self.survivors().items():
            _signal(pid, start, signal.SIGKILL)
        for t in self.threads:
            t.join(timeout=5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass


# ---- launch -------------------------------------------------------------------------------------------


def start(deployment, *, timeout_s: float | None = None, stream: Callable[[str], Any] | None = None,
          grace_s: float = GRACE_S, extra_env: dict[str, str] | None = None,
          cancel: threading.Event | None = None, hang_timeout_s: float | None = None) -> RunRecord | NodeSummary:
    """Start a resolved deployment (``hpi.deployment.resolve_deployment``) on this node and wait: the one path
    by which ``hpi run`` and autotune's real trials start ranks. Returns what ``launch`` returns."""
    nodes = deployment.nodes
    return launch(deployment.spec, nnodes=nodes.nnodes, node_rank=nodes.node_rank, master_addr=nodes.master_addr,
                  master_port=nodes.master_port, timeout_s=timeout_s, stream=stream,
                  nproc_per_node=deployment.nproc_per_node,
                  visible_gpus=list(deployment.visible_gpus) if deployment.visible_gpus is not None else None,
                  grace_s=grace_s, extra_env=extra_env, cancel=cancel, hang_timeout_s=hang_timeout_s)


def launch(
    spec: RunSpec,
    *,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    timeout_s: float | None = None,
    stream: Callable[[str], Any] | None = None,
    nproc_per_node: int | None = None,
    visible_gpus: Sequence[int] | None = None,
    worker: Sequence[str] | None = None,
    python: str = sys.executable,
    grace_s: float = GRACE_S,
    extra_env: dict[str, str] | None = None,
    cancel: threading.Event | None = None,
    hang_timeout_s: float | None = None,
) -> RunRecord | NodeSummary:
    """Run ``spec`` on this node's ranks and wait; return the RunRecord (node 0) or a ``NodeSummary``.

    ``nproc_per_node`` defaults to ``world_size / nnodes``. ``master_port`` defaults to a free port on one
    node; several nodes must agree on one. ``stream`` gets each stdout line of global rank 0 (without the
    newline) as it comes, in this thread, so an exception it raises (KeyboardInterrupt) stops the run.
    ``worker`` replaces ``("-m", "hpi.executor.worker")`` (tests). ``extra_env`` adds variables to the ranks'
    environment (``hpi serve``'s key); setting ``cancel`` stops the ranks like Ctrl-C from another thread
    (``LaunchError`` reason "interrupted"), and so does SIGTERM (``LaunchError.signum`` says which).
    ``hang_timeout_s``: a rank without progress this long stops the run (``hpi.executor.watchdog``; None: its
    default from the prediction, 0: no watchdog). A serving run writes no record: it returns a ``NodeSummary``.
    """
    out_dir = Path(spec.out_dir)
    world = spec.world_size
    if nproc_per_node is None:
        if world % nnodes:
            raise ValueError(f"world size {world} % nnodes({nnodes}) != 0: pass nproc_per_node for uneven nodes")
        nproc_per_node = world // nnodes
    if nnodes > 1 and master_port is None:
        raise ValueError("several nodes must agree on one rendezvous port: pass master_port")
    # node 0's rendezvous store listens on master_addr only (hpi.executor.torchrun); bound here, so the port is
    # ours from now on and an address or port that cannot serve is refused before anything is written
    listener = bind_listener(master_addr, master_port or 0) if node_rank == 0 else None
    port = listener.getsockname()[1] if listener is not None else master_port
    lock = None
    try:
        lock = hold_for_launch(out_dir, node_rank)  # a busy folder: RunFolderBusy, before anything is written
        spec_path = spec.write(out_dir / SPEC_FILE).resolve()
        record_path = out_dir / RECORD_FILE
        if node_rank == 0:
            record_path.unlink(missing_ok=True)  # a stale record must not pass for this run's
        log_dir = out_dir / "logs" / f"node{node_rank}"
        shutil.rmtree(log_dir, ignore_errors=True)
        log_dir.mkdir(parents=True)
        argv = launch_command(
            str(spec_path), nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
            master_port=port, log_dir=str(log_dir), python=python, worker=tuple(WORKER if worker is None else worker),
        )
        write_json(log_dir / "command.json", {"argv": argv})
        env = {**launch_env(spec, visible_gpus=visible_gpus), **(extra_env or {})}
        if listener is not None:
            env[LISTEN_FD_ENV] = str(listener.fileno())
        interface = interface_of(master_addr) if "GLOO_SOCKET_IFNAME" not in env else None
        if interface is not None:  # the ranks' gloo sockets listen where the rendezvous does, not on every address
            env["GLOO_SOCKET_IFNAME"] = interface
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            encoding="utf-8", errors="replace", bufsize=1, env=env, start_new_session=True,
            preexec_fn=parent_death_signal(), pass_fds=() if listener is None else (listener.fileno(),),
        )
        if listener is not None:
            listener.close()  # torchrun holds it now
        run = _Torchrun(proc)
        run.start_pumps(log_dir / "torchrun.log")
        try:
            rank0_last = _watch(run, log_dir, stream=stream, timeout_s=timeout_s, cancel=cancel, grace_s=grace_s,
                                watchdog=_watchdog(spec, hang_timeout_s), local_rank0=node_rank * nproc_per_node)
        finally:
            run.close()
        if proc.returncode != 0:
            raise diagnose(proc.returncode, "".join(run.stderr_tail), log_dir, node_rank, nproc_per_node)
        if node_rank != 0 or spec.mode == "serve":
            return NodeSummary(node_rank, nnodes, nproc_per_node, str(log_dir))
        return _read_record(record_path, rank0_last, log_dir)
    finally:
        if listener is not None:
            listener.close()
        if lock is not None:
            lock.release()


@dataclass
class _Hung(Exception):
    hang: Hang


def _watch(run: _Torchrun, log_dir: Path, *, stream: Callable[[str], Any] | None, timeout_s: float | None,
           cancel: threading.Event | None, grace_s: float, watchdog: Watchdog | None, local_rank0: int) -> str:
    """Relay rank 0's lines and wait for torchrun to exit; stop every rank on Ctrl-C, SIGTERM, ``cancel``, the
    timeout or a hung rank (``LaunchError``). Every rank's stdout lines feed the watchdog; heartbeat lines are
    not relayed. ``local_rank0``: the global rank of this node's local rank 0. Returns rank 0's last non-empty
    stdout line (the record's fallback)."""
    proc, started, rank0_last, checked = run.proc, time.monotonic(), "", 0.0
    # SIGTERM stops the run like Ctrl-C (ranks stopped, the same message) instead of ending the launcher at once;
    # a second one during the teardown skips to SIGKILL like a second Ctrl-C (main thread only: hpi.processes)
    with sigterm_as_interrupt():
        try:
            eof = False
            while not eof or proc.poll() is None:
                try:
                    line = run.stdout_q.get(timeout=0.1)
                except queue.Empty:
                    line = ""
                if line is None:
                    eof = True
                elif line:
                    m = _CONSOLE_LINE.match(line)
                    rank, text = (int(m.group(1)), m.group(2).rstrip("\r\n")) if m else (None, "")
                    if rank is not None and watchdog is not None:
                        watchdog.saw(rank, text)
                    if rank == 0 and not is_heartbeat(text):
                        if text.strip():
                            rank0_last = text
                        if stream is not None:
                            stream(text)
                run.track()
                now = time.monotonic()
                if timeout_s is not None and now - started > timeout_s:
                    raise TimeoutError
                if cancel is not None and cancel.is_set():
                    raise KeyboardInterrupt
                if watchdog is not None and now - checked >= 1.0:
                    checked = now
                    hang = watchdog.check(run.stopped_ranks(), now)
                    if hang is not None:
                        raise _Hung(hang)
                if eof and proc.poll() is None:
                    time.sleep(0.05)
        except KeyboardInterrupt as e:
            run.terminate(grace_s)
            terminated = signal_of(e) == signal.SIGTERM
            raise LaunchError("\n".join(["terminated by SIGTERM" if terminated else "interrupted", f"logs: {log_dir}",
                                         *where_ranks_were(log_dir)]), log_dir=str(log_dir), reason="interrupted",
                              signum=signal.SIGTERM if terminated else signal.SIGINT) from None
        except TimeoutError:
            run.terminate(grace_s)
            raise LaunchError("\n".join([f"timed out after {timeout_s:g} s", f"logs: {log_dir}",
                                         *where_ranks_were(log_dir)]),
                              log_dir=str(log_dir), reason="timeout") from None
        except _Hung as h:
            run.terminate(grace_s)
            raise hang_error(h.hang, watchdog.timeout_s, log_dir, h.hang.rank - local_rank0) from None
        except BaseException:
            run.terminate(grace_s)
            raise
    proc.wait()
    return rank0_last


def _watchdog(spec: RunSpec, hang_timeout_s: float | None) -> Watchdog | None:
    timeout = default_hang_timeout_s(spec) if hang_timeout_s is None else hang_timeout_s
    return Watchdog(timeout, silent_rule=spec.mode != "serve") if timeout > 0 else None


def _read_record(path: Path, last_line: str, log_dir: Path) -> RunRecord:
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise LaunchError(f"rank 0 wrote a malformed record {path}: {e.msg} at line {e.lineno}\nlogs: {log_dir}",
                              rank=0, log_dir=str(log_dir)) from None
    else:
        try:
            record = json.loads(last_line)
        except json.JSONDecodeError:
            raise LaunchError(
                f"every rank exited 0 but rank 0 left no record: expected {path} or a JSON document as its last "
                f"stdout line\nlast stdout line of rank 0: {last_line[:300]!r}\nlogs: {log_dir}",
                rank=0, exit_code=0, log_dir=str(log_dir)) from None
    if not isinstance(record, dict):
        raise LaunchError(f"rank 0's record is a JSON {type(record).__name__}, not an object\nlogs: {log_dir}",
                          rank=0, log_dir=str(log_dir))
    try:
        return RunRecord.from_json(record)
    except RecordError as e:
        raise LaunchError(f"rank 0 wrote a record hpi cannot read: {e}\nlogs: {log_dir}", rank=0,
                          log_dir=str(log_dir)) from None
