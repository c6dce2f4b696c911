"""What every cost term reads: one arrangement (tp, pp, dp placed on a machine) and the knobs of many plans.

Plans that share an arrangement share their placement, stage split and links, so the cost model evaluates
them together: ``Knobs`` holds one numpy array per plan knob (length N), and every cost term is plain numpy
arithmetic that broadcasts over N plans and the 4 module kinds of ``hpi.planner.cost.shape``. A single
``hpi predict`` is the same code with N = 1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from hpi.planner.cost.shape import ModuleTable, module_table
from hpi.planner.specs.hardware import HardwareProfile
from hpi.planner.specs.knob import degree_names, knob_fields, knob_named
from hpi.planner.specs.model import ModelSpec
from hpi.planner.specs.placement import Placement
from hpi.planner.specs.plan import QUANT_GROUP_SIZE, Plan
from hpi.planner.specs.workload import Workload

# Asymmetric group-wise quantization keeps an fp16 scale and an fp16 zero point per group
# (DeepSpeed ZeRO-Inference ``quantized_initialization``, symmetric: false).
QUANT_META_BYTES_PER_GROUP = 4.0
COMPUTE_BYTES = 2.0  # activations, KV cache and gathered (dequantized) weights are 16-bit


@dataclass(frozen=True)
class Knobs:
    """The knobs of N plans of one arrangement, one numpy array (length N) per column.

    The columns come from the Plan's field declarations (``hpi.planner.specs.knob``): a number knob is a
    float64 column, a switch a bool column, a choice knob one bool column per choice but its default
    (``offload_cpu``, ``offload_nvme``); the degrees (tp, pp, dp) are the arrangement's, not columns. Cost
    terms read them as attributes: ``knobs.batch_size``, ``knobs.offload_cpu``.
    """

    columns: Mapping[str, np.ndarray]
    plan_type: type = Plan

    def __getattr__(self, name: str) -> np.ndarray:
        columns = self.__dict__.get("columns")  # absent while a copy is being built (pickle, copy)
        if columns is not None and name in columns:
            return columns[name]
        raise AttributeError(f"Knobs has no column {name!r}")

    @classmethod
    def from_fields(cls, values: Mapping[str, Any], n: int, plan_type: type = Plan) -> "Knobs":
        """N plans from their field values: a sequence of N values or one value for all, per field; a knob not
        given takes its default."""
        declared = {k.name for k in knob_fields(plan_type)}
        unknown = sorted(set(values) - declared) + sorted(set(values) & set(degree_names(plan_type)))
        if unknown:
            raise ValueError(f"Knobs takes the plan knobs that are not degrees; got {', '.join(unknown)}")
        columns: dict[str, np.ndarray] = {}
        for k in knob_fields(plan_type):
            if k.spec.vector == "degree":
                continue
            v = values.get(k.name, k.default)
            one_hot = k.spec.vector == "one_hot"
            v = np.asarray(v, dtype=object if one_hot else None) if np.ndim(v) else np.full(n, v)
            if len(v) != n:
                raise ValueError(f"knob {k.name} has {len(v)} values for {n} plans")
            if one_hot:
                columns.update({col: np.asarray(v == choice, dtype=bool) for col, choice in k.one_hot})
            else:
                columns[k.name] = v.astype(bool if k.spec.vector == "switch" else np.float64)
        return cls(columns, plan_type)

    @classmethod
    def from_plans(cls, plans: Sequence[Plan], plan_type: type = Plan) -> "Knobs":
        names = [k.name for k in knob_fields(plan_type) if k.spec.vector != "degree"]
        return cls.from_fields({name: [getattr(p, name) for p in plans] for name in names}, len(plans), plan_type)

    @classmethod
    def product(cls, axes: Mapping[str, Sequence], fixed: Mapping[str, Any] | None = None,
                plan_type: type = Plan) -> "Knobs":
        """Every combination of the values of ``axes`` (knob name -> values), in ``itertools.product`` order
        (the first axis outermost); the ``fixed`` knobs take one value, the others their default."""
        sizes = [len(values) for values in axes.values()]
        index = np.indices(sizes).reshape(len(sizes), -1)
        columns = {name: np.asarray(list(values), dtype=object)[i] for (name, values), i in zip(axes.items(), index)}
        return cls.from_fields({**(fixed or {}), **columns}, int(np.prod(sizes)), plan_type)

    def take(self, index: np.ndarray) -> "Knobs":
        return Knobs({name: col[index] for name, col in self.columns.items()}, self.plan_type)

    def plan(self, i: int, degrees: Mapping[str, int]) -> Plan:
        """Plan ``i``, with the arrangement's ``degrees`` (``Arrangement.degrees``: tp, pp, dp)."""
        values: dict[str, Any] = {}
        for k in knob_fields(self.plan_type):
            if k.spec.vector == "degree":
                values[k.name] = int(degrees[k.name])
            elif k.spec.vector == "one_hot":
                values[k.name] = next((c for col, c in k.one_hot if self.columns[col][i]), k.default)
            elif k.spec.vector == "switch":
                values[k.name] = bool(self.columns[k.name][i])
            else:
                values[k.name] = int(self.columns[k.name][i])
        return self.plan_type(**values)

    @functools.cached_property
    def n(self) -> int:
        return len(next(iter(self.columns.values())))

    @functools.cached_property
    def offloaded(self) -> np.ndarray:
        """(N,) weights kept off the GPU: any offload column (``Plan.is_offloaded``)."""
        return np.logical_or.reduce([self.columns[c] for c in knob_named(self.plan_type, "offload").columns])

    def bytes_per_weight(self, matrix_fraction: np.ndarray) -> np.ndarray:
        """Stored bytes per element, (N, kinds): matrices at the plan's bits plus group scales, vectors 16-bit."""
        bits = self.weight_bits[:, None]
        quant_meta = np.where(bits < 16, QUANT_META_BYTES_PER_GROUP / QUANT_GROUP_SIZE, 0.0)
        matrix = bits / 8.0 + quant_meta
        return matrix_fraction * matrix + (1.0 - matrix_fraction) * COMPUTE_BYTES

    @functools.cached_property
    def ds_numel_per_matrix_weight(self) -> np.ndarray:
        """(N,) DeepSpeed ``ds_numel`` per element of a weight matrix: how ZeRO-3's element counters (prefetch
        bucket, max live parameters, reuse distance, persistence threshold) count a matrix at the plan's bits.

        DeepSpeed quantizes a weight by storing its packed bytes and a 16-bit scale and minimum per group of 64,
        concatenated and viewed as a tensor of the weight's own 16-bit dtype (``_quantize_param``,
        deepspeed/inference/quantization/utils.py: ``.view(param.dtype)``), so ZeRO-3 counts (bits / 8 + 4 / 64) / 2
        elements per weight: 0.281 at 4 bits, 0.531 at 8, 1 at 16. Measured (one H200, Mixtral-8x22B 4-bit, bucket
        3e9, max live 6e9; benchmarks/results/2026-12-05-issue20-leaf-agreement): 12.5-13.0 GB allocated, the 12 GB
        of 6e9 such elements gathered plus the rest, where counting 6e9 weights at 0.56 bytes predicted 3.9 GB."""
        return self.bytes_per_weight(np.ones(1))[:, 0] / COMPUTE_BYTES

    def zero3_weights(self, ds_elems: np.ndarray) -> np.ndarray:
        """(N,) a ZeRO-3 element counter (``ds_numel``, ``ds_numel_per_matrix_weight``) as weight elements of the
        matrices it gathers (the vectors it counts one for one are a few thousandths of a gather)."""
        return ds_elems / self.ds_numel_per_matrix_weight

    @functools.cached_property
    def zero3_leaf_layer(self) -> np.ndarray:
        """(N,) whether each plan gathers a decoder layer as one ZeRO-3 leaf (``Plan.zero3_leaf`` layer); False for
        every plan where the knobs have no such column (a plan type without the knob)."""
        return self.columns.get("zero3_leaf_layer", np.zeros(self.n, dtype=bool))

    def quant_meta_share(self, matrix_fraction: np.ndarray) -> np.ndarray:
        """Of ``bytes_per_weight``, the part that is quantization scales and zero points, (N, kinds)."""
        bits = self.weight_bits[:, None]
        return matrix_fraction * np.where(bits < 16, QUANT_META_BYTES_PER_GROUP / QUANT_GROUP_SIZE, 0.0)


@dataclass(frozen=True)
class Arrangement:
    """Everything shared by the plans of one (tp, pp, dp) on one machine: the model, its module table, the
    hardware, the workload, the placement of the ranks and what follows from it."""

    model: ModelSpec
    table: ModuleTable
    hardware: HardwareProfile
    workload: Workload
    placement: Placement
    stage_counts: np.ndarray  # (pp, kinds): modules of each kind on each stage
    ranks_per_node_stage: np.ndarray  # (nodes used, pp): ranks of each stage on each node

    @property
    def tp(self) -> int:
        return self.placement.tp

    @property
    def pp(self) -> int:
        return self.placement.pp

    @property
    def dp(self) -> int:
        return self.placement.dp

    @property
    def degrees(self) -> dict[str, int]:
        """The plan fields an arrangement fixes (``Knobs.plan`` takes them)."""
        return {name: getattr(self.placement, name) for name in degree_names(Plan)}

    def by_leaf(self, knobs: Knobs, value: Callable[[ModuleTable], np.ndarray]) -> np.ndarray:
        """(N, ...) ``value`` of the module table at each plan's ZeRO-3 leaf granularity (``Plan.zero3_leaf``,
        ``shape.leaf_module``); where the two tables' arrays differ in shape (leaves per module), the smaller is
        padded with zeros."""
        per_module = np.asarray(value(self.table), dtype=np.float64)
        layer = knobs.zero3_leaf_layer
        if not layer.any():
            return np.broadcast_to(per_module, (knobs.n, *per_module.shape))  # read-only: callers derive new arrays
        per_layer = np.asarray(value(module_table(self.model, "layer")), dtype=np.float64)
        shape = np.maximum(per_module.shape, per_layer.shape)
        module_pad, layer_pad = (np.pad(a, [(0, n - m) for n, m in zip(shape, a.shape)])
                                 for a in (per_module, per_layer))
        return np.where(layer.reshape(-1, *([1] * len(shape))), layer_pad, module_pad)

    @property
    def kv_split(self) -> int:
        """Ways TP splits the KV cache: beyond the KV head count, heads are replicated."""
        return min(self.tp, self.table.kv_shard_limit)


def node_of_gpu(gpu_name: str) -> str:
    """Graph GPU names are ``n<node>.gpu<i>``; the node prefix groups ranks by host."""
    return gpu_name.split(".", 1)[0]


def ranks_per_node_stage(placement: Placement) -> np.ndarray:
    nodes = sorted({node_of_gpu(g) for g in placement.rank_gpus}, key=lambda s: (len(s), s))
    index = {n: i for i, n in enumerate(nodes)}
    out = np.zeros((len(nodes), placement.pp))
    ranks_per_stage = placement.tp * placement.dp
    for rank, gpu in enumerate(placement.rank_gpus):
        out[index[node_of_gpu(gpu)], rank // ranks_per_stage] += 1
    return out


def make_arrangement(model: ModelSpec, hardware: HardwareProfile, workload: Workload,
                     placement: Placement) -> Arrangement:
    from hpi.planner.cost.pipeline import stage_module_counts

    return Arrangement(
        model=model,
        table=module_table(model),
        hardware=hardware,
        workload=workload,
        placement=placement,
        stage_counts=stage_module_counts(model, placement.pp),
        ranks_per_node_stage=ranks_per_node_stage(placement),
    )
