"""The heartbeat watchdog (hpi.executor.watchdog) and SIGTERM to the launcher.

The rules are tested on their own with made-up clocks; the launch tests use the stand-in worker (fake_worker.py,
mode ``beat``: ranks print heartbeats) for a stopped rank and a silent one; one test stops a rank of a real
tiny-llama tp 2 run on the CPU.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hpi.executor.launch import LaunchError, launch
from hpi.executor.spec import RunSpec, ServeSpec
from hpi.executor.watchdog import (
    HEARTBEAT_EVERY,
    PREDICTED_STEPS,
    UNPREDICTED_HANG_TIMEOUT_S,
    Watchdog,
    default_hang_timeout_s,
    heartbeat_line,
    is_heartbeat,
)
from hpi.planner.specs.plan import Plan
from hpi.planner.specs.workload import Workload

FAKE = str(Path(__file__).with_name("fake_worker.py"))
WORKER = (FAKE,)


# ---- the rules --------------------------------------------------------------------------------------------


def test_the_default_timeout_is_generous_and_follows_the_prediction():
    spec = RunSpec(plan=Plan(), model="tiny-llama")
    assert default_hang_timeout_s(spec) == UNPREDICTED_HANG_TIMEOUT_S == 1800  # no --hardware: no prediction
    fast = RunSpec(plan=Plan(), model="m", extra={"predicted": {"decode_step_s": 0.05, "prefill_s": 0.2}})
    assert default_hang_timeout_s(fast) == 300  # max(300 s, 20 x 0.25 s)
    slow = RunSpec(plan=Plan(), model="m", extra={"predicted": {"decode_step_s": 16.0, "prefill_s": 9.0}})
    assert default_hang_timeout_s(slow) == 20 * 25.0
    broken = RunSpec(plan=Plan(), model="m", extra={"predicted": {"decode_step_s": float("nan"), "prefill_s": 1}})
    assert default_hang_timeout_s(broken) == UNPREDICTED_HANG_TIMEOUT_S
    serve = RunSpec(plan=Plan(), model="m", mode="serve",
                    serve=ServeSpec(n_slots=2, max_model_len=64, step_tokens=64, address=("127.0.0.1", 1),
                                    hang_timeout_s=42))
    assert default_hang_timeout_s(serve) == 42  # hpi serve --hang-timeout: one figure for both detectors
    assert HEARTBEAT_EVERY < PREDICTED_STEPS  # a healthy rank beats well within the predicted steps the default allows


def test_a_silent_rank_is_caught_only_after_it_has_beaten():
    dog = Watchdog(10.0, started=0.0)
    assert dog.check(set(), now=1000.0) is None  # still building: nothing printed yet, left to --timeout
    dog.saw(0, "loading weights", now=1.0)
    assert dog.check(set(), now=100.0) is None  # a plain line does not arm the rule
    dog.saw(0, heartbeat_line(0, "built its stage in 3.0 s"), now=101.0)
    dog.saw(1, heartbeat_line(1, "built its stage in 3.1 s"), now=102.0)
    dog.saw(1, "some other progress", now=105.0)
    assert dog.check(set(), now=110.9) is None
    hang = dog.check(set(), now=111.0)
    assert (hang.rank, hang.silent_s, hang.stopped) == (0, 10.0, False)  # rank 0 went quiet first
    dog.saw(0, heartbeat_line(0, "measured forward 8/32 after 1.00 s"), now=111.5)
    hang = dog.check(set(), now=115.0)
    assert (hang.rank, hang.stopped) == (1, False) and hang.silent_s == 10.0


def test_a_stopped_rank_is_named_before_the_ranks_waiting_for_it():
    dog = Watchdog(10.0, started=0.0)
    for r in (0, 1):
        dog.saw(r, heartbeat_line(r, "measured forward 8/32"), now=5.0)
    assert dog.check({1}, now=6.0) is None  # stopped since 6.0
    hang = dog.check({1}, now=15.0)  # rank 0, waiting on rank 1 in a collective, is silent as long
    assert (hang.rank, hang.stopped) == (1, True)
    for r in (0, 1):  # continued (SIGCONT): both beat again, and the stopped clock is gone
        dog.saw(r, heartbeat_line(r, "measured forward 16/32"), now=15.2)
    assert dog.check(set(), now=16.0) is None and dog.stopped_since == {}
    assert Watchdog(10.0, started=0.0).check({3}, now=5.0) is None
    building = Watchdog(10.0, started=0.0)
    building.check({3}, now=5.0)
    assert building.check({3}, now=15.0).rank == 3  # a stopped rank is caught while it builds too


def test_a_serving_run_is_watched_for_stopped_ranks_only():
    dog = Watchdog(10.0, silent_rule=False, started=0.0)
    dog.saw(0, heartbeat_line(0, "x"), now=1.0)
    assert dog.check(set(), now=500.0) is None  # idle between requests is not a hang
    dog.check({0}, now=500.0)
    assert dog.check({0}, now=510.0).rank == 0


def test_heartbeat_lines_are_recognised():
    assert is_heartbeat(heartbeat_line(3, "warm-up 1 forward 8/16 after 0.50 s"))
    assert not is_heartbeat("[rank3]: hpi heartbeat: rank 3")  # the launcher strips torchrun's prefix first


# ---- launches ---------------------------------------------------------------------------------------------


def _spec(tmp_path: Path, **extra) -> RunSpec:
    return RunSpec(plan=Plan(tp=2), model="tiny-llama", device="cpu", out_dir=str(tmp_path / "run"),
                   extra={"fake": "beat", **extra})


def _pids(out: Path) -> dict[int, int]:
    return {int(p.name[4:]): int(p.read_text()) for p in (out / "pids").glob("rank*")}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _assert_gone(pids) -> None:
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    assert not [p for p in pids if _alive(p)], "a rank outlived the run"
    psutil = pytest.importorskip("psutil")
    left = [c for c in psutil.Process().children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE]
    assert not left, [c.cmdline() for c in left]


def test_a_stopped_rank_stops_the_run_by_name_with_its_heartbeats(tmp_path):
    spec = _spec(tmp_path)
    out = Path(spec.out_dir)
    seen: list[str] = []
    stopped: list[int] = []

    def stop_rank1_once_beating(line: str) -> None:
        seen.append(line)
        pids = _pids(out)
        if not stopped and len(pids) == 2:
            time.sleep(0.5)  # let rank 1 beat a few times first
            os.kill(pids[1], signal.SIGSTOP)
            stopped.append(time.monotonic())

    # rank 0's heartbeats are not relayed: a line that is not one starts the clock ("rank 0 of 2 ready")
    started = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch(spec, worker=WORKER, stream=stop_rank1_once_beating, timeout_s=90, grace_s=2, hang_timeout_s=4)
    e, message = info.value, str(info.value)
    assert e.reason == "hung" and e.rank == 1, message
    first = message.splitlines()[0]
    assert first == ("rank 1 (local rank 1) made no progress: its process has been stopped (SIGSTOP or a debugger); "
                     "hang timeout 4 s (--hang-timeout)")
    assert "last lines of rank 1 stdout.log:" in message and "hpi heartbeat: rank 1 measured forward" in message
    assert stopped and time.monotonic() - stopped[0] < 4 + 2 + 2 + 3  # timeout + a check + grace + slack
    assert not any(is_heartbeat(line) for line in seen)  # heartbeats are never relayed to the user
    assert time.monotonic() - started < 60
    _assert_gone(_pids(out).values())


def test_a_silent_rank_stops_the_run_by_name(tmp_path):
    spec = _spec(tmp_path, silent=True, rank=1)
    with pytest.raises(LaunchError) as info:
        launch(spec, worker=WORKER, timeout_s=90, grace_s=2, hang_timeout_s=3)
    first = str(info.value).splitlines()[0]
    assert info.value.rank == 1 and re.fullmatch(r"rank 1 \(local rank 1\) made no progress: it printed nothing for "
                                                 r"[345] s; hang timeout 3 s \(--hang-timeout\)", first), first
    _assert_gone(_pids(Path(spec.out_dir)).values())


def test_hang_timeout_zero_turns_the_watchdog_off(tmp_path):
    spec = _spec(tmp_path, silent=True, rank=1)
    with pytest.raises(LaunchError, match="^timed out after 8 s"):
        launch(spec, worker=WORKER, timeout_s=8, grace_s=2, hang_timeout_s=0)
    _assert_gone(_pids(Path(spec.out_dir)).values())


def test_sigterm_to_hpi_run_stops_the_ranks_like_ctrl_c_and_exits_143(tmp_path):
    out = tmp_path / "run"
    script = ("import sys; from hpi.executor import launch; launch.WORKER = (sys.argv[1],); from hpi.cli import main; "
              "sys.exit(main(sys.argv[2:]))")
    proc = subprocess.Popen([sys.executable, "-c", script, FAKE, "run", "--model", "tiny-llama", "--device", "cpu",
                             "--tp", "2", "--out", str(out), "--timeout", "120"],
                            env={**os.environ, "HPI_FAKE_WORKER": "sleep"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(_pids(out)) < 2:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        time.sleep(0.5)
        pids = _pids(out)
        proc.send_signal(signal.SIGTERM)  # to the launcher only, as a service manager or `kill` would
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    lines = err.strip().splitlines()
    assert "hpi run: terminated by SIGTERM" in lines and "Traceback" not in err
    assert any(line.startswith("local rank 1 last printed: ") for line in lines)
    _assert_gone(pids.values())


def test_sigterm_in_a_launch_from_another_thread_keeps_the_process_handler(tmp_path):
    """Only the main thread can take signals: a launch in a thread (hpi serve's) leaves SIGTERM's handler alone."""
    before = signal.getsignal(signal.SIGTERM)
    cancel = threading.Event()
    result = {}

    def run():
        try:
            launch(RunSpec(plan=Plan(), model="tiny-llama", device="cpu", out_dir=str(tmp_path / "run"),
                           extra={"fake": "sleep"}), worker=WORKER, timeout_s=60, grace_s=2, cancel=cancel)
        except LaunchError as e:
            result["e"] = e

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _pids(tmp_path / "run"):
        assert signal.getsignal(signal.SIGTERM) is before
        time.sleep(0.1)
    cancel.set()
    t.join(60)
    assert result["e"].reason == "interrupted" and result["e"].signum == signal.SIGINT
    assert signal.getsignal(signal.SIGTERM) is before


# ---- a real run -------------------------------------------------------------------------------------------


def test_a_stopped_rank_of_a_real_tiny_llama_tp2_run_is_caught(tmp_path):
    """The real worker beats (hpi.executor.worker.Heartbeat); SIGSTOP one rank mid-decode: the run ends within the
    hang timeout naming it, with its heartbeat lines, and leaves nothing running."""
    pytest.importorskip("transformers")
    psutil = pytest.importorskip("psutil")
    spec = RunSpec(plan=Plan(tp=2), model="tiny-llama", device="cpu", dtype="fp32",
                   workload=Workload(prompt_len_tokens=8, gen_len_tokens=1500), out_dir=str(tmp_path / "run"))
    stopped: list[tuple[int, float]] = []

    def stopper() -> None:  # polls rank 1's log for its 8th measured forward, then stops its process
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            logs = list(Path(spec.out_dir).glob("logs/node0/*/attempt_0/1/stdout.log"))
            if logs and "measured forward 8/" in logs[0].read_text():
                for p in psutil.Process().children(recursive=True):
                    try:
                        if p.environ().get("RANK") == "1" and p.parent().pid != os.getpid():
                            os.kill(p.pid, signal.SIGSTOP)
                            stopped.append((p.pid, time.monotonic()))
                            return
                    except psutil.Error:
                        continue
            time.sleep(0.05)

    t = threading.Thread(target=stopper, daemon=True)
    t.start()
    with pytest.raises(LaunchError) as info:
        launch(spec, timeout_s=300, grace_s=3, hang_timeout_s=10)
    t.join(5)
    message = str(info.value)
    assert stopped, message
    assert info.value.reason == "hung" and info.value.rank == 1, message
    assert message.splitlines()[0].startswith("rank 1 (local rank 1) made no progress: its process has been stopped")
    assert time.monotonic() - stopped[0][1] < 10 + 1 + 3 + 5 + 5
    tail = message[message.index("last lines of rank 1 stdout.log:"):].splitlines()[1:4]
    assert all(line.strip().startswith("| hpi heartbeat: rank 1 ") for line in tail), message  # not a FutureWarning
    assert "measured forward" in tail[-1], message  # how far it got
    _assert_gone([stopped[0][0]])
    assert json.loads((Path(spec.out_dir) / "spec.json").read_text())["plan"]["tp"] == 2
