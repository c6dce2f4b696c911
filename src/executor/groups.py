"""torch.distributed process groups from the planner's rank order, and the ``mpu`` DeepSpeed reads.

The order is declared once, in ``hpi.planner.ranks`` (tp innermost, then dp, then pp); here every rank
creates every group of every kind in the same order (``new_group`` is collective over the world) and
keeps the ones it belongs to. Pipeline neighbours are the ranks with the same (tp, dp) coordinates in
the previous / next stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from hpi.planner.ranks import groups, rank_coords, rank_of


@dataclass(frozen=True)
class Groups:
    rank: int
    world_size: int
    tp: int
    dp: int
    pp: int
    tp_group: object  # ProcessGroup (a group of one rank when the degree is 1)
    dp_group: object  # the ZeRO-3 partition group
    pp_group: object
    tp_ranks: tuple[int, ...]
    dp_ranks: tuple[int, ...]
    pp_ranks: tuple[int, ...]

    @classmethod
    def alone(cls) -> "Groups":
        """A world of one rank, without process groups: one process driving a whole model (pp 1 sends
        nothing, and benchmark mode has no stop check, so nothing needs torch.distributed)."""
        return cls(rank=0, world_size=1, tp=1, dp=1, pp=1, tp_group=None, dp_group=None, pp_group=None,
                   tp_ranks=(0,), dp_ranks=(0,), pp_ranks=(0,))

    @property
    def coords(self) -> tuple[int, int, int]:
        return rank_coords(self.rank, self.tp, self.dp, self.pp)

    @property
    def tp_rank(self) -> int:
        return self.coords[0]

    @property
    def dp_rank(self) -> int:
        return self.coords[1]

    @property
    def stage(self) -> int:
        return self.coords[2]

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pp - 1

    def stage_peer(self, stage: int) -> int:
        """The rank with this rank's (tp, dp) coordinates on ``stage``."""
        return rank_of((self.tp_rank, self.dp_rank, stage), self.tp, self.dp, self.pp)

    @property
    def prev_rank(self) -> int | None:
        return None if self.is_first_stage else self.stage_peer(self.stage - 1)

    @property
    def next_rank(self) -> int | None:
        return None if self.is_last_stage else self.stage_peer(self.stage + 1)

    @property
    def first_stage_rank(self) -> int:
        return self.stage_peer(0)

    @property
    def last_stage_rank(self) -> int:
        return self.stage_peer(self.pp - 1)


def _mine(kind: str, rank: int, tp: int, dp: int, pp: int) -> tuple[object, tuple[int, ...]]:
    """Create every group of ``kind`` (all ranks must, in the same order) and return the one holding ``rank``."""
    mine, mine_ranks = None, (rank,)
    for members in groups(kind, tp, dp, pp):
        group = dist.new_group(ranks=members)
        if rank in members:
            mine, mine_ranks = group, tuple(members)
    return mine, mine_ranks


def build_groups(tp: int, dp: int, pp: int) -> Groups:
    rank, world = dist.get_rank(), dist.get_world_size()
    if tp * dp * pp != world:
        raise ValueError(f"tp({tp}) * dp({dp}) * pp({pp}) = {tp * dp * pp} != world({world}): "
                         "launch one rank per GPU of the plan")
    tp_group, tp_ranks = _mine("tp", rank, tp, dp, pp)
    dp_group, dp_ranks = _mine("dp", rank, tp, dp, pp)
    pp_group, pp_ranks = _mine("pp", rank, tp, dp, pp)
    return Groups(rank, world, tp, dp, pp, tp_group, dp_group, pp_group, tp_ranks, dp_ranks, pp_ranks)


class DeepSpeedMpu:
    """The model-parallel unit DeepSpeed asks for: ZeRO-3 partitions over the data-parallel group.

    DeepSpeed's engine reads the data-parallel group (and sizes, for batch bookkeeping) from it; the
    tensor and pipeline answers keep its sanity checks consistent with our layout.
    """

    def __init__(self, g: Groups) -> None:
        self.g = g

    def get_data_parallel_group(self):
        return self.g.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.g.dp

    def get_data_parallel_rank(self) -> int:
        return self.g.dp_rank

    def get_model_parallel_group(self):
        return self.g.tp_group

    def get_model_parallel_world_size(self) -> int:
        return self.g.tp

    def get_model_parallel_rank(self) -> int:
        return self.g.tp_rank

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_pipeline_model_parallel_group(self):
        return self.g.pp_group

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.g.pp

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.g.stage
