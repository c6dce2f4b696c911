"""Enumerate the plan space, evaluate it in vectorised arrangement groups, rank it, find the Pareto front.

Pruning before evaluation: only arrangements (tp, pp, dp) that can be built
(``feasibility.arrangement_problems``), degrees that are powers of two or divide the GPU count, knobs that
matter (pinning only where something is copied from host memory, prefetch buckets only where ZeRO-3
gathers). Everything else is evaluated, and an infeasible plan is kept with its reasons:
``SearchResult.infeasible_counts`` says how many broke which limit.

Objectives:
- latency: lowest decode step at the workload's batch (default 1), then lowest TTFT
- throughput: highest batch * gen / total time, each configuration at its best batch
- balanced: highest sqrt(throughput / best throughput * best latency / decode step), the geometric
  mean of the two normalised scores, each configuration at its best batch for that score
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from hpi.planner.cost.estimate import Evaluation, evaluate, leaf_elems, routing_waits_for_leaf
from hpi.planner.cost.inputs import Arrangement, Knobs, make_arrangement
from hpi.planner.cost.shape import largest_swapped_partition, swaps_per_module
from hpi.planner.cost.streaming import NVME_BUFFERS_OVERLAP_COMPUTE, NVME_BUFFERS_PIPELINED
from hpi.planner.feasibility import arrangement_problems, capacity_masks, quantization_problems
from hpi.planner.predict import Estimate, estimate_from_evaluation, predict_many
from hpi.planner.ranks import place
from hpi.planner.specs.hardware import HardwareProfile
from hpi.planner.specs.model import ModelSpec
from hpi.planner.specs.plan import (
    DEEPSPEED_DEFAULT_PREFETCH_ELEMS,
    Plan,
    chooses_leaf,
    copies_from_host,
    ds_examples_knobs,
    gathers_weights,
)
from hpi.planner.specs.workload import Workload
from hpi.planner.topology import build_topology

OBJECTIVES = ("latency", "throughput", "balanced")
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
NVME_BUFFER_DEFAULT_ELEMS = 100_000_000
# A configuration is a plan up to these: each configuration is ranked at its best batch, micro-batch count,
# prefetch bucket, NVMe buffer count, aio settings and ZeRO-3 leaf granularity.
RANKED_WITHIN_CONFIGURATION = ("batch_size", "micro_batches", "prefetch_bucket_elems", "max_live_elems",
                               "nvme_buffer_count", "aio_block_size_bytes", "aio_queue_depth", "aio_threads",
                               "zero3_leaf_layer")
MIB = 1024**2
# The aio settings offered where the profile has the probe's read grid (``cost.aio``), the plan's defaults
# first (the ranking's stable sort keeps them where others predict the same). Block sizes: DeepSpeed's 1 MiB
# (also its swap floor), 4 and 16 MiB, the probe grid's request sizes: larger requests need fewer in flight;
# and 8 MiB, the largest that swaps every partition of a Llama-3-8B-shaped model (its k and v projections),
# which read at 0.80 of one H200 disk's sequential rate with one thread (benchmarks/results/
# 2026-12-05-h200-issue20/SUMMARY.md "NVMe"). A block above the smallest swapped partition is infeasible
# (``feasibility`` ``aio_block_size``). Queue depths per thread: DeepSpeed's 8, 32 and 128 around the plan's 64;
# with 8 threads 64 to 1024 requests in flight at most, beyond the grid's 128 (where it saturates, its edge
# holds). Threads: DeepSpeed's one (it reads at the grid's rate) and the plan's 8 (``cost.aio``
# ``aio_read_efficiency``: the two counts the records measured).
AIO_BLOCK_SIZES = (MIB, 4 * MIB, 8 * MIB, 16 * MIB)
AIO_QUEUE_DEPTHS = (8, 32, 128)
AIO_THREADS = (1, 8)


@dataclass(frozen=True)
class SearchSpace:
    offloads: tuple[str, ...] = ("none", "cpu", "nvme")
    weight_bits: tuple[int, ...] = (16, 8, 4)
    batch_sizes: tuple[int, ...] = DEFAULT_BATCHES
    kv_offload: tuple[bool, ...] = (False, True)
    pin_memory: tuple[bool, ...] = (True, False)
    tp: tuple[int, ...] | None = None  # None: every buildable degree
    pp: tuple[int, ...] | None = None
    dp: tuple[int, ...] | None = None
    max_micro_batch_factor: int = 2  # micro-batches in {1, pp, 2 pp}
    # ZeRO-3 leaf granularity (Plan.zero3_leaf), each configuration ranked at its better one: DeepSpeed's per-module
    # hooks or a decoder layer at once (priced by cost.overhead and shape.leaf_module from a CPU measurement; one H200
    # session measured layer leaves 1.16-1.44x faster on the 70B 4-bit stream and 1.16-1.28x on the 8B, predicted
    # 4-12% fast: benchmarks/results/2026-12-05-h200-leaf). Not with NVMe (Plan.problems).
    zero3_leaves: tuple[str, ...] = ("module", "layer")

    def restrict(self, **fixed) -> "SearchSpace":
        """A copy with some axes pinned to one value (``hpi plan --tp 2`` etc.)."""
        from dataclasses import replace

        changes = {k: (v,) for k, v in fixed.items() if v is not None}
        return replace(self, **changes)


def _degrees(limit: int) -> list[int]:
    """Powers of two and divisors of ``limit``, up to ``limit``."""
    powers = {2**i for i in range(int(math.log2(max(limit, 1))) + 1)}
    divisors = {d for d in range(1, limit + 1) if limit % d == 0}
    return sorted(d for d in powers | divisors if d <= limit)


def candidate_arrangements(model: ModelSpec, hardware: HardwareProfile,
                           space: SearchSpace) -> list[tuple[int, int, int]]:
    n = hardware.n_gpus
    tps = space.tp or _degrees(n)
    pps = space.pp or [d for d in _degrees(n) if d <= model.n_layers]
    dps = space.dp or _degrees(n)
    return [
        (tp, pp, dp)
        for tp, pp, dp in itertools.product(tps, pps, dps)
        if not any(True for _ in arrangement_problems(model, hardware, tp, pp, dp))
    ]


def prefetch_buckets(model: ModelSpec) -> tuple[int, ...]:
    """DeepSpeed's default (5e7) and DeepSpeedExamples' ZeRO-Inference choice (2 * hidden^2)."""
    ds_examples = ds_examples_knobs(model.hidden_size)["prefetch_bucket_elems"]
    return tuple(sorted({DEEPSPEED_DEFAULT_PREFETCH_ELEMS, ds_examples}))


def _default_where_idle(column: np.ndarray, default: float, applies: np.ndarray) -> np.ndarray:
    """Rows that leave a knob at its default where it changes nothing (``Knob.applies``)."""
    return applies | (column == default)


def _offered(default: int, values: tuple[int, ...], offer: bool) -> list[int]:
    """``default`` first, then the other ``values`` where ``offer``."""
    return [default] + ([v for v in values if v != default] if offer else [])


def _grid(arrangement: Arrangement, space: SearchSpace, has_nvme: bool, nvme_buffer_elems: int,
          plan_type: type = Plan) -> Knobs:
    """Every knob combination worth evaluating for one arrangement, as arrays: the product of the space's
    axes, less the rows that split the batch unevenly or vary a knob where it changes nothing (pinning where
    nothing is copied from host memory, the prefetch bucket where ZeRO-3 gathers nothing, the NVMe buffer
    count and aio settings where nothing is swapped). The buffer count is the innermost axis but for the aio
    settings, DeepSpeed's default first: where fewer buffers predict the same times, the ranking's stable sort
    keeps the default. The aio settings are offered only where the profile has the probe's read grid: without
    it every setting predicts the same (``cost.aio``)."""
    dp, pp = arrangement.dp, arrangement.pp
    nvme = arrangement.hardware.nvme
    tune_aio = has_nvme and nvme is not None and bool(nvme.read_grid)
    quantizable = not any(True for _ in quantization_problems(arrangement.model, arrangement.tp))
    k = Knobs.product({
        "offload": [o for o in space.offloads if o != "nvme" or has_nvme],
        "weight_bits": [b for b in space.weight_bits if b == 16 or quantizable],
        "kv_offload": space.kv_offload,
        "pin_memory": space.pin_memory,
        "batch_size": space.batch_sizes,
        "micro_batches": sorted({1, pp, pp * space.max_micro_batch_factor}) if pp > 1 else [1],
        "prefetch_bucket_elems": prefetch_buckets(arrangement.model),
        "nvme_buffer_count": (nvme_buffer_counts_for(arrangement.model, arrangement.tp, dp) if has_nvme
                              else [plan_type.nvme_buffer_count]),
        "aio_block_size_bytes": _offered(plan_type.aio_block_size_bytes, AIO_BLOCK_SIZES, tune_aio),
        "aio_queue_depth": _offered(plan_type.aio_queue_depth, AIO_QUEUE_DEPTHS, tune_aio),
        "aio_threads": _offered(plan_type.aio_threads, AIO_THREADS, tune_aio),
        "zero3_leaf": space.zero3_leaves,
    }, fixed={"nvme_buffer_elems": nvme_buffer_elems}, plan_type=plan_type)
    even = (k.batch_size % dp == 0) & ((k.batch_size // dp) % k.micro_batches == 0)
    pins = _default_where_idle(k.pin_memory, plan_type.pin_memory, copies_from_host(k.offload_cpu, k.kv_offload))
    buckets = _default_where_idle(k.prefetch_bucket_elems, plan_type.prefetch_bucket_elems,
                                  gathers_weights(k.offloaded, dp))
    buffers = _default_where_idle(k.nvme_buffer_count, plan_type.nvme_buffer_count, k.offload_nvme)
    aio = (_default_where_idle(k.aio_block_size_bytes, plan_type.aio_block_size_bytes, k.offload_nvme)
           & _default_where_idle(k.aio_queue_depth, plan_type.aio_queue_depth, k.offload_nvme)
           & _default_where_idle(k.aio_threads, plan_type.aio_threads, k.offload_nvme))
    module_leaves = ~k.zero3_leaf_layer
    leaves = module_leaves | chooses_leaf(k.offloaded, k.offload_nvme, dp)
    return with_layer_buckets(arrangement, k.take(np.flatnonzero(even & pins & buckets & buffers & aio & leaves)))


def with_layer_buckets(arrangement: Arrangement, k: Knobs) -> Knobs:
    """``k``, then a copy of each of its rows at DeepSpeed's default bucket whose routed-expert layer leaf outgrows
    that bucket (``cost.estimate.routing_waits_for_leaf``: the router waits for the layer's copy, and copy and
    compute take turns), with a bucket that holds the stage's largest layer and a max live that holds two.

    Both count DeepSpeed's stored elements (``Knobs.ds_numel_per_matrix_weight``): a Mixtral-8x22B layer of 2.5 G
    4-bit weights is a 7.0e8 bucket and 1.4e9 max live (2.8 GB gathered), where the 3e9 / 6e9 measured on one H200
    held four layers in flight and 12.7 GB (benchmarks/results/2026-12-05-issue20-leaf-agreement). The layer's
    16-bit router and norms count a little more than their share of the bucket; DeepSpeed's prefetch adds whole
    parameters until the bucket is full, so the shortfall, smaller than one projection, still queues the whole
    layer."""
    waits = routing_waits_for_leaf(arrangement, k).any(axis=1)
    rows = np.flatnonzero(waits & (k.prefetch_bucket_elems == Plan.prefetch_bucket_elems))
    if not len(rows):
        return k
    extra = k.take(rows)
    layer = (leaf_elems(arrangement, extra).sum(axis=2) * arrangement.table.is_layer[None, :]).max(axis=1)
    bucket = np.ceil(layer * extra.ds_numel_per_matrix_weight)
    changed = {"prefetch_bucket_elems": bucket, "max_live_elems": np.maximum(extra.max_live_elems, 2 * bucket)}
    columns = {name: np.concatenate([col, changed.get(name, extra.columns[name])]) for name, col in k.columns.items()}
    return Knobs(columns, k.plan_type)


def nvme_buffer_elems_for(model: ModelSpec, tp: int, dp: int) -> int:
    """A buffer that holds the largest parameter partition one rank swaps (``shape.largest_swapped_partition``),
    at least DeepSpeed's default 1e8: DeepSpeed refuses a smaller one when it first swaps the parameter out
    (partitioned_param_swapper.py ``get_buffer``: ``assert numel <= self.elements_per_buffer``)."""
    return int(max(NVME_BUFFER_DEFAULT_ELEMS, math.ceil(largest_swapped_partition(model, tp, dp))))


def nvme_buffer_counts_for(model: ModelSpec, tp: int, dp: int) -> list[int]:
    """The NVMe swap buffer counts the search offers, most first: DeepSpeed's default (``Plan.nvme_buffer_count``,
    5) and, where fewer, the fewest with which reads, copies and compute all overlap and the fewest with which
    reads still overlap compute (``cost.streaming.nvme_overlap``: 3 and 2 per partition one module swaps in); where
    one module swaps in more partitions than the default, also 3, 2 and 1 per partition (the last: reads wait for
    the copies and the compute, but it is the fewest DeepSpeed runs with).
    DeepSpeed pins every swap buffer whatever ``pin_memory`` says (partitioned_param_swapper.py
    ``_configure_aio``: ``new_cpu_locked_tensor``), buffer_count x buffer_size x 2 bytes, so fewer buffers fit
    machines with little pinnable memory (WSL2), at the times the cost model predicts for them."""
    per_module = swaps_per_module(model, tp, dp)
    default = Plan.nvme_buffer_count
    if per_module > default:  # the default cannot swap in one module (a Mixtral MoE block: 24 partitions); the
        # grid keeps it for the rows that swap nothing (and an NVMe row with it is infeasible, with the fix named)
        return [default] + [n * per_module for n in (NVME_BUFFERS_PIPELINED, NVME_BUFFERS_OVERLAP_COMPUTE, 1)]
    fewer = {n * per_module for n in (NVME_BUFFERS_PIPELINED, NVME_BUFFERS_OVERLAP_COMPUTE)}
    return [default] + sorted((n for n in fewer if n < default), reverse=True)


def aio_variants(plan: Plan) -> list[Plan]:
    """``plan`` at every aio setting the search offers (``AIO_BLOCK_SIZES`` x ``AIO_QUEUE_DEPTHS`` x
    ``AIO_THREADS``), its own first."""
    blocks = _offered(plan.aio_block_size_bytes, AIO_BLOCK_SIZES, True)
    depths = _offered(plan.aio_queue_depth, AIO_QUEUE_DEPTHS, True)
    threads = _offered(plan.aio_threads, AIO_THREADS, True)
    return [plan.with_(aio_block_size_bytes=b, aio_queue_depth=d, aio_threads=t)
            for b in blocks for d in depths for t in threads]


def best_aio(model: ModelSpec, hardware: HardwareProfile, workload: Workload, plan: Plan) -> Plan:
    """The feasible aio variant of an NVMe ``plan`` with the shortest predicted decode step (``aio_variants``;
    ``plan`` itself where none is faster, as without the probe's read grid)."""
    variants = aio_variants(plan)
    estimates = predict_many(model, hardware, workload, variants)
    feasible = [(e.decode_step_s, i) for i, e in enumerate(estimates) if e.feasible]
    return variants[min(feasible)[1]] if feasible else plan


def plan_at(ev: Evaluation, i: int) -> Plan:
    return ev.knobs.plan(i, ev.arrangement.degrees)


def configurations(knobs: Knobs) -> np.ndarray:
    """(N,) an id per configuration: plans alike but for the knobs each configuration is ranked at its best of
    (``RANKED_WITHIN_CONFIGURATION``)."""
    ids, radix = np.zeros(knobs.n, dtype=np.int64), 1
    for name, column in knobs.columns.items():
        if name in RANKED_WITHIN_CONFIGURATION or not len(column) or (column == column[0]).all():
            continue
        values, codes = np.unique(column, return_inverse=True)
        if radix * len(values) > 2**40:  # renumber before the mixed-radix id could overflow
            ids, radix = np.unique(ids, return_inverse=True)[1].reshape(-1), knobs.n
        ids, radix = ids * len(values) + codes.reshape(-1), radix * len(values)
    return np.unique(ids, return_inverse=True)[1].reshape(-1)


@dataclass
class SearchResult:
    model: ModelSpec
    hardware: HardwareProfile
    workload: Workload
    evaluations: list[Evaluation]
    group: np.ndarray  # (M,) which evaluation each flat plan comes from
    index: np.ndarray  # (M,) its index inside that evaluation
    decode_step_s: np.ndarray
    ttft_s: np.ndarray
    throughput_tok_s: np.ndarray
    batch_size: np.ndarray
    feasible: np.ndarray
    config: np.ndarray  # (M,) id of the configuration (everything but batch, micro-batches, bucket)
    infeasible_counts: dict[str, int] = field(default_factory=dict)

    @property
    def n_plans(self) -> int:
        return len(self.group)

    @property
    def n_feasible(self) -> int:
        return int(self.feasible.sum())

    def plan(self, flat: int) -> Plan:
        return plan_at(self.evaluations[self.group[flat]], int(self.index[flat]))

    def estimate(self, flat: int) -> Estimate:
        ev = self.evaluations[self.group[flat]]
        return estimate_from_evaluation(ev, int(self.index[flat]), plan_at(ev, int(self.index[flat])))

    # ---- ranking ----------------------------------------------------------------------------------
    def _best_per_config(self, candidates: np.ndarray, score: np.ndarray) -> np.ndarray:
        """Flat indices of the best-scoring (lowest score) candidate of each configuration, best first."""
        idx = np.flatnonzero(candidates)
        if not len(idx):
            return idx
        order = idx[np.lexsort((self.ttft_s[idx], score[idx]))]
        _, first = np.unique(self.config[order], return_index=True)
        best = order[np.sort(first)]
        return best[np.lexsort((self.ttft_s[best], score[best]))]

    def ranked(self, objective: str, batch_size: int = 1) -> np.ndarray:
        if objective not in OBJECTIVES:
            raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
        if objective == "latency":
            return self._best_per_config(self.feasible & (self.batch_size == batch_size), self.decode_step_s)
        if objective == "throughput":
            return self._best_per_config(self.feasible, -self.throughput_tok_s)
        return self._best_per_config(self.feasible, -self.balanced_score())

    def balanced_score(self) -> np.ndarray:
        f = self.feasible
        if not f.any():
            return np.zeros(self.n_plans)
        best_thr = self.throughput_tok_s[f].max()
        best_lat = self.decode_step_s[f].min()
        return np.sqrt(self.throughput_tok_s / best_thr * best_lat / self.decode_step_s)

    def pareto_front(self) -> np.ndarray:
        """Feasible plans no other beats on both decode step (lower) and throughput (higher), by latency."""
        idx = np.flatnonzero(self.feasible)
        if not len(idx):
            return idx
        order = idx[np.lexsort((-self.throughput_tok_s[idx], self.decode_step_s[idx]))]
        front, best = [], -np.inf
        for i in order:
            if self.throughput_tok_s[i] > best:
                front.append(i)
                best = self.throughput_tok_s[i]
        return np.array(front, dtype=int)

    def closest_infeasible(self, k: int) -> np.ndarray:
        """The infeasible plans nearest to fitting (smallest GPU-memory overshoot), for a helpful report."""
        idx = np.flatnonzero(~self.feasible)
        if not len(idx):
            return idx
        over = np.array([self._overshoot(i) for i in idx])
        return idx[np.argsort(over)[:k]]

    def _overshoot(self, flat: int) -> float:
        ev = self.evaluations[self.group[flat]]
        i = int(self.index[flat])
        hw = ev.arrangement.hardware
        ratios = [
            ev.memory.gpu_peak_bytes[i] / hw.usable_gpu_bytes,
            ev.memory.cpu_bytes[i] / hw.usable_dram_bytes,
            ev.memory.pinned_bytes[i] / max(hw.host.pinnable_bytes, 1.0),
        ]
        return float(max(ratios))


def search(
    model: ModelSpec,
    hardware: HardwareProfile,
    workload: Workload,
    space: SearchSpace = SearchSpace(),
) -> SearchResult:
    if hardware.n_gpus == 0:
        raise ValueError(f"{hardware.name} has no GPU: hpi plans GPU inference; pick a profile with GPUs")
    topology = build_topology(hardware)
    evaluations: list[Evaluation] = []
    config_offset = 0
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("group", "index", "dec", "ttft", "thr", "batch", "ok", "cfg")}
    infeasible: dict[str, int] = {}
    for tp, pp, dp in candidate_arrangements(model, hardware, space):
        placement = place(Plan(tp=tp, pp=pp, dp=dp, batch_size=dp), topology)
        arrangement = make_arrangement(model, hardware, workload, placement)
        knobs = _grid(arrangement, space, hardware.has_nvme, nvme_buffer_elems_for(model, tp, dp))
        if knobs.n == 0:
            continue
        ev = evaluate(arrangement, knobs)
        masks = capacity_masks(ev)
        ok = ~np.logical_or.reduce(list(masks.values()))
        for kind, mask in masks.items():
            infeasible[kind] = infeasible.get(kind, 0) + int(mask.sum())
        config_local = configurations(knobs)
        cols["group"].append(np.full(knobs.n, len(evaluations)))
        cols["index"].append(np.arange(knobs.n))
        cols["dec"].append(ev.decode_step_s)
        cols["ttft"].append(ev.ttft_s)
        cols["thr"].append(ev.throughput_tok_s)
        cols["batch"].append(knobs.batch_size)
        cols["ok"].append(ok)
        cols["cfg"].append(config_local + config_offset)
        config_offset += int(config_local.max()) + 1
        evaluations.append(ev)
    if not evaluations:
        raise ValueError(f"no buildable layout of {model.name} on {hardware.name} within the search space")
    cat = {k: np.concatenate(v) for k, v in cols.items()}
    return SearchResult(
        model=model,
        hardware=hardware,
        workload=workload,
        evaluations=evaluations,
        group=cat["group"].astype(int),
        index=cat["index"].astype(int),
        decode_step_s=cat["dec"],
        ttft_s=cat["ttft"],
        throughput_tok_s=cat["thr"],
        batch_size=cat["batch"],
        feasible=cat["ok"].astype(bool),
        config=cat["cfg"].astype(int),
        infeasible_counts={k: v for k, v in infeasible.items() if v},
    )
