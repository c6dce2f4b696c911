"""A Plan: one point of the search space, the whole of what the executor needs to deploy.

Like FlexGen's ``Policy``, this small frozen record *is* the search space. It is hashable and round-trips
through JSON (``to_dict`` / ``from_dict``), which is how it crosses to the executor and back in RunRecords.

Rank order is declared once, in ``hpi.planner.layout``: tp innermost, then dp, then pp.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

OFFLOAD_KINDS = ("none", "cpu", "nvme")
WEIGHT_BITS = (16, 8, 4)

# DeepSpeed's own default for stage3_prefetch_bucket_size (5e7 elements); DeepSpeedExamples'
# ZeRO-Inference script uses 2 * hidden^2 instead (see presets).
DEEPSPEED_DEFAULT_PREFETCH_ELEMS = 50_000_000
DEEPSPEED_DEFAULT_MAX_LIVE_ELEMS = 1_000_000_000
DEEPSPEED_DEFAULT_PERSISTENCE_ELEMS = 100_000
QUANT_GROUP_SIZE = 64  # DeepSpeed ZeRO-Inference quantized_initialization group_size


def reject_unknown_fields(cls, data: dict[str, Any], what: str) -> None:
    """A record read from JSON must not carry fields the dataclass does not know (a typo would be lost)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{what} has unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


@dataclass(frozen=True)
class Plan:
    offload: str = "none"  # where ZeRO-3 keeps the weights between uses: none (GPU), cpu, nvme
    tp: int = 1
    pp: int = 1
    dp: int = 1
    weight_bits: int = 16
    pin_memory: bool = True
    kv_offload: bool = False
    batch_size: int = 1
    micro_batches: int = 1  # pipeline micro-batches per step (1 when pp == 1)
    prefetch_bucket_elems: int = DEEPSPEED_DEFAULT_PREFETCH_ELEMS
    max_live_elems: int = DEEPSPEED_DEFAULT_MAX_LIVE_ELEMS
    persistence_threshold_elems: int = DEEPSPEED_DEFAULT_PERSISTENCE_ELEMS
    nvme_buffer_count: int = 5
    nvme_buffer_elems: int = 100_000_000

    def __post_init__(self) -> None:
        problems = list(self.problems())
        if problems:
            raise ValueError(problems[0])

    def problems(self):
        """Self-contained consistency errors, each quoting the failing rule and the fix."""
        if self.offload not in OFFLOAD_KINDS:
            yield f"offload {self.offload!r} is not one of {', '.join(OFFLOAD_KINDS)}"
        if self.weight_bits not in WEIGHT_BITS:
            yield f"weight bits {self.weight_bits} is not one of 16, 8, 4"
        for name in ("tp", "pp", "dp", "batch_size", "micro_batches"):
            if getattr(self, name) < 1:
                yield f"{name} = {getattr(self, name)} must be >= 1"
        if self.batch_size % self.dp:
            yield f"batch({self.batch_size}) % dp({self.dp}) != 0: make the batch a multiple of dp"
        elif (self.batch_size // self.dp) % self.micro_batches:
            yield (
                f"batch per replica({self.batch_size // self.dp}) % micro_batches({self.micro_batches}) != 0: "
                "use a micro-batch count that divides the batch"
            )
        if self.pp == 1 and self.micro_batches != 1:
            yield f"micro_batches({self.micro_batches}) > 1 needs pp > 1: set micro_batches 1"
        for name in ("prefetch_bucket_elems", "max_live_elems", "persistence_threshold_elems"):
            if getattr(self, name) < 0:
                yield f"{name} = {getattr(self, name)} must be >= 0"

    # ---- derived ----------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def is_offloaded(self) -> bool:
        return self.offload != "none"

    @property
    def is_tensor_parallel(self) -> bool:
        return self.tp > 1

    @property
    def is_pipelined(self) -> bool:
        return self.pp > 1

    @property
    def is_quantized(self) -> bool:
        return self.weight_bits < 16

    @property
    def runs_without_zero3(self) -> bool:
        """Whether the executor runs the stage as plain PyTorch: ZeRO-3 is needed to offload, to partition
        over dp > 1 and for DeepSpeed's quantized weights (``hpi.executor.worker.uses_deepspeed``)."""
        return not (self.is_offloaded or self.dp > 1 or self.is_quantized)

    @property
    def graph_blocker(self) -> str | None:
        """Why the decode step of this plan cannot be a CUDA graph (``Workload.decode_graphs``), or None.
        A replay skips Python: ZeRO-3's gather hooks and the offloaded cache's copies live there. The model
        can block it too: ``decode_graph_blocker``."""
        if not self.runs_without_zero3:
            return "ZeRO-3 gathers weights from Python hooks (offload, dp > 1 or 8/4-bit weights)"
        if self.kv_offload:
            return "the offloaded KV cache is copied by Python each layer"
        return None

    @property
    def batch_per_replica(self) -> int:
        return self.batch_size // self.dp

    @property
    def micro_batch_size(self) -> int:
        return self.batch_per_replica // self.micro_batches

    @property
    def copies_from_host_memory(self) -> bool:
        """Whether pin_memory matters: weights or KV cache are copied from CPU RAM every step."""
        return self.offload == "cpu" or self.kv_offload

    @property
    def label(self) -> str:
        """A short human label, e.g. ``cpu+kv pinned tp2 pp1 dp1 w4 b16``."""
        where = self.offload + ("+kv" if self.kv_offload else "")
        host = (" pinned" if self.pin_memory else " pageable") if self.copies_from_host_memory else ""
        mb = f" mb{self.micro_batches}" if self.pp > 1 else ""
        return f"{where}{host} tp{self.tp} pp{self.pp} dp{self.dp} w{self.weight_bits} b{self.batch_size}{mb}"

    # ---- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        reject_unknown_fields(cls, data, "plan")
        return cls(**data)

    def with_(self, **changes: Any) -> "Plan":
        return replace(self, **changes)


def decode_graph_blocker(plan: Plan, model) -> str | None:
    """Why ``plan`` of ``model`` (a ModelSpec) cannot decode as a CUDA graph, or None: the plan's own
    blocker, or a mixture of experts, whose routing in transformers reads the experts each token picked
    back to the host (``cost.overhead.graphed_forwards`` is the same rule over arrays of plans)."""
    if model.is_moe:
        return f"{model.name}'s expert routing synchronizes the host"
    return plan.graph_blocker
