"""hpi.executor.torchrun: the rendezvous store (and the ranks' gloo sockets) listen on the address the user gave."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from hpi.executor.launch import LaunchError, launch
from hpi.executor.spec import RunSpec
from hpi.executor.torchrun import ListenError, bind_listener, interface_of
from hpi.planner.specs.plan import Plan

FAKE = str(Path(__file__).with_name("fake_worker.py"))


def test_bind_listener_binds_the_given_address_and_says_why_it_cannot():
    sock = bind_listener("127.0.0.1", 0)
    try:
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
        with pytest.raises(ListenError, match=rf"^cannot listen on 127.0.0.1:{port} for the rendezvous \(Address "
                                              rf"already in use\): another process holds that port"):
            bind_listener("127.0.0.1", port)
    finally:
        sock.close()
    with pytest.raises(ListenError, match="pass an address of this machine"):
        bind_listener("198.51.100.7", 0)  # TEST-NET-2: no interface of this machine holds it
    with pytest.raises(ListenError, match="does not resolve"):
        bind_listener("no-such-host.invalid", 0)


def test_interface_of_finds_the_loopback_and_not_a_foreign_address():
    assert interface_of("127.0.0.1") == interface_of("localhost") is not None
    assert interface_of("198.51.100.7") is None and interface_of("no-such-host.invalid") is None


def _listeners(psutil) -> list[tuple[str, int, str]]:
    """(ip, port, command) of every listening TCP socket of this process's descendants."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            found += [(c.laddr.ip, c.laddr.port, " ".join(child.cmdline()[:3]))
                      for c in child.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    return found


def test_with_master_addr_127_0_0_1_nothing_listens_on_every_interface(tmp_path):
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "run"
    spec = RunSpec(plan=Plan(tp=2), model="tiny-llama", device="cpu", out_dir=str(out), extra={"fake": "sleep"})
    cancel = threading.Event()
    seen: dict[str, object] = {}

    def look_while_sleeping() -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(list(out.glob("pids/rank*"))) < 2:
            time.sleep(0.1)
        time.sleep(1.0)  # both ranks have joined gloo
        seen["listeners"] = _listeners(psutil)
        seen["argv"] = json.loads((out / "logs" / "node0" / "command.json").read_text())["argv"]
        cancel.set()

    t = threading.Thread(target=look_while_sleeping, daemon=True)
    t.start()
    with pytest.raises(LaunchError, match="^interrupted"):
        launch(spec, worker=(FAKE,), master_addr="127.0.0.1", timeout_s=120, grace_s=2, cancel=cancel)
    t.join(10)
    argv, listeners = seen["argv"], seen["listeners"]
    port = int(argv[argv.index("--master-port") + 1])
    store = [(ip, p, cmd) for ip, p, cmd in listeners if p == port]
    assert [(ip, cmd.split()[-1]) for ip, _, cmd in store] == [("127.0.0.1", "hpi.executor.torchrun")], listeners
    everywhere = [entry for entry in listeners if entry[0] in ("0.0.0.0", "::", "")]
    assert not everywhere, f"listening on every interface: {everywhere}"
    assert len(listeners) >= 3  # the store and each rank's gloo socket, all on 127.0.0.1


def test_a_port_someone_else_holds_is_refused_before_anything_is_written(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        spec = RunSpec(plan=Plan(), model="tiny-llama", device="cpu", out_dir=str(tmp_path / "run"))
        with pytest.raises(ListenError, match="another process holds that port"):
            launch(spec, worker=(FAKE,), master_addr="127.0.0.1", master_port=taken.getsockname()[1], timeout_s=30)
    finally:
        taken.close()
    assert not (tmp_path / "run").exists()
