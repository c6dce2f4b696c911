"""What every cost term reads: one layout (tp, pp, dp and its placement) and the knobs of many plans.

Plans that share a layout share their placement, stage split and links, so the cost model evaluates them
together: ``Knobs`` holds one numpy array per plan field (length N), and every cost term is plain numpy
arithmetic that broadcasts over N plans and the 4 module kinds of ``hpi.planner.cost.shape``. A single
``hpi predict`` is the same code with N = 1.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

from hpi.planner.cost.shape import ModuleTable, module_table
from hpi.planner.specs.hardware import HardwareProfile
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
    """Per-plan fields as arrays (all plans of one layout)."""

    offload_cpu: np.ndarray
    offload_nvme: np.ndarray
    weight_bits: np.ndarray
    pin_memory: np.ndarray
    kv_offload: np.ndarray
    batch_size: np.ndarray
    micro_batches: np.ndarray
    prefetch_bucket_elems: np.ndarray
    max_live_elems: np.ndarray
    persistence_threshold_elems: np.ndarray
    nvme_buffer_count: np.ndarray
    nvme_buffer_elems: np.ndarray

    @classmethod
    def from_plans(cls, plans: Sequence[Plan]) -> "Knobs":
        def col(name: str, dtype=np.float64) -> np.ndarray:
            return np.array([getattr(p, name) for p in plans], dtype=dtype)

        return cls(
            offload_cpu=np.array([p.offload == "cpu" for p in plans]),
            offload_nvme=np.array([p.offload == "nvme" for p in plans]),
            weight_bits=col("weight_bits"),
            pin_memory=col("pin_memory", bool),
            kv_offload=col("kv_offload", bool),
            batch_size=col("batch_size"),
            micro_batches=col("micro_batches"),
            prefetch_bucket_elems=col("prefetch_bucket_elems"),
            max_live_elems=col("max_live_elems"),
            persistence_threshold_elems=col("persistence_threshold_elems"),
            nvme_buffer_count=col("nvme_buffer_count"),
            nvme_buffer_elems=col("nvme_buffer_elems"),
        )

    def take(self, index: np.ndarray) -> "Knobs":
        return Knobs(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @property
    def n(self) -> int:
        return len(self.weight_bits)

    @property
    def offloaded(self) -> np.ndarray:
        return self.offload_cpu | self.offload_nvme

    def bytes_per_weight(self, matrix_fraction: np.ndarray) -> np.ndarray:
        """Stored bytes per element, (N, kinds): matrices at the plan's bits plus group scales, vectors 16-bit."""
        bits = self.weight_bits[:, None]
        quant_meta = np.where(bits < 16, QUANT_META_BYTES_PER_GROUP / QUANT_GROUP_SIZE, 0.0)
        matrix = bits / 8.0 + quant_meta
        return matrix_fraction * matrix + (1.0 - matrix_fraction) * COMPUTE_BYTES

    def quant_meta_share(self, matrix_fraction: np.ndarray) -> np.ndarray:
        """Of ``bytes_per_weight``, the part that is quantization scales and zero points, (N, kinds)."""
        bits = self.weight_bits[:, None]
        return matrix_fraction * np.where(bits < 16, QUANT_META_BYTES_PER_GROUP / QUANT_GROUP_SIZE, 0.0)


@dataclass(frozen=True)
class Layout:
    """Everything shared by the plans of one (tp, pp, dp) on one machine."""

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


def make_layout(model: ModelSpec, hardware: HardwareProfile, workload: Workload, placement: Placement) -> Layout:
    from hpi.planner.cost.pipeline import stage_module_counts

    return Layout(
        model=model,
        table=module_table(model),
        hardware=hardware,
        workload=workload,
        placement=placement,
        stage_counts=stage_module_counts(model, placement.pp),
        ranks_per_node_stage=ranks_per_node_stage(placement),
    )
