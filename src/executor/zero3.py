"""DeepSpeed ZeRO-3 around one stage's module, partitioned over that stage's data-parallel group.

DeepSpeed assumes one model per world. Two places need care when each pipeline stage is a different
module with its own ZeRO-3 engine:

- ``PartitionedParameterCoordinator.reset_step`` checks, when a module trace is first recorded, that
  every rank recorded the same trace, with broadcasts over the WORLD group (``zero.utils.
  assert_ints_same_as_other_ranks``). Stages record different traces (different layers), and a world
  broadcast from inside one stage's forward deadlocks against a stage waiting in ``recv``. What the
  check protects is agreement inside a partition group, so we scope it to the rank's dp group (and skip
  it for a group of one). ``scoped_trace_check`` installs that, once per process.
- The partition group itself comes from the ``mpu`` (``hpi.executor.groups.DeepSpeedMpu``), which DeepSpeed
  reads when AutoTP is off (our own TP sharding does not use AutoTP).

One place where DeepSpeed's stock behaviour costs streaming bandwidth (``stream_ordered_fetch``):

- With a partition group of one rank (dp = 1, every offload plan of one replica) a fetch is a plain
  host-to-device copy on DeepSpeed's all-gather stream (``NoGatherHandle`` / ``NoGatherCoalescedHandle``),
  and waiting for it calls ``current_stream().synchronize()`` on that stream: the *host* blocks until
  every copy queued there is done, the prefetched ones for later modules included. The copy engine then
  idles from that moment until Python has run the next hooks and queued the next prefetch, once per
  wait. The host wait is not what makes the copy safe to read: ``fetch_sub_module`` already makes the
  compute stream wait for the all-gather stream (``wait_stream``), ``free_param`` records the compute
  stream on every gathered buffer before it is reused, and the bounded queue of fetch events
  (``__max_ongoing_fetch_events``) already limits how far the host may run ahead. So the patched wait
  marks the parameter available and leaves the ordering to the GPU, as DeepSpeed does for accelerators
  that ``resolves_data_dependency()``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hpi.executor.groups import DeepSpeedMpu, Groups
from hpi.planner.specs.workload import FETCH_WAITS  # stream: GPU-ordered (ours); host: DeepSpeed's stock synchronize

_INSTALLED: list[Groups] = []


def _group_check(g: Groups):
    def assert_same_in_partition_group(ints) -> None:
        if g.dp == 1:
            return
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        src = g.dp_ranks[0]
        length = torch.tensor([len(ints) if g.rank == src else -1], dtype=torch.int64, device=device)
        dist.broadcast(length, src=src, group=g.dp_group)
        if int(length.item()) != len(ints):
            raise RuntimeError(f"ZeRO-3 trace length differs inside dp group {g.dp_ranks}: {int(length.item())} vs "
                               f"{len(ints)}")
        values = torch.tensor(list(ints) if g.rank == src else [-1] * len(ints), dtype=torch.int64, device=device)
        dist.broadcast(values, src=src, group=g.dp_group)
        if values.tolist() != list(ints):
            raise RuntimeError(f"ZeRO-3 traces differ inside dp group {g.dp_ranks} (rank {g.rank} vs rank {src})")

    return assert_same_in_partition_group


def scoped_trace_check(g: Groups) -> None:
    """Make DeepSpeed's trace-agreement check talk only to the rank's ZeRO-3 partition group."""
    from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator

    if _INSTALLED:
        if _INSTALLED[0] != g:
            raise RuntimeError("one process, one layout: the trace check is already scoped to other groups")
        return
    coordinator.assert_ints_same_as_other_ranks = _group_check(g)
    _INSTALLED.append(g)



def stream_ordered_fetch() -> None:
    """Replace the host synchronize in DeepSpeed's single-rank fetch wait with GPU stream ordering (idempotent)."""
    from deepspeed.runtime.zero import partition_parameters as zpp

    if getattr(zpp.NoGatherHandle.wait, "_hpi_stream_ordered", False):
        return
    available = zpp.ZeroParamStatus.AVAILABLE
    inflight = zpp.ZeroParamStatus.INFLIGHT

    def wait_one(self, **kwargs) -> None:
        if self._NoGatherHandle__complete:
            return
        self._NoGatherHandle__param.ds_status = available
        self._NoGatherHandle__complete = True

    def wait_many(self, **kwargs) -> None:
        if self._NoGatherCoalescedHandle__complete:
            return
        for param in self._NoGatherCoalescedHandle__params:
            if param.ds_status != inflight:
                raise RuntimeError(f"expected param {param.ds_summary()} to be inflight")
            param.ds_status = available
        self._NoGatherCoalescedHandle__complete = True

    for fn in (wait_one, wait_many):
        fn._hpi_stream_ordered = True
    zpp.NoGatherHandle.wait = wait_one
    zpp.NoGatherCoalescedHandle.wait = wait_many


def wrap_zero3(module: torch.nn.Module, config: dict, g: Groups, fetch_wait: str = "stream"):
    """``deepspeed.initialize`` the stage for inference (no optimizer) and return the engine."""
    import deepspeed

    if fetch_wait not in FETCH_WAITS:
        raise ValueError(f"fetch_wait {fetch_wait!r} is not one of {', '.join(FETCH_WAITS)}")
    scoped_trace_check(g)
    if fetch_wait == "stream":
        stream_ordered_fetch()
    engine, *_ = deepspeed.initialize(model=module, config=config, mpu=DeepSpeedMpu(g))
    engine.eval()
    return engine


def hooked_modules(module: torch.nn.Module) -> int:
    """Modules of ``module`` with a forward pre-hook: after ``wrap_zero3``, the modules DeepSpeed fetches and
    releases parameters around (``parameter_offload.py`` ``_register_deepspeed_module`` hooks every module but
    what is inside a leaf module): what ``Plan.zero3_leaf`` changes."""
    return sum(1 for m in module.modules() if m._forward_pre_hooks)
