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

And one place where it costs a deep prefetch queue its overlap (``copy_ordered_fetch``, ``fetch_wait`` event):

- ``_fetch_sub_module_impl`` then makes the compute stream wait for the *whole* all-gather stream
  (``current_stream().wait_stream(allgather_stream)``), and bounds the host by an event it records on that stream
  after each wait (``__max_ongoing_fetch_events``, 2). Both cover every copy queued so far, the prefetches for the
  layers ahead included: with a queue k layers deep, layer i's compute starts only once layer i + k's copies have
  landed, and the last k layers' compute runs after the last copy (one H100, Mixtral-8x22B 4-bit, 3e9 bucket: the
  copy engine idle 78-282 ms at each forward boundary; benchmarks/results/2026-12-06-prefetch-lag, priced by
  ``cost.prefetch_lag``). The copy-ordered wait records an event after each parameter's own copy, makes the compute
  stream wait for the events of the parameters it is about to read and nothing else, and bounds the host by those
  same events, two copies behind, as DeepSpeed bounds it by its own. Where ``copy_orders`` holds (a partition group of
  one rank, not NVMe); the stream-ordered wait is part of it. Same H100, same runs
  (benchmarks/results/2026-12-06-event-wait): the 8B 16-bit from pinned memory at DeepSpeed's default knobs 0.336 ->
  0.292 s a step (0.88 -> 1.01 of pinned), Mixtral-8x22B 4-bit at the 3e9 bucket 1.528 -> 1.446 s (fused, bs 1).
"""

from __future__ import annotations

import collections

import torch
import torch.distributed as dist

from hpi.executor.groups import DeepSpeedMpu, Groups
from hpi.planner.specs.plan import orders_copies
from hpi.planner.specs.workload import FETCH_WAITS  # event / stream: GPU-ordered (ours); host: DeepSpeed's stock

_INSTALLED: list[Groups] = []
# DeepSpeed's own bound on how far the host runs ahead of its fetches (``__max_ongoing_fetch_events``), kept per copy.
COPIES_AHEAD = 2


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


class _Copies:
    """The copy events of the parameters DeepSpeed has waited for: what the compute stream has yet to wait for
    (``pending``) and what bounds the host (``recent``: ``COPIES_AHEAD`` copies not yet known done)."""

    def __init__(self) -> None:
        self.pending: list = []
        self.recent: collections.deque = collections.deque()

    def waited(self, param) -> None:
        copied = getattr(param, "_hpi_copied", None)
        if copied is None:  # gathered before, and its copy already waited for
            return
        param._hpi_copied = None
        self.pending.append(copied)
        while self.recent and self.recent[0].query():
            self.recent.popleft()
        if len(self.recent) > COPIES_AHEAD:
            self.recent.popleft().synchronize()
        self.recent.append(copied)

    def drain(self) -> list:
        out, self.pending = self.pending, []
        return out


_COPIES = _Copies()


class _CopyOrderedStream:
    """The compute stream, as DeepSpeed's fetch sees it: its wait for the all-gather stream waits for the copies of
    the parameters just waited for instead."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def wait_stream(self, _allgather_stream) -> None:
        for copied in _COPIES.drain():
            self.stream.wait_event(copied)

    def __getattr__(self, name):
        return getattr(self.stream, name)


class _CopyOrderedAccelerator:
    """DeepSpeed's accelerator as its parameter coordinator sees it under the copy-ordered wait: the compute stream
    waits per copy (``_CopyOrderedStream``), and the coordinator leaves the host's bound to ``_Copies``
    (``handles_memory_backpressure``: its own event, recorded on the all-gather stream, covers every copy queued)."""

    def __init__(self, real) -> None:
        self.real = real

    def current_stream(self, *args, **kwargs):
        return _CopyOrderedStream(self.real.current_stream(*args, **kwargs))

    def handles_memory_backpressure(self) -> bool:
        return True

    def __getattr__(self, name):
        return getattr(self.real, name)


def copy_ordered_fetch() -> None:
    """Order each gathered parameter's reads after its own copy rather than after every copy queued (module
    docstring; idempotent). Where the device resolves data dependencies itself (the CPU) nothing needs ordering.

    Three patches, each at the narrowest point: the single-rank handles record an event after each parameter's
    copy (a prefetch bucket is one coalesced handle, so per parameter, not per handle); the coordinator's in-flight
    registry hands each parameter it pops for a wait to ``_Copies``; and the coordinator's accelerator turns its
    whole-stream wait into waits on those events (``_CopyOrderedAccelerator``)."""
    from deepspeed.runtime.zero import partition_parameters as zpp
    from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator

    stream_ordered_fetch()
    if isinstance(coordinator.get_accelerator(), _CopyOrderedAccelerator):
        return
    if zpp.get_accelerator().resolves_data_dependency():
        return
    zpp.NoGatherHandle.__init__ = _recording_one(zpp.NoGatherHandle.__init__, zpp.get_accelerator)
    zpp.NoGatherCoalescedHandle.__init__ = _recording_each(zpp.NoGatherCoalescedHandle.__init__, zpp.get_accelerator)
    pop = coordinator.InflightParamRegistry.pop

    def pop_for_wait(self, param, *default):
        _COPIES.waited(param)
        return pop(self, param, *default)

    coordinator.InflightParamRegistry.pop = pop_for_wait
    ordered = _CopyOrderedAccelerator(coordinator.get_accelerator())  # DeepSpeed's accelerator is a process singleton
    coordinator.get_accelerator = lambda: ordered


def _record_copy(param, get_accelerator) -> None:
    param._hpi_copied = get_accelerator().Event()
    param._hpi_copied.record()  # on the current stream: the all-gather stream the copy was queued on


def _recording_one(init, get_accelerator):
    def record_after_copy(self, param) -> None:
        init(self, param)
        _record_copy(param, get_accelerator)

    return record_after_copy


def _recording_each(init, get_accelerator):
    def record_after_each_copy(self, params) -> None:
        params = list(params)
        for param in params:  # DeepSpeed's own copy of each parameter, one at a time, an event after each
            init(self, [param])
            _record_copy(param, get_accelerator)
        self._NoGatherCoalescedHandle__params = params

    return record_after_each_copy


def copy_orders(config: dict, g: Groups) -> bool:
    """Where ``fetch_wait`` event orders copies per parameter (``hpi.planner.specs.plan.orders_copies``, the rule the
    cost model prices too), read from the stage's DeepSpeed config and groups."""
    offload = config.get("zero_optimization", {}).get("offload_param") or {}
    return bool(orders_copies(offload.get("device") == "nvme", g.dp))


def wrap_zero3(module: torch.nn.Module, config: dict, g: Groups, fetch_wait: str = "event"):
    """``deepspeed.initialize`` the stage for inference (no optimizer) and return the engine. ``event`` orders
    copies per parameter where ``copy_orders`` holds, and is the stream-ordered wait elsewhere."""
    import deepspeed

    if fetch_wait not in FETCH_WAITS:
        raise ValueError(f"fetch_wait {fetch_wait!r} is not one of {', '.join(FETCH_WAITS)}")
    scoped_trace_check(g)
    if fetch_wait == "event" and copy_orders(config, g):
        copy_ordered_fetch()
    elif fetch_wait != "host":
        stream_ordered_fetch()
    engine, *_ = deepspeed.initialize(model=module, config=config, mpu=DeepSpeedMpu(g))
    engine.eval()
    return engine


def hooked_modules(module: torch.nn.Module) -> int:
    """Modules of ``module`` with a forward pre-hook: after ``wrap_zero3``, the modules DeepSpeed fetches and
    releases parameters around (``parameter_offload.py`` ``_register_deepspeed_module`` hooks every module but
    what is inside a leaf module): what ``Plan.zero3_leaf`` changes."""
    return sum(1 for m in module.modules() if m._forward_pre_hooks)
