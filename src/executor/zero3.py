"""DeepSpeed ZeRO-3 around one stage's module, partitioned over that stage's data-parallel group.

DeepSpeed assumes one model per world. Two places need care when each pipeline stage is a different
module with its own ZeRO-3 engine:

- ``PartitionedParameterCoordinator.reset_step`` checks, when a module trace is first recorded, that
  every rank recorded the same trace, with broadcasts over the WORLD group (``zero.utils.
  assert_ints_same_as_other_ranks``). Stages record different traces (different layers), and a world
  broadcast from inside one stage's forward deadlocks against a stage waiting in ``recv``. What the
  check protects is agreement inside a partition group, so we scope it to the rank's dp group (and skip
  it for a group of one). ``scoped_trace_check`` installs that, once per process.
- The partition group itself comes from the ``mpu`` (``executor.groups.DeepSpeedMpu``), which DeepSpeed
  reads when AutoTP is off (our own TP sharding does not use AutoTP).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from executor.groups import DeepSpeedMpu, Groups

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
            raise RuntimeError(f"ZeRO-3 trace length differs inside dp group {g.dp_ranks}: {int(length.item())} vs {len(ints)}")
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


def wrap_zero3(module: torch.nn.Module, config: dict, g: Groups):
    """``deepspeed.initialize`` the stage for inference (no optimizer) and return the engine."""
    import deepspeed

    scoped_trace_check(g)
    engine, *_ = deepspeed.initialize(model=module, config=config, mpu=DeepSpeedMpu(g))
    engine.eval()
    return engine
