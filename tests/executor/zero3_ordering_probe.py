"""Run a toy ZeRO-3 forward on the CPU under a CUDA-like accelerator that logs stream ordering; print JSON.

``python tests/executor/zero3_ordering_probe.py <fetch_wait>`` (run by test_zero3 in its own process: DeepSpeed and
torch.distributed keep process-wide state). The accelerator (``_LoggingAccelerator``) keeps the CPU's real one for
everything but streams and events: copies go on a logged "all-gather" stream, and every wait, GPU-side (compute
stream waits for an event or a whole stream) or host-side (an event synchronized), is logged with how many copies it
covers: every copy queued on the all-gather stream before the event was recorded, as on CUDA.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.runtime.zero import partition_parameters as zpp  # noqa: E402
from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator  # noqa: E402

LAYERS, WIDTH = 8, 64
LOG: dict = {"copies": [], "computes": [], "host_covered": 0, "forward": 0}


class _Event:
    def __init__(self, acc) -> None:
        self.acc, self.covers, self.forward = acc, None, LOG["forward"]

    def record(self, stream=None) -> None:
        stream = stream or self.acc.current
        self.covers = len(LOG["copies"]) if stream.name == "allgather" else self.acc.compute.covered

    def query(self) -> bool:
        return False  # never done by itself: every bound the host keeps is exercised

    def synchronize(self) -> None:
        if self.forward == LOG["forward"]:  # an event of an earlier forward covers that forward's copies
            LOG["host_covered"] = max(LOG["host_covered"], self.covers)


class _Stream:
    def __init__(self, name: str) -> None:
        self.name, self.covered = name, 0

    def wait_event(self, event) -> None:
        self.covered = max(self.covered, event.covers)

    def wait_stream(self, stream) -> None:
        self.covered = max(self.covered, len(LOG["copies"]))  # what a CUDA stream wait covers: all queued there

    def synchronize(self) -> None:
        LOG["host_covered"] = len(LOG["copies"])


class _LoggingAccelerator:
    def __init__(self, real) -> None:
        self.real = real
        self.compute, self.allgather = _Stream("compute"), _Stream("allgather")
        self.current = self.compute

    def resolves_data_dependency(self) -> bool:
        return False  # what CUDA answers

    def handles_memory_backpressure(self) -> bool:
        return False

    def Event(self):  # noqa: N802 (DeepSpeed's name)
        return _Event(self)

    def current_stream(self, *args, **kwargs):
        return self.current

    @contextlib.contextmanager
    def stream(self, _stream):
        before, self.current = self.current, self.allgather
        try:
            yield
        finally:
            self.current = before

    def __getattr__(self, name):
        return getattr(self.real, name)


def _log_copies(handle_class) -> None:
    init = handle_class.__init__

    def logged(self, params, *args, **kwargs) -> None:
        for p in params if isinstance(params, list) else [params]:
            LOG["copies"].append(p.ds_id)
        init(self, params, *args, **kwargs)

    handle_class.__init__ = logged


def main(fetch_wait: str) -> None:
    from hpi.executor.groups import build_groups
    from hpi.executor.zero3 import wrap_zero3

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29611"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    acc = _LoggingAccelerator(zpp.get_accelerator())
    zpp.get_accelerator = coordinator.get_accelerator = lambda: acc
    with deepspeed.zero.Init(config_dict_or_path=_config()):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)))
    for handle in (zpp.NoGatherHandle, zpp.NoGatherCoalescedHandle):
        _log_copies(handle)  # inside hpi's wrappers, which wrap_zero3 installs next: logged as each copy is queued
    engine = wrap_zero3(model, _config(), build_groups(1, 1, 1), fetch_wait=fetch_wait)
    for layer in model:
        layer.register_forward_pre_hook(_log_compute(acc))
    x = torch.ones(2, WIDTH)
    outputs = []
    for forward in range(3):  # the first forward records DeepSpeed's trace; the later ones prefetch
        LOG["forward"] = forward
        LOG["copies"].clear()
        LOG["computes"].clear()
        LOG["host_covered"] = acc.compute.covered = acc.allgather.covered = 0
        with torch.no_grad():
            outputs.append(engine(x).sum().item())
    print(json.dumps({**LOG, "outputs": outputs}))


def _log_compute(acc):
    def hook(module, _inputs) -> None:  # runs after DeepSpeed's own pre-forward hook (registered first)
        LOG["computes"].append({"params": [p.ds_id for p in module.parameters(recurse=False)],
                                "covered": acc.compute.covered, "host_covered": LOG["host_covered"]})

    return hook


def _config() -> dict:
    # one bucket holds the whole toy: everything is queued at the first fetch, a queue LAYERS layers deep
    return {"train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"},
                                  "stage3_prefetch_bucket_size": 10**6, "stage3_max_live_parameters": 10**7,
                                  "stage3_param_persistence_threshold": 0}}


if __name__ == "__main__":
    main(sys.argv[1])
