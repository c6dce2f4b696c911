"""hpi.executor.rundir and ``hpi run``'s run folders: one run per folder (a lock), a fresh folder by default.

The two-run test starts a real run (the stand-in worker, sleeping) in another process and a second ``hpi run``
on the same folder in this one: the second is refused in one line before it writes anything.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpi.cli import main
from hpi.executor import launch as launch_mod
from hpi.executor import rundir
from hpi.executor.rundir import FolderLock, RunFolderBusy, claim_run_folder, fresh_run_folder
from hpi.records import RunRecord

REPO = Path(__file__).resolve().parents[2]
FAKE = str(Path(__file__).with_name("fake_worker.py"))


def test_a_folder_lock_is_exclusive_until_released(tmp_path):
    first = FolderLock.acquire(tmp_path / "run")
    with pytest.raises(RunFolderBusy, match=rf"^run folder {tmp_path / 'run'} is in use by another hpi run \(pid "
                                            rf"{os.getpid()} since "):
        FolderLock.acquire(tmp_path / "run")
    other_node = FolderLock.acquire(tmp_path / "run", node_rank=1)  # nodes sharing a folder lock their own file
    first.release()
    first.release()  # idempotent
    again = FolderLock.acquire(tmp_path / "run")
    again.release()
    other_node.release()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".hpi-node0.lock", ".hpi-node1.lock"]


def test_the_lock_is_held_across_processes_and_dropped_when_its_holder_dies(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from hpi.executor.rundir import FolderLock; "
         "FolderLock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(60)", str(tmp_path / "run")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=rf"in use by another hpi run \(pid {holder.pid} since "):
            FolderLock.acquire(tmp_path / "run")
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs, the kernel drops the flock
        holder.wait()
    FolderLock.acquire(tmp_path / "run").release()


def test_fresh_folders_are_stamped_labelled_and_never_shared(tmp_path):
    now = dt.datetime(2026, 12, 3, 1, 2, 3, tzinfo=dt.timezone.utc)
    a = fresh_run_folder("cpu+kv pinned tp2 pp1 dp1 w4 b16", tmp_path / "runs", now=now)
    b = fresh_run_folder("cpu+kv pinned tp2 pp1 dp1 w4 b16", tmp_path / "runs", now=now)
    assert a.name == "2026-12-03T01-02-03-cpu+kv-pinned-tp2-pp1-dp1-w4-b16"
    assert b.name == a.name + "-2" and a.is_dir() and b.is_dir()
    odd = fresh_run_folder("../../x/" + "y" * 300, tmp_path / "runs", now=now)
    assert odd.parent == tmp_path / "runs" and len(odd.name) == 120 and "/" not in odd.name


def _fake_launch(calls):
    def fake(spec, **kw):
        calls.append(spec)
        assert (Path(spec.out_dir) / "ds_config.json").is_file()  # written before the launch, inside the lock
        with pytest.raises(RunFolderBusy):  # still locked while the run runs
            FolderLock.acquire(spec.out_dir)
        return RunRecord(world_size=1)

    return fake


def test_hpi_run_without_out_makes_a_fresh_folder_and_points_latest_at_it(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(launch_mod, "launch", _fake_launch(calls))
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["run", "--model", "tiny-llama", "--device", "cpu", "--json"]) == 0
    first, second = (Path(spec.out_dir) for spec in calls)
    assert first != second and first.parent == second.parent == Path("runs")
    for folder in (first, second):  # <UTC time>-<plan label>, "-2" when both started in the same second
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d-none-tp1-pp1-dp1-w16-b1(-2)?", folder.name), folder
    assert os.readlink("runs/latest") == second.name  # relative: the runs/ folder can move
    assert Path("runs/latest").resolve() == second.resolve()
    assert (second / "ds_config.json").is_file() and (first / "ds_config.json").is_file()
    assert "run folder runs/" in capsys.readouterr().err


def test_an_old_runs_latest_folder_is_left_alone_with_a_warning(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(launch_mod, "launch", _fake_launch(calls))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "latest").mkdir(parents=True)
    (tmp_path / "runs" / "latest" / "record.json").write_text("{}")
    assert main(["run", "--model", "tiny-llama", "--device", "cpu", "--json"]) == 0
    assert (tmp_path / "runs" / "latest" / "record.json").read_text() == "{}"
    assert "runs/latest is a folder from an older hpi run, left as it is" in capsys.readouterr().err


def test_claim_is_taken_over_by_the_launch_and_released_at_its_end(tmp_path):
    from hpi.deployment import resolve_deployment
    from hpi.executor.spec import RunSpec
    from hpi.planner.specs.plan import Plan

    deployment = resolve_deployment(RunSpec(plan=Plan(), model="tiny-llama", device="cpu",
                                            out_dir=str(tmp_path / "run")))
    assert claim_run_folder(deployment) is deployment  # --out given: the same folder, now locked
    with pytest.raises(RunFolderBusy):
        FolderLock.acquire(tmp_path / "run")
    held = rundir.hold_for_launch(tmp_path / "run")  # the launch takes the claim over instead of refusing
    with pytest.raises(RunFolderBusy):
        rundir.hold_for_launch(tmp_path / "run")  # a second launch on it is refused
    held.release()
    FolderLock.acquire(tmp_path / "run").release()


def test_a_second_run_on_a_busy_folder_is_refused_and_the_first_keeps_its_logs(tmp_path, capsys):
    """Two ``hpi run --out X`` at once: the second says so in one line, exit 2, and touches nothing."""
    out = tmp_path / "run"
    script = ("import sys; from hpi.executor import launch; launch.WORKER = (sys.argv[1],); from hpi.cli import main; "
              "sys.exit(main(sys.argv[2:]))")
    env = {**os.environ, "HPI_FAKE_WORKER": "sleep"}
    first = subprocess.Popen([sys.executable, "-c", script, FAKE, "run", "--model", "tiny-llama", "--device", "cpu",
                              "--out", str(out), "--timeout", "120"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        logs = out / "logs" / "node0"
        while time.monotonic() < deadline and len(list(logs.glob("hpi_*/attempt_0/*/stdout.log"))) < 1:
            assert first.poll() is None, first.communicate()
            time.sleep(0.2)
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "pids" not in p.parts}
        assert any(p.name == "command.json" for p in before) and any(p.name == "spec.json" for p in before)

        code = main(["run", "--model", "tiny-llama", "--device", "cpu", "--tp", "1", "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.count("\n") == 1 and f"run folder {out} is in use by another hpi run (pid {first.pid}" in err
        assert "--out" in err and "Traceback" not in err
        after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "pids" not in p.parts}
        assert after == before  # nothing written, nothing deleted
        assert first.poll() is None  # the first run goes on
    finally:
        os.killpg(first.pid, signal.SIGINT)
        _, first_err = first.communicate(timeout=60)
    assert first.returncode == 130 and "hpi run: interrupted" in first_err
    assert list((out / "logs" / "node0").glob("hpi_*/attempt_0/0/stdout.log"))


def test_a_busy_rendezvous_port_is_refused_before_any_run_folder_exists(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = main(["run", "--model", "tiny-llama", "--device", "cpu", "--master-port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"cannot listen on 127.0.0.1:{port} for the rendezvous" in err and "--master-port" in err
    assert not (tmp_path / "runs").exists()  # no empty run folder left behind


def test_hpi_serve_on_a_busy_folder_is_one_line_exit_2_and_starts_nothing(tmp_path, capsys, monkeypatch):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    started = []
    monkeypatch.setattr(launch_mod, "launch", lambda *a, **k: started.append(a))
    out = tmp_path / "serve"
    held = FolderLock.acquire(out)  # another hpi serve (or run) holds it
    try:
        code = main(["serve", "--model", "tiny-llama", "--device", "cpu", "--port", "0", "--out", str(out)])
    finally:
        held.release()
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"run folder {out} is in use by another hpi run (pid {os.getpid()}" in err
    assert started == [] and sorted(p.name for p in out.iterdir()) == [".hpi-node0.lock"]


def test_a_busy_metrics_port_is_refused_before_hpi_serve_makes_its_run_folder(tmp_path, capsys, monkeypatch):
    pytest.importorskip("fastapi")
    pytest.importorskip("prometheus_client")
    started = []
    monkeypatch.setattr(launch_mod, "launch", lambda *a, **k: started.append(a))
    monkeypatch.chdir(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = main(["serve", "--model", "tiny-llama", "--device", "cpu", "--port", "0", "--metrics-port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"cannot listen on 127.0.0.1:{port} for --metrics-port" in err
    assert started == [] and not (tmp_path / "runs").exists()  # no run folder, nothing launched


def test_run_and_study_outputs_are_git_ignored():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["runs/latest", "runs/2026-12-03T01-02-03-tp2/record.json", "studies/my-study/runs/trial-0000.json",
             "studies/my-study/report.md"]
    proc = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True)
    assert proc.stdout.split() == paths
    kept = subprocess.run(["git", "check-ignore", "--no-index", "studies/README.md"], cwd=REPO, capture_output=True)
    assert kept.returncode == 1  # not ignored
