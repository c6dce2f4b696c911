"""hpi.executor.zero3: DeepSpeed's single-rank fetch wait, made stream-ordered, never blocks the host."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from deepspeed.runtime.zero import partition_parameters as zpp  # noqa: E402

from hpi.executor.zero3 import stream_ordered_fetch, wrap_zero3  # noqa: E402


class _NoHostSync:
    """An accelerator whose streams fail the test if the host is asked to wait on them."""

    def __init__(self, real) -> None:
        self.real = real

    def current_stream(self):
        def synchronize():
            raise AssertionError("the fetch wait blocked the host")

        return SimpleNamespace(synchronize=synchronize)

    def resolves_data_dependency(self) -> bool:
        return False  # what the CUDA accelerator answers

    def __getattr__(self, name):
        return getattr(self.real, name)


def _inflight_param(n: int = 4):
    return SimpleNamespace(ds_status=zpp.ZeroParamStatus.INFLIGHT,
                           ds_tensor=SimpleNamespace(data=torch.arange(float(n))),
                           ds_shape=(2, n // 2), ds_summary=lambda: "fake")


@pytest.fixture
def cuda_like_accelerator(monkeypatch):
    monkeypatch.setattr(zpp, "get_accelerator", lambda real=zpp.get_accelerator(): _NoHostSync(real))
    monkeypatch.setattr(zpp.NoGatherHandle, "wait", zpp.NoGatherHandle.wait)  # undone after the test
    monkeypatch.setattr(zpp.NoGatherCoalescedHandle, "wait", zpp.NoGatherCoalescedHandle.wait)


def test_stock_wait_blocks_the_host(cuda_like_accelerator):
    handle = zpp.NoGatherHandle(_inflight_param())
    with pytest.raises(AssertionError, match="blocked the host"):
        handle.wait()


def test_stream_ordered_wait_marks_available_without_a_host_sync(cuda_like_accelerator):
    stream_ordered_fetch()
    stream_ordered_fetch()  # idempotent
    one = _inflight_param()
    handle = zpp.NoGatherHandle(one)
    handle.wait()
    handle.wait()
    assert one.ds_status == zpp.ZeroParamStatus.AVAILABLE
    assert one.data.tolist() == [[0.0, 1.0], [2.0, 3.0]]  # the copy itself still happened, shaped
    many = [_inflight_param(), _inflight_param(6)]
    zpp.NoGatherCoalescedHandle(many).wait()
    assert [p.ds_status for p in many] == [zpp.ZeroParamStatus.AVAILABLE] * 2


def test_stream_ordered_wait_refuses_a_param_not_in_flight(cuda_like_accelerator):
    stream_ordered_fetch()
    params = [_inflight_param(), _inflight_param()]
    handle = zpp.NoGatherCoalescedHandle(params)
    params[1].ds_status = zpp.ZeroParamStatus.NOT_AVAILABLE
    with pytest.raises(RuntimeError, match="to be inflight"):
        handle.wait()


def test_unknown_fetch_wait_is_refused():
    with pytest.raises(ValueError, match="fetch_wait 'sometimes' is not one of stream, host"):
        wrap_zero3(torch.nn.Linear(2, 2), {}, None, fetch_wait="sometimes")


def _ordering(fetch_wait: str, port: int) -> dict:
    """The toy forward of zero3_ordering_probe under a CUDA-like logging accelerator, in its own process."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    probe = Path(__file__).with_name("zero3_ordering_probe.py")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_PORT": str(port)}
    done = subprocess.run([sys.executable, str(probe), fetch_wait], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _last_own_copy(log: dict, compute: dict) -> int:
    """How many copies were queued up to and including the compute's own last one."""
    return max(log["copies"].index(p) for p in compute["params"]) + 1


def test_deepspeeds_wait_makes_each_layer_wait_for_the_whole_prefetch_queue():
    """What cost.prefetch_lag prices: with the toy's eight layers queued by one bucket, the first layer's compute
    (stream-ordered wait) and the host (DeepSpeed's stock wait) wait for all 16 copies, not for its own two."""
    for fetch_wait, port in (("stream", 29631), ("host", 29632)):
        log = _ordering(fetch_wait, port)
        first = log["computes"][0]
        assert (_last_own_copy(log, first), first["covered"]) == (2, 16), fetch_wait
        assert log["computes"][1]["host_covered"] == 16, fetch_wait


def test_the_copy_ordered_wait_waits_for_each_layers_own_copies_only():
    log = _ordering("event", 29633)
    assert len(log["copies"]) == 16 and len(log["computes"]) == 8
    for compute in log["computes"]:
        own = _last_own_copy(log, compute)
        assert compute["covered"] == own  # every copy it reads, and none queued after them
        assert own - 3 <= compute["host_covered"] < own  # the host stays within three copies of the compute
    assert log["outputs"] == _ordering("stream", 29634)["outputs"]


def test_the_event_wait_over_several_ranks_or_from_nvme_is_the_stream_wait(monkeypatch):
    """With dp > 1 the gathers are DeepSpeed's all-gather handles, which the copy-ordered wait does not record; from
    NVMe the swapper reuses its pinned buffers (hpi.executor.zero3.copy_orders)."""
    import deepspeed

    from hpi.executor import zero3

    installed = []
    monkeypatch.setattr(zero3, "scoped_trace_check", lambda g: None)
    monkeypatch.setattr(zero3, "copy_ordered_fetch", lambda: installed.append("event"))
    monkeypatch.setattr(zero3, "stream_ordered_fetch", lambda: installed.append("stream"))
    monkeypatch.setattr(deepspeed, "initialize", lambda **kw: (SimpleNamespace(eval=lambda: None),))
    cpu, nvme = ({"zero_optimization": {"offload_param": {"device": d}}} for d in ("cpu", "nvme"))
    for config, dp, wait in ((cpu, 2, "event"), (cpu, 1, "event"), (nvme, 1, "event"), ({}, 1, "event"),
                             (cpu, 1, "stream"), (cpu, 1, "host")):
        wrap_zero3(torch.nn.Linear(2, 2), config, SimpleNamespace(dp=dp), fetch_wait=wait)
    assert installed == ["stream", "event", "stream", "event", "stream"]
