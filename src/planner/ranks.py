"""The rank grid, declared once, and its placement on a topology's GPUs.

Rank order is ``RANK_ORDER = ("tp", "dp", "pp")``, tp innermost (Megatron's "tp-dp-pp"):

    rank = tp_idx + tp * (dp_idx + dp * pp_idx)

so a TP group is ``tp`` consecutive ranks, a DP (ZeRO-3 partition) group strides by ``tp`` and a pipeline
group by ``tp * dp``; pipeline stage ``s`` is the block of ranks ``[s*tp*dp, (s+1)*tp*dp)``. Every group
is derived from this order by ``groups`` (Megatron ``RankGenerator`` style), nothing else spells it out.

``place(plan, topology)`` puts rank r on the r-th GPU of an island-packed GPU order and reduces the
result to a ``Placement``: the slowest link each kind of group uses, host and NVMe bandwidth per GPU with
every rank streaming at once, and notes that explain the consequences in words.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

from hpi.planner.specs.placement import Link, Placement
from hpi.planner.specs.plan import Plan
from hpi.planner.topology import Topology, link_words

__all__ = ["RANK_ORDER", "rank_coords", "rank_of", "groups", "stage_ranks", "rank_gpus", "place"]

RANK_ORDER = ("tp", "dp", "pp")  # innermost first


# ---- the rank grid ------------------------------------------------------------------------------------


def _check_sizes(tp: int, dp: int, pp: int) -> None:
    for name, size in (("tp", tp), ("dp", dp), ("pp", pp)):
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"{name} = {size!r} must be an integer >= 1")


def rank_coords(rank: int, tp: int, dp: int, pp: int) -> tuple[int, int, int]:
    """``(tp_idx, dp_idx, pp_idx)`` of a rank."""
    _check_sizes(tp, dp, pp)
    world = tp * dp * pp
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside tp({tp}) * dp({dp}) * pp({pp}) = {world} ranks")
    return rank % tp, (rank // tp) % dp, rank // (tp * dp)


def rank_of(coords: tuple[int, int, int], tp: int, dp: int, pp: int) -> int:
    """Inverse of ``rank_coords``: the rank at ``(tp_idx, dp_idx, pp_idx)``."""
    _check_sizes(tp, dp, pp)
    t, d, p = coords
    for name, idx, size in (("tp", t, tp), ("dp", d, dp), ("pp", p, pp)):
        if not 0 <= idx < size:
            raise ValueError(f"{name} index {idx} is outside 0..{size - 1}")
    return t + tp * (d + dp * p)


def groups(kind: str, tp: int, dp: int, pp: int) -> list[list[int]]:
    """Process groups of ``kind`` ("tp", "dp", "pp", or a combination such as "tp-dp"), ranks ascending.

    Ranks in one group differ only in the named coordinates; the groups partition the world. Groups are
    listed with the remaining coordinates in rank order (innermost fastest), as Megatron's
    ``RankGenerator.get_ranks`` does.
    """
    _check_sizes(tp, dp, pp)
    axes = kind.split("-")
    unknown = [a for a in axes if a not in RANK_ORDER]
    if unknown or len(set(axes)) != len(axes):
        raise ValueError(f"group kind {kind!r}: expected distinct names from {', '.join(RANK_ORDER)} joined by '-'")
    sizes = {"tp": tp, "dp": dp, "pp": pp}
    outer_first = tuple(reversed(RANK_ORDER))  # numpy C order: the last axis varies fastest
    grid = np.arange(tp * dp * pp).reshape([sizes[a] for a in outer_first])
    grouped = [i for i, a in enumerate(outer_first) if a in axes]  # keep their relative order: ranks ascend
    rest = [i for i, a in enumerate(outer_first) if a not in axes]
    group_size = int(np.prod([sizes[a] for a in axes]))
    return grid.transpose(rest + grouped).reshape(-1, group_size).tolist()


def stage_ranks(stage: int, tp: int, dp: int, pp: int) -> list[int]:
    """The ranks of pipeline stage ``stage``: one contiguous block of ``tp * dp`` ranks."""
    _check_sizes(tp, dp, pp)
    if not 0 <= stage < pp:
        raise ValueError(f"stage {stage} is outside 0..{pp - 1}")
    return list(range(stage * tp * dp, (stage + 1) * tp * dp))


# ---- placement ----------------------------------------------------------------------------------------


def rank_gpus(tp: int, dp: int, pp: int, topology: Topology) -> tuple[str, ...]:
    """The GPU of every rank: ``topology.gpus`` packed so that TP groups fill NVLink islands.

    Within each node, every island contributes as many whole TP groups as it holds (``size // tp``).
    If those whole groups cover the world, ranks take them node by node; otherwise each node's leftover
    GPUs follow its packed ones, in topology order, for the groups that cannot stay in one island. When
    tp divides the island size this is exactly ``topology.gpus``.
    """
    _check_sizes(tp, dp, pp)
    world, available = tp * dp * pp, len(topology.gpus)
    if world > available:
        raise ValueError(
            f"tp({tp}) * dp({dp}) * pp({pp}) = {world} > {available} GPUs on {topology.name}: lower tp, pp or dp"
        )
    packed: dict[int, list[str]] = {}
    leftover: dict[int, list[str]] = {}
    for island in topology.islands():  # in topology order: by node, then island
        node = topology.node_of(island[0])
        whole = len(island) // tp * tp
        packed.setdefault(node, []).extend(island[:whole])
        leftover.setdefault(node, []).extend(island[whole:])
    rank = {gpu: i for i, gpu in enumerate(topology.gpus)}
    if world <= sum(len(g) for g in packed.values()):
        order = [gpu for node in sorted(packed) for gpu in packed[node]]
    else:
        order = [gpu for node in sorted(packed) for gpu in packed[node] + sorted(leftover[node], key=rank.get)]
    return tuple(order[:world])


def place(plan: Plan, topology: Topology) -> Placement:
    """Where the plan's ranks run and the link, host and NVMe figures the cost model needs (cached)."""
    key = (plan.tp, plan.dp, plan.pp, topology.name)
    if key not in topology.place_cache:
        topology.place_cache[key] = _place(plan.tp, plan.dp, plan.pp, topology)
    return topology.place_cache[key]


def _place(tp: int, dp: int, pp: int, topology: Topology) -> Placement:
    gpus = rank_gpus(tp, dp, pp, topology)
    tp_groups = _gpu_groups(groups("tp", tp, dp, pp), gpus)
    dp_groups = _gpu_groups(groups("dp", tp, dp, pp), gpus)
    tp_link = topology.rings_link(tp_groups)
    dp_link = topology.rings_link(dp_groups)
    pp_link = _pipeline_link(_gpu_groups(groups("pp", tp, dp, pp), gpus), topology)
    pinned = topology.host_to_gpu_bytes_s(gpus, pinned=True)
    pageable = topology.host_to_gpu_bytes_s(gpus, pinned=False)
    nvme = topology.nvme_to_gpu_bytes_s(gpus)
    per_stage = tp * dp  # ranks of one stage: consecutive in the rank order (pp outermost)

    def first_stages(rates) -> tuple[float, ...]:
        return tuple(min(rates(gpus[: k * per_stage]).values()) for k in range(1, pp + 1))
    placement = Placement(
        tp=tp,
        pp=pp,
        dp=dp,
        rank_gpus=gpus,
        tp_link=tp_link,
        dp_link=dp_link,
        pp_link=pp_link,
        h2d_pinned_bytes_s=min(pinned.values()),
        h2d_pageable_bytes_s=min(pageable.values()),
        nvme_read_bytes_s=min(nvme.values()),
        nodes_used=len(topology.nodes_of(gpus)),
        h2d_pinned_by_stages=first_stages(lambda g: topology.host_to_gpu_bytes_s(g, pinned=True)),
        h2d_pageable_by_stages=first_stages(lambda g: topology.host_to_gpu_bytes_s(g, pinned=False)),
        nvme_read_by_stages=first_stages(topology.nvme_to_gpu_bytes_s),
    )
    notes = _notes(placement, topology, tp_groups, dp_groups)
    return replace(placement, notes=tuple(notes))


def _gpu_groups(rank_groups: list[list[int]], gpus: Sequence[str]) -> list[tuple[str, ...]]:
    return [tuple(gpus[r] for r in group) for group in rank_groups]


def _pipeline_link(pp_groups: list[tuple[str, ...]], topology: Topology) -> Link:
    """Slowest stage-to-stage send: at each stage boundary every pipeline group sends at once."""
    boundaries = len(pp_groups[0]) - 1
    links = [topology.concurrent_link([(g[s], g[s + 1]) for g in pp_groups]) for s in range(boundaries)]
    return min(links, key=lambda link: (link.bandwidth_bytes_s, -link.latency_s), default=Link.local())


def _gb(bytes_s: float) -> str:
    return f"{bytes_s / 1e9:.3g} GB/s"


def _notes(p: Placement, topology: Topology, tp_groups, dp_groups) -> list[str]:
    notes = []
    n_gpus = len(topology.gpus)
    if p.world_size < n_gpus:
        notes.append(f"uses {p.world_size} of {n_gpus} GPUs")
    if p.tp > 1:
        nodes = max(len(topology.nodes_of(g)) for g in tp_groups)
        islands = max(len({topology.island_of(x) for x in g}) for g in tp_groups)
        via = f"all-reduce over {link_words(p.tp_link.kind)} at {_gb(p.tp_link.bandwidth_bytes_s)}"
        if nodes > 1:
            notes.append(f"TP group spans {nodes} nodes: {via}")
        elif islands > 1 and any(len(i) > 1 for i in topology.islands()):
            notes.append(f"TP group spans {islands} NVLink islands: {via}")
        elif islands > 1:
            notes.append(f"TP group has no NVLink: {via}")
    if p.dp > 1 and max(len(topology.nodes_of(g)) for g in dp_groups) > 1:
        notes.append(f"ZeRO-3 (dp) group spans nodes: parameter all-gather over "
                     f"{link_words(p.dp_link.kind)} at {_gb(p.dp_link.bandwidth_bytes_s)}")
    if p.pp > 1 and p.nodes_used > 1 and p.pp_link.kind in ("ib", "roce", "ethernet"):
        via = f"{link_words(p.pp_link.kind)} at {_gb(p.pp_link.bandwidth_bytes_s)}"
        notes.append(f"pipeline crosses nodes over {via} per GPU")
    alone = min(topology.host_to_gpu_bytes_s([g], pinned=True)[g] for g in p.rank_gpus)
    if p.world_size > 1 and p.h2d_pinned_bytes_s < alone * (1 - 1e-6):
        notes.append(f"{p.world_size} GPUs stream from host memory at once: {_gb(p.h2d_pinned_bytes_s)} pinned each "
                     f"instead of {_gb(alone)} alone (shared PCIe links)")
    return notes
