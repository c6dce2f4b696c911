"""The search space: the planner's top feasible discrete plans x the runtime knobs, as Optuna parameters.

A *discrete plan* (``DiscretePlan``) is what needs a different build: offload, tp, pp, dp and weight bits. The
planner ranks every one it can build; the study offers Optuna only the top few that fit (one categorical
parameter ``config``), because a real run costs a minute and a discrete plan the cost model puts 5x behind is
not worth one. Everything else is a runtime knob with a range derived from the model's shapes:

- ``log2_batch``: batch 2^k up to ``--max-batch`` (throughput; latency keeps the workload's batch);
- ``kv_offload``, ``pin_memory`` (only where something is copied from host memory, as the planner says);
- ``micro_batches_pp<P>`` for pipelined configs (1, P or 2P);
- ZeRO-3 knobs, only where ZeRO-3 gathers (offload, or dp > 1): ``prefetch_bucket_elems``,
  ``max_live_elems``, ``persistence_threshold_elems`` (log-uniform integers; the ranges hold DeepSpeed's
  defaults and DeepSpeedExamples' 2 h^2 / h);
- ``zero3_leaf`` (``module`` or ``layer``), where ZeRO-3 gathers but not from NVMe (``Plan.problems``): the
  leaf granularity the planner's search offers (``SearchSpace.zero3_leaves``); a study stored before the knob
  keeps DeepSpeed's per-module leaves, as it ran;
- NVMe offload only: ``nvme_buffer_count``, ``nvme_buffer_elems`` (at least the largest tensor partition,
  which DeepSpeed requires), and DeepSpeed's aio ``aio_block_size_bytes``, ``aio_queue_depth`` and
  ``aio_threads`` (categorical: the values the planner's search offers, ``hpi.planner.search.AIO_BLOCK_SIZES``,
  ``AIO_QUEUE_DEPTHS`` and ``AIO_THREADS``, plus the plan's defaults; the cost model prices them from the probe's
  read grid, ``hpi.planner.cost.aio``, and a block above the smallest swapped partition is a constraint violation).

``suggest_plan(trial, space)`` turns a trial into a Plan; ``params_of(plan, space)`` is its inverse (what
``study.enqueue_trial`` takes), and ``grid(space)`` a finite lattice of the same space that the planner
can rank in one vectorised pass.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Iterable

import numpy as np

from hpi.planner.cost.inputs import Knobs
from hpi.planner.cost.shape import module_table, per_rank
from hpi.planner.search import (
    AIO_BLOCK_SIZES,
    AIO_QUEUE_DEPTHS,
    AIO_THREADS,
    DEFAULT_BATCHES,
    SearchSpace,
    nvme_buffer_elems_for,
    search,
)
from hpi.planner.specs.hardware import HardwareProfile
from hpi.planner.specs.knob import degree_names
from hpi.planner.specs.model import ModelSpec
from hpi.planner.specs.plan import (
    DEEPSPEED_DEFAULT_MAX_LIVE_ELEMS,
    DEEPSPEED_DEFAULT_PERSISTENCE_ELEMS,
    DEEPSPEED_DEFAULT_PREFETCH_ELEMS,
    Plan,
    chooses_leaf,
    copies_from_host,
    ds_examples_knobs,
    gathers_weights,
)
from hpi.planner.specs.workload import Workload

OBJECTIVES = ("throughput", "latency")
DEFAULT_TOP_CONFIGS = 6
NVME_BUFFER_COUNTS = (2, 16)
AIO_BLOCK_CHOICES = tuple(sorted({Plan.aio_block_size_bytes, *AIO_BLOCK_SIZES}))
AIO_QUEUE_DEPTH_CHOICES = tuple(sorted({Plan.aio_queue_depth, *AIO_QUEUE_DEPTHS}))
AIO_THREAD_CHOICES = tuple(sorted({Plan.aio_threads, *AIO_THREADS}))
AIO_CHOICES = (("aio_block_size_bytes", AIO_BLOCK_CHOICES), ("aio_queue_depth", AIO_QUEUE_DEPTH_CHOICES),
               ("aio_threads", AIO_THREAD_CHOICES))


@dataclass(frozen=True, order=True)
class DiscretePlan:
    """One discrete plan: what a run must be rebuilt for (the Plan's ``build`` knobs)."""

    offload: str
    tp: int
    pp: int
    dp: int
    weight_bits: int

    @property
    def label(self) -> str:
        """The study's categorical ``config`` value (stored with every trial: its form must not change)."""
        return f"{self.offload} tp{self.tp} pp{self.pp} dp{self.dp} w{self.weight_bits}"

    @property
    def gathers(self) -> bool:
        """ZeRO-3 gathers weights every forward, so its prefetch knobs matter (``Plan.gathers``)."""
        return bool(gathers_weights(self.offload != "none", self.dp))

    @property
    def tunes_leaf(self) -> bool:
        """ZeRO-3's leaf granularity is a choice here: it gathers, and not from NVMe (``Plan.problems``)."""
        return bool(chooses_leaf(self.offload != "none", self.offload == "nvme", self.dp))

    @property
    def degrees(self) -> tuple[int, int, int]:
        return self.tp, self.pp, self.dp

    @classmethod
    def of(cls, plan: Plan) -> "DiscretePlan":
        return cls(**{f.name: getattr(plan, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class IntRange:
    """A log-uniform integer range and the lattice points the planner ranks inside it."""

    low: int
    high: int
    points: tuple[int, ...]

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"range [{self.low}, {self.high}] must satisfy 1 <= low <= high")
        outside = [p for p in self.points if not self.low <= p <= self.high]
        if outside:
            raise ValueError(f"lattice points {outside} lie outside [{self.low}, {self.high}]")

    @classmethod
    def spanning(cls, low: float, high: float, n: int, keep: Iterable[float] = ()) -> "IntRange":
        """``n`` log-spaced points from low to high, plus the named values (defaults) that fall inside."""
        lo, hi = int(max(1, round(low))), int(max(1, round(high)))
        hi = max(hi, lo)
        spaced = {int(round(v)) for v in np.geomspace(lo, hi, n)} if n > 1 else {lo}
        kept = {int(v) for v in keep if lo <= v <= hi}
        return cls(lo, hi, tuple(sorted(spaced | kept)))


@dataclass(frozen=True)
class Space:
    objective: str
    configs: tuple[DiscretePlan, ...]  # best predicted first
    batch: int | None  # fixed batch (latency objective); None: searched as 2^log2_batch
    max_log2_batch: int
    kv_offload: tuple[bool, ...]
    pin_memory: tuple[bool, ...]
    prefetch_bucket_elems: IntRange
    max_live_elems: IntRange
    persistence_threshold_elems: IntRange
    nvme_buffer_elems: IntRange | None  # None: no NVMe config in the space
    # The (aio block size, queue depth, threads) points of the lattice (``grid``) for NVMe configs: every choice
    # where the profile has the probe's read grid (the cost model tells them apart), else the defaults alone (every
    # choice predicts the same: 32 copies of each NVMe point would only slow the surrogate). Trials still
    # suggest every choice: a real run measures what the model cannot.
    aio_lattice: tuple[tuple[int, int, int], ...] = (
        (Plan.aio_block_size_bytes, Plan.aio_queue_depth, Plan.aio_threads),)
    # ZeRO-3 leaf granularities trials choose from where ``DiscretePlan.tunes_leaf``; the default is a study's from
    # before the knob (it ran DeepSpeed's per-module leaves), derive_space offers the planner's search's.
    zero3_leaves: tuple[str, ...] = (Plan.zero3_leaf,)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if not self.configs:
            raise ValueError("a search space needs at least one discrete plan")

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(c.label for c in self.configs)

    def config(self, label: str) -> DiscretePlan:
        for c in self.configs:
            if c.label == label:
                return c
        raise ValueError(f"config {label!r} is not in this study's space ({', '.join(self.labels)})")

    def batches(self) -> tuple[int, ...]:
        return (self.batch,) if self.batch is not None else tuple(2**k for k in range(self.max_log2_batch + 1))

    # ---- JSON (stored with the study so that a resumed study searches the very same space) -------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Space":
        def rng(v):
            return None if v is None else IntRange(v["low"], v["high"], tuple(v["points"]))

        return cls(
            objective=d["objective"],
            configs=tuple(DiscretePlan(**c) for c in d["configs"]),
            batch=d["batch"],
            max_log2_batch=d["max_log2_batch"],
            kv_offload=tuple(d["kv_offload"]),
            pin_memory=tuple(d["pin_memory"]),
            prefetch_bucket_elems=rng(d["prefetch_bucket_elems"]),
            max_live_elems=rng(d["max_live_elems"]),
            persistence_threshold_elems=rng(d["persistence_threshold_elems"]),
            nvme_buffer_elems=rng(d["nvme_buffer_elems"]),
            # a study from before the lattice, or before it held the thread count (the default then)
            aio_lattice=tuple((*p, Plan.aio_threads)[:3] for p in d.get("aio_lattice", cls.aio_lattice)),
            zero3_leaves=tuple(d.get("zero3_leaves", cls.zero3_leaves)),
        )


# ---- deriving the space from the planner ---------------------------------------------------------------


def _largest_module_elems(model: ModelSpec) -> float:
    """The largest module ZeRO-3 gathers at once (tp 1): the scale of every prefetch knob."""
    t = module_table(model)
    return float(per_rank(t, t.largest_gather, 1).max())


def knob_ranges(model: ModelSpec) -> tuple[IntRange, IntRange, IntRange]:
    """(prefetch bucket, max live, persistence threshold) ranges, from the model's shapes.

    Prefetch: from h^2 (half DeepSpeedExamples' 2 h^2) to 4 largest modules (beyond that the cost model
    and DeepSpeed both gain nothing). Max live: h^2 to max(1e9, 8 largest modules), DeepSpeed's 1e9
    inside. Persistence: h/4 (every vector streamed) to max(1e6, h^2/2) (small projections kept on the GPU).
    """
    h2 = float(model.hidden_size) ** 2
    largest = _largest_module_elems(model)
    ds_examples = ds_examples_knobs(model.hidden_size)
    prefetch = IntRange.spanning(h2, max(4 * largest, 2 * h2), 5,
                                 keep=(DEEPSPEED_DEFAULT_PREFETCH_ELEMS, ds_examples["prefetch_bucket_elems"]))
    max_live = IntRange.spanning(h2, max(DEEPSPEED_DEFAULT_MAX_LIVE_ELEMS, 8 * largest), 3,
                                 keep=(DEEPSPEED_DEFAULT_MAX_LIVE_ELEMS,))
    persistence = IntRange.spanning(max(model.hidden_size // 4, 1), max(1e6, h2 / 2), 3,
                                    keep=(DEEPSPEED_DEFAULT_PERSISTENCE_ELEMS,
                                          ds_examples["persistence_threshold_elems"]))
    return prefetch, max_live, persistence


def top_configs(
    model: ModelSpec,
    hardware: HardwareProfile,
    workload: Workload,
    objective: str,
    k: int = DEFAULT_TOP_CONFIGS,
    restrict: dict[str, Any] | None = None,
    batch: int = 1,
    max_batch: int = DEFAULT_BATCHES[-1],
) -> tuple[DiscretePlan, ...]:
    """The ``k`` best feasible discrete plans by the planner's ranking (its own grid of knobs)."""
    batches = (batch,) if objective == "latency" else tuple(b for b in DEFAULT_BATCHES if b <= max_batch) or (1,)
    restrict = restrict or {}
    fixed = {k: v for k, v in restrict.items() if not isinstance(v, tuple)}  # one value: hpi plan's flags
    several = {k: v for k, v in restrict.items() if isinstance(v, tuple)}  # e.g. offloads without nvme
    space = replace(SearchSpace(batch_sizes=batches).restrict(**fixed), **several)
    result = search(model, hardware, workload, space)
    ranked = result.ranked(objective, batch_size=batch)
    if not len(ranked):
        closest = [result.estimate(i) for i in result.closest_infeasible(1)]
        why = "; ".join(r.message for r in closest[0].reasons) if closest else "no plan could be built"
        raise ValueError(f"no feasible plan of {model.name} on {hardware.name} to tune: {why}")
    seen: list[DiscretePlan] = []
    for flat in ranked:
        c = DiscretePlan.of(result.plan(int(flat)))
        if c not in seen:
            seen.append(c)
        if len(seen) == k:
            break
    return tuple(seen)


def derive_space(
    model: ModelSpec,
    hardware: HardwareProfile,
    workload: Workload,
    objective: str,
    *,
    top: int = DEFAULT_TOP_CONFIGS,
    restrict: dict[str, Any] | None = None,
    batch: int = 1,
    max_batch: int = DEFAULT_BATCHES[-1],
) -> Space:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if max_batch < 1:
        raise ValueError(f"max batch {max_batch} < 1: pass --max-batch 1 or more")
    restrict = dict(restrict or {})
    configs = top_configs(model, hardware, workload, objective, top, restrict, batch, max_batch)
    prefetch, max_live, persistence = knob_ranges(model)
    nvme = [c for c in configs if c.offload == "nvme"]
    nvme_range = None
    if nvme:
        need = max(nvme_buffer_elems_for(model, c.tp, c.dp) for c in nvme)
        nvme_range = IntRange.spanning(need, 4 * need, 2)
    kv = restrict.get("kv_offload")
    pin = restrict.get("pin_memory")
    leaf = restrict.get("zero3_leaves")
    return Space(
        objective=objective,
        configs=configs,
        batch=batch if objective == "latency" else None,
        max_log2_batch=int(math.floor(math.log2(max_batch))),
        kv_offload=(kv,) if kv is not None else (False, True),
        pin_memory=(pin,) if pin is not None else (True, False),
        prefetch_bucket_elems=prefetch,
        max_live_elems=max_live,
        persistence_threshold_elems=persistence,
        nvme_buffer_elems=nvme_range,
        aio_lattice=aio_lattice_for(hardware),
        zero3_leaves=(leaf,) if leaf is not None else SearchSpace.zero3_leaves,
    )


def aio_lattice_for(hardware: HardwareProfile) -> tuple[tuple[int, int, int], ...]:
    """Every (block size, queue depth, threads) choice where ``hardware`` has the probe's read grid, else the
    defaults."""
    if hardware.nvme is None or not hardware.nvme.read_grid:
        return Space.aio_lattice
    return tuple(itertools.product(*(choices for _, choices in AIO_CHOICES)))


# ---- trial <-> plan ------------------------------------------------------------------------------------


def _micro_param(pp: int) -> str:
    return f"micro_batches_pp{pp}"


def _micro_choices(pp: int) -> tuple[int, ...]:
    return (1, pp, 2 * pp)


def _fit_micro_batches(per_replica: int, wanted: int) -> int:
    """The largest micro-batch count <= wanted that divides the batch per replica."""
    return max(m for m in range(1, max(wanted, 1) + 1) if per_replica % m == 0)


def _fit_batch(batch: int, dp: int) -> int:
    """Round up to a multiple of dp (each replica takes an equal share)."""
    return max(dp, -(-batch // dp) * dp)


def suggest_plan(trial, space: Space) -> Plan:
    """Ask ``trial`` (an optuna Trial or FixedTrial) for one point of the space; returns the Plan to run."""
    config = space.config(trial.suggest_categorical("config", space.labels))
    if space.batch is not None:
        batch = space.batch
    else:
        batch = 2 ** trial.suggest_int("log2_batch", 0, space.max_log2_batch)
    batch = _fit_batch(batch, config.dp)
    kv = trial.suggest_categorical("kv_offload", space.kv_offload) if len(space.kv_offload) > 1 else space.kv_offload[0]
    pin = True
    if copies_from_host(config.offload == "cpu", kv):
        pin = (trial.suggest_categorical("pin_memory", space.pin_memory) if len(space.pin_memory) > 1
               else space.pin_memory[0])
    micro = 1
    if config.pp > 1:
        wanted = trial.suggest_categorical(_micro_param(config.pp), _micro_choices(config.pp))
        micro = _fit_micro_batches(batch // config.dp, wanted)
    plan = Plan(offload=config.offload, tp=config.tp, pp=config.pp, dp=config.dp, weight_bits=config.weight_bits,
                pin_memory=pin, kv_offload=kv, batch_size=batch, micro_batches=micro)
    if config.gathers:
        plan = plan.with_(
            prefetch_bucket_elems=_suggest_range(trial, "prefetch_bucket_elems", space.prefetch_bucket_elems),
            max_live_elems=_suggest_range(trial, "max_live_elems", space.max_live_elems),
            persistence_threshold_elems=_suggest_range(trial, "persistence_threshold_elems",
                                                       space.persistence_threshold_elems),
        )
    if config.tunes_leaf:
        plan = plan.with_(zero3_leaf=trial.suggest_categorical("zero3_leaf", space.zero3_leaves)
                          if len(space.zero3_leaves) > 1 else space.zero3_leaves[0])
    if config.offload == "nvme" and space.nvme_buffer_elems is not None:
        plan = plan.with_(
            nvme_buffer_count=trial.suggest_int("nvme_buffer_count", *NVME_BUFFER_COUNTS),
            nvme_buffer_elems=_suggest_range(trial, "nvme_buffer_elems", space.nvme_buffer_elems),
            **{name: trial.suggest_categorical(name, choices) for name, choices in AIO_CHOICES},
        )
    return plan


def _suggest_range(trial, name: str, r: IntRange) -> int:
    return trial.suggest_int(name, r.low, r.high, log=True) if r.low < r.high else r.low


def params_of(plan: Plan, space: Space) -> dict[str, Any]:
    """The trial parameters that make ``suggest_plan`` return ``plan`` (for ``study.enqueue_trial``)."""
    config = DiscretePlan.of(plan)
    space.config(config.label)  # raises when the plan's discrete part is not in the space
    params: dict[str, Any] = {"config": config.label}
    if space.batch is None:
        k = int(round(math.log2(plan.batch_size)))
        if 2**k != plan.batch_size or not 0 <= k <= space.max_log2_batch:
            raise ValueError(f"batch {plan.batch_size} is not 2^k with k <= {space.max_log2_batch}")
        params["log2_batch"] = k
    if len(space.kv_offload) > 1:
        params["kv_offload"] = plan.kv_offload
    if plan.copies_from_host_memory and len(space.pin_memory) > 1:
        params["pin_memory"] = plan.pin_memory
    if plan.pp > 1:
        # The choice that suggest_plan fits down to this count (a small batch takes fewer micro-batches).
        per_replica = plan.batch_size // plan.dp
        fits = [m for m in _micro_choices(plan.pp) if _fit_micro_batches(per_replica, m) == plan.micro_batches]
        if not fits:
            raise ValueError(f"micro-batches {plan.micro_batches} is not in this study's space")
        params[_micro_param(plan.pp)] = fits[0]
    if config.gathers:
        for name in ("prefetch_bucket_elems", "max_live_elems", "persistence_threshold_elems"):
            r: IntRange = getattr(space, name)
            if r.low < r.high:
                params[name] = int(min(max(getattr(plan, name), r.low), r.high))
    if config.tunes_leaf:
        if plan.zero3_leaf not in space.zero3_leaves:
            raise ValueError(f"zero3_leaf {plan.zero3_leaf} is not one of this study's {space.zero3_leaves}")
        if len(space.zero3_leaves) > 1:
            params["zero3_leaf"] = plan.zero3_leaf
    if config.offload == "nvme" and space.nvme_buffer_elems is not None:
        params["nvme_buffer_count"] = int(min(max(plan.nvme_buffer_count, NVME_BUFFER_COUNTS[0]),
                                              NVME_BUFFER_COUNTS[1]))
        r = space.nvme_buffer_elems
        if r.low < r.high:
            params["nvme_buffer_elems"] = int(min(max(plan.nvme_buffer_elems, r.low), r.high))
        for name, choices in AIO_CHOICES:
            if getattr(plan, name) not in choices:
                raise ValueError(f"{name} {getattr(plan, name)} is not one of this study's {choices}")
            params[name] = getattr(plan, name)
    return params


def run_key(plan: Plan) -> str:
    """Plans that run identically share a key: the key of the canonical plan (``Plan.canonical``: knobs that
    change nothing, like pinning where nothing is copied from host memory, at their defaults)."""
    return plan.canonical().key()


# ---- a finite lattice of the space ---------------------------------------------------------------------


@dataclass(frozen=True)
class Lattice:
    """Grid points of the space grouped by arrangement (tp, pp, dp): each group is one vectorised evaluation."""

    degrees: tuple[tuple[int, int, int], ...]  # (tp, pp, dp) of each group
    knobs: tuple[Knobs, ...]
    configs: tuple[np.ndarray, ...]  # per group: index into ``space.configs`` of each row

    @property
    def size(self) -> int:
        return sum(k.n for k in self.knobs)

    def plan(self, group: int, row: int) -> Plan:
        return self.knobs[group].plan(row, dict(zip(degree_names(Plan), self.degrees[group])))


def _config_rows(config: DiscretePlan, space: Space, model: ModelSpec) -> list[dict[str, Any]]:
    """The lattice points of one discrete plan, each a dict of the Plan's knobs (less the degrees)."""
    rows = []
    knob_points = [(Plan.prefetch_bucket_elems, Plan.max_live_elems, Plan.persistence_threshold_elems)]
    if config.gathers:
        knob_points = list(itertools.product(space.prefetch_bucket_elems.points, space.max_live_elems.points,
                                             space.persistence_threshold_elems.points))
    nvme_points = [(Plan.nvme_buffer_count, Plan.nvme_buffer_elems, *Space.aio_lattice[0])]
    if config.offload == "nvme" and space.nvme_buffer_elems is not None:
        need = nvme_buffer_elems_for(model, config.tp, config.dp)
        nvme_points = [(c, e, *aio) for c in (4, 8) for e in space.nvme_buffer_elems.points if e >= need
                       for aio in space.aio_lattice]
    micro = _micro_choices(config.pp) if config.pp > 1 else (1,)
    leaves = space.zero3_leaves if config.tunes_leaf else (Plan.zero3_leaf,)
    for batch, kv in itertools.product(space.batches(), space.kv_offload):
        batch = _fit_batch(batch, config.dp)
        pins = space.pin_memory if copies_from_host(config.offload == "cpu", kv) else (True,)
        mbs = sorted({_fit_micro_batches(batch // config.dp, m) for m in micro})
        for pin, mb, leaf, (bucket, live, persist), (count, elems, block, depth, threads) in itertools.product(
                pins, mbs, leaves, knob_points, nvme_points):
            rows.append({"offload": config.offload, "weight_bits": config.weight_bits, "pin_memory": pin,
                         "kv_offload": kv, "batch_size": batch, "micro_batches": mb, "prefetch_bucket_elems": bucket,
                         "max_live_elems": live, "persistence_threshold_elems": persist, "nvme_buffer_count": count,
                         "nvme_buffer_elems": elems, "aio_block_size_bytes": block, "aio_queue_depth": depth,
                         "aio_threads": threads, "zero3_leaf": leaf})
    return rows


def grid(space: Space, model: ModelSpec) -> Lattice:
    by_degrees: dict[tuple[int, int, int], list[tuple[int, dict[str, Any]]]] = {}
    for ci, config in enumerate(space.configs):
        for row in _config_rows(config, space, model):
            by_degrees.setdefault(config.degrees, []).append((ci, row))
    degrees, knobs, configs = [], [], []
    for key, items in by_degrees.items():
        rows = [row for _, row in items]
        degrees.append(key)
        configs.append(np.array([ci for ci, _ in items], dtype=int))
        knobs.append(Knobs.from_fields({name: [r[name] for r in rows] for name in rows[0]}, len(rows)))
    return Lattice(tuple(degrees), tuple(knobs), tuple(configs))


def widen(space: Space, extra: Iterable[DiscretePlan], model: ModelSpec) -> Space:
    """The same space with more discrete plans (the simulation's exhaustive optimum looks beyond the top k)."""
    configs = list(space.configs)
    configs += [c for c in extra if c not in configs]
    nvme_range = space.nvme_buffer_elems
    nvme = [c for c in configs if c.offload == "nvme"]
    if nvme and nvme_range is None:
        need = max(nvme_buffer_elems_for(model, c.tp, c.dp) for c in nvme)
        nvme_range = IntRange.spanning(need, 4 * need, 2)
    return replace(space, configs=tuple(configs), nvme_buffer_elems=nvme_range)
