"""The serving runtime ``hpi eval`` starts for itself when no ``--url`` names a running one.

It is ``hpi serve`` itself, started as a child process with the job's deployment flags (the plan's flags,
``--plan`` or ``--preset``), so an evaluated model runs exactly as a served one does: the same resolution and
checks (a refused flag is hpi serve's own one line, exit 2), the same ranks, scheduler and KV slots. The child:

- listens on a free port of 127.0.0.1 (``--port 0``) and writes its address to ``--url-file`` once it listens;
- takes a fresh API key (``HPI_API_KEY``) so nothing else on the machine can send it work;
- keeps its run folder (spec, DeepSpeed config, rank logs) and its stderr inside the eval entry;
- gets SIGTERM, its graceful stop, when the job ends, and by the kernel if hpi eval dies first
  (``hpi.processes.parent_death_signal``).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hpi.processes import parent_death_signal

POLL_S = 0.5
STOP_TIMEOUT_S = 120.0  # SIGTERM to exit: hpi serve drains (nothing is running by then) and stops its ranks
EXIT_USAGE = 2  # hpi serve refused its flags (hpi.cli.errors)


class RuntimeFailed(RuntimeError):
    """hpi serve stopped before it was ready: its last line, its exit code and where its output is."""

    def __init__(self, message: str, code: int | None, log: Path) -> None:
        super().__init__(message)
        self.code, self.log = code, log

    @property
    def refused(self) -> bool:
        """hpi serve refused the flags (a user's mistake, nothing started): exit 2."""
        return self.code == EXIT_USAGE


@dataclass
class ServedRuntime:
    proc: subprocess.Popen
    url: str
    api_key: str
    run_dir: Path  # hpi serve's run folder (its spec.json joins the eval's launch descriptor)
    log: Path  # hpi serve's stderr
    ready_s: float  # from start to /ready answering 200
    server: dict  # that answer: the server's own account (slots, dtype, device)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (hpi serve's graceful stop) and wait; SIGKILL to its process group after ``timeout_s``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def serve_command(serve_argv: list[str], *, run_dir: Path, url_file: Path) -> list[str]:
    """The ``hpi serve`` command line: the job's flags, then where it listens and keeps its run."""
    return [sys.executable, "-m", "hpi.cli", "serve", *serve_argv, "--host", "127.0.0.1", "--port", "0",
            "--out", str(run_dir), "--url-file", str(url_file)]


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    return lines[-1] if lines else "(no output)"


def start_runtime(serve_argv: list[str], folder: Path, *, ready: Callable[[str, str], dict | None],
                  say: Callable[[str], None] = lambda text: None) -> ServedRuntime:
    """Start ``hpi serve serve_argv`` with its run folder at ``folder/runtime`` and wait until
    ``ready(url, api_key)`` returns its ``/ready`` document (None while loading). Raises ``RuntimeFailed`` if it
    stops first."""
    run_dir, url_file, log = folder / "runtime", folder / "runtime-url.json", folder / "runtime-serve.log"
    api_key = secrets.token_urlsafe(24)
    env = {**os.environ, "HPI_API_KEY": api_key}
    started = time.monotonic()
    with log.open("w") as stderr:
        proc = subprocess.Popen(serve_command(serve_argv, run_dir=run_dir, url_file=url_file), env=env,
                                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, start_new_session=True,
                                preexec_fn=parent_death_signal())
    runtime = ServedRuntime(proc, "", api_key, run_dir, log, 0.0, {})
    try:
        said_url = False
        while True:
            if proc.poll() is not None:
                raise RuntimeFailed(_last_line(log), proc.returncode, log)
            if not runtime.url and url_file.exists():
                runtime.url = json.loads(url_file.read_text())["url"]
            if runtime.url and not said_url:
                say(f"hpi serve is loading the model at {runtime.url} (its output: {log})")
                said_url = True
            server = ready(runtime.url, api_key) if runtime.url else None
            if server is not None:
                runtime.ready_s, runtime.server = time.monotonic() - started, server
                return runtime
            time.sleep(POLL_S)
    except BaseException:
        runtime.stop()
        raise
