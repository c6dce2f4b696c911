"""``hpi serve`` under faults: a full queue is 429, a client that disconnects frees its slot, SIGTERM lets
running requests finish then stops every rank (exit 0), a killed rank is answered 500 with its name and the
server exits 1 with no process left, and a port in use is one line before anything starts. CPU, real ranks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx2")


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def stream_lines(server, body: dict):
    """An open streaming completion: (the response context, its line iterator)."""
    client = httpx.Client(timeout=120)
    ctx = client.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers)
    response = ctx.__enter__()
    return client, ctx, response, response.iter_lines()


@pytest.fixture(scope="module")
def one_slot(sv, serve_checkpoint, tmp_path_factory):
    s = sv.start_server(tmp_path_factory.mktemp("one-slot"), "--checkpoint", str(serve_checkpoint), "--max-batch",
                        "1", "--max-queue", "1", "--max-model-len", "2048")
    yield s
    assert s.stop() == 0, s.log
    assert not s.workers()


def test_a_full_queue_is_429_and_the_queue_drains(one_slot):
    # long enough to be running still when the queue is tested, however slow the machine (it had ended by then
    # with 400 tokens on a loaded 2-core machine; the client disconnects it below)
    long = {"model": one_slot.model, "prompt": "w1 w2", "max_tokens": 2000, "temperature": 0, "stream": True}
    client, ctx, response, lines = stream_lines(one_slot, long)
    assert response.status_code == 200 and next(line for line in lines if line.startswith("data:"))  # running
    waiting: dict = {}
    t = threading.Thread(target=lambda: waiting.update(r=one_slot.post(
        "/v1/completions", {"model": one_slot.model, "prompt": "w3", "max_tokens": 2, "temperature": 0})))
    t.start()
    wait_for(lambda: one_slot.get("/health").json()["requests_waiting"] == 1, what="a waiting request")
    full = one_slot.post("/v1/completions", {"model": one_slot.model, "prompt": "w4", "max_tokens": 2})
    assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
    ctx.__exit__(None, None, None)  # the long one disconnects: its slot frees, the waiting one runs
    client.close()
    t.join(120)
    assert waiting["r"].status_code == 200 and waiting["r"].json()["usage"]["completion_tokens"] == 2


def test_a_disconnected_client_frees_its_slot_at_the_next_step(one_slot):
    before = one_slot.get("/health").json()["finished"].get("cancelled", 0)
    long = {"model": one_slot.model, "prompt": "w9", "max_tokens": 450, "temperature": 0, "stream": True}
    client, ctx, response, lines = stream_lines(one_slot, long)
    next(line for line in lines if line.startswith("data:"))
    ctx.__exit__(None, None, None)
    client.close()
    wait_for(lambda: one_slot.get("/health").json()["finished"].get("cancelled", 0) == before + 1,
             what="the cancel to reach rank 0")
    started = time.monotonic()
    r = one_slot.post("/v1/completions", {"model": one_slot.model, "prompt": "w5", "max_tokens": 2})
    assert r.status_code == 200 and time.monotonic() - started < 30  # the only slot was free again


def test_sigterm_lets_running_requests_finish_then_stops_every_rank(sv, serve_checkpoint, tmp_path):
    s = sv.start_server(tmp_path, "--checkpoint", str(serve_checkpoint), "--max-batch", "2", "--max-model-len", "256")
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(r=s.post(
        "/v1/completions", {"model": s.model, "prompt": "w1", "max_tokens": 120, "temperature": 0})))
    t.start()
    wait_for(lambda: s.get("/health").json()["requests_running"] == 1, what="the request to run")
    assert s.stop(signal.SIGTERM) == 0, s.log
    t.join(60)
    assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 120
    assert not s.workers() and "hpi serve: stopped" in s.log


def _rank_pid(server, rank: int) -> int:
    for pid in server.workers():
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    raise AssertionError(f"no rank {rank} among {server.workers()}")


def test_a_killed_rank_is_answered_500_with_its_name_and_the_server_exits_1(sv, serve_checkpoint, tmp_path):
    s = sv.start_server(tmp_path, "--checkpoint", str(serve_checkpoint), "--tp", "2", "--max-batch", "2",
                        "--max-model-len", "512")
    client, ctx, response, lines = stream_lines(s, {"model": s.model, "prompt": "w1", "max_tokens": 500,
                                                    "temperature": 0, "stream": True})
    next(line for line in lines if line.startswith("data:"))
    os.kill(_rank_pid(s, 1), signal.SIGKILL)
    tail = [line for line in lines if line.startswith("data:")]
    assert tail[-1] == "data: [DONE]" and '"error"' in tail[-2] and "rank 1" in tail[-2], tail[-3:]
    ctx.__exit__(None, None, None)
    client.close()
    code = s.proc.wait(120)
    assert code == 1 and "rank 1" in s.log, s.log
    wait_for(lambda: not s.workers(), 30, "the other ranks to be stopped")


def test_a_port_in_use_is_one_line_and_nothing_starts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "hpi.cli", "serve", "--model", "tiny-llama", "--device", "cpu",
                               "--port", str(port), "--out", str(tmp_path / "run")], capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode == 2 and "in use" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_stopped_rank_is_caught_by_the_hang_timeout(sv, serve_checkpoint, tmp_path):
    s = sv.start_server(tmp_path, "--checkpoint", str(serve_checkpoint), "--tp", "2", "--max-batch", "2",
                        "--max-model-len", "512", "--hang-timeout", "8")
    stuck = _rank_pid(s, 1)
    os.kill(stuck, signal.SIGSTOP)
    try:
        r = s.post("/v1/completions", {"model": s.model, "prompt": "w1", "max_tokens": 50}, timeout=120)
        assert r.status_code == 500 and "stuck" in r.json()["error"]["message"], r.text
        assert s.proc.wait(120) == 1 and "stuck" in s.log
        wait_for(lambda: not s.workers(), 60, "every rank to be stopped")
    finally:
        try:
            os.kill(stuck, signal.SIGCONT)
        except ProcessLookupError:
            pass
