"""Hard limits -> named reasons with numbers and a fix. An infeasible plan is never dropped silently.

Two kinds of limit:
- arrangement problems (``arrangement_problems``): the degrees cannot be built at all (tp=3 with 64 heads, more
  ranks than GPUs). The search never generates these; ``hpi predict`` reports them as a usage error.
- capacity limits (``capacity_masks`` vectorised, ``capacity_reasons`` for one plan): the plan can be
  built but does not fit GPU memory, CPU RAM, pinnable memory or NVMe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from hpi.planner.cost.estimate import Evaluation
from hpi.planner.cost.inputs import COMPUTE_BYTES
from hpi.planner.cost.shape import largest_swapped_partition, smallest_swapped_partition, swaps_per_module
from hpi.planner.specs.hardware import HardwareProfile
from hpi.planner.specs.model import ModelSpec
from hpi.planner.specs.plan import QUANT_GROUP_SIZE, Plan

GB = 1e9


@dataclass(frozen=True)
class Reason:
    kind: str  # gpu_memory, cpu_memory, pinned_memory, nvme_missing, nvme_capacity, nvme_buffer(_count), context_length
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "message": self.message}


def arrangement_problems(model: ModelSpec, hardware: HardwareProfile | None, tp: int, pp: int,
                         dp: int) -> Iterator[str]:
    """Why (tp, pp, dp) cannot be built for this model on this machine (any machine when None)."""
    if hardware is not None and tp * pp * dp > hardware.n_gpus:
        n_gpus = hardware.n_gpus
        yield (
            f"tp({tp}) * pp({pp}) * dp({dp}) = {tp * pp * dp} > {n_gpus} GPUs on {hardware.name}: "
            "lower tp, pp or dp"
        )
    if model.n_heads % tp:
        yield f"n_heads({model.n_heads}) % tp({tp}) != 0 for {model.name}: use a tp that divides {model.n_heads}"
    kv = model.kv_heads_for_sharding
    if tp > 1 and kv % tp and tp % kv:
        yield (
            f"kv_heads({kv}) and tp({tp}) must divide one another for {model.name} "
            "(each rank needs whole KV heads): pick tp from the divisors or multiples of the KV head count"
        )
    widths = [model.ffn_hidden_size] + ([model.moe_ffn_hidden_size] if model.is_moe else [])
    for width in widths:
        if width % tp:
            yield f"ffn width({width}) % tp({tp}) != 0 for {model.name}: use a tp that divides {width}"
    if pp > model.n_layers:
        yield f"pp({pp}) > n_layers({model.n_layers}) of {model.name}: each stage needs a layer, lower pp"


def quantization_problems(model: ModelSpec, tp: int) -> Iterator[str]:
    """DeepSpeed quantizes weights in groups of 64 along each matrix's input dimension (per TP rank)."""
    h = model.hidden_size
    widths = {"hidden size": h}
    if model.uses_mla:
        widths["MLA o_proj input"] = model.n_heads * model.v_head_dim // tp
        widths["kv_lora_rank"] = model.kv_lora_rank
        if model.q_lora_rank:
            widths["q_lora_rank"] = model.q_lora_rank
    else:
        widths["o_proj input"] = model.n_heads * model.head_dim // tp
    if model.n_dense_layers:
        widths["FFN width per rank"] = model.ffn_hidden_size // tp
    if model.is_moe:
        widths["expert FFN width per rank"] = model.moe_ffn_hidden_size // tp
    for what, width in widths.items():
        if width % QUANT_GROUP_SIZE:
            yield (
                f"{what}({width}) % quantization group({QUANT_GROUP_SIZE}) != 0 for {model.name} at tp {tp}: "
                "DeepSpeed cannot quantize it; use --quant-bits 16 or another tp"
            )


def plan_problems(model: ModelSpec, hardware: HardwareProfile | None, plan: Plan) -> list[str]:
    problems = list(arrangement_problems(model, hardware, plan.tp, plan.pp, plan.dp))
    if plan.is_quantized:
        problems += quantization_problems(model, plan.tp)
    return problems


def _largest_partition_elems(ev: Evaluation) -> float:
    """The largest parameter partition one rank swaps to/from NVMe (``shape.largest_swapped_partition``)."""
    a = ev.arrangement
    return largest_swapped_partition(a.model, a.tp, a.dp)


def _swaps_per_module(ev: Evaluation) -> int:
    """The fewest NVMe swap buffers DeepSpeed runs with here (``shape.swaps_per_module``)."""
    a = ev.arrangement
    return swaps_per_module(a.model, a.tp, a.dp)


def _largest_block_bytes(ev: Evaluation) -> float:
    """The largest aio block size that swaps every partition the planner counts as swapped: the smallest one's
    16-bit bytes (``shape.smallest_swapped_partition``; DeepSpeed keeps partitions under the block size in CPU
    memory); no limit where nothing is swapped."""
    a = ev.arrangement
    smallest = smallest_swapped_partition(a.model, a.tp, a.dp) * COMPUTE_BYTES
    return smallest if smallest > 0 else np.inf


def capacity_masks(ev: Evaluation) -> dict[str, np.ndarray]:
    """(N,) boolean per reason kind: True where the plan breaks that limit."""
    hw, k, mem = ev.arrangement.hardware, ev.knobs, ev.memory
    nvme_capacity = hw.nvme.capacity_bytes if hw.has_nvme else 0.0
    context = ev.arrangement.workload.context_len_tokens
    return {
        "gpu_memory": mem.gpu_peak_bytes > hw.usable_gpu_bytes,
        "cpu_memory": mem.cpu_bytes > hw.usable_dram_bytes,
        "build_memory": mem.build_bytes > hw.usable_dram_bytes,
        "pinned_memory": mem.pinned_bytes > hw.host.pinnable_bytes,
        "nvme_missing": k.offload_nvme & (not hw.has_nvme),
        "nvme_capacity": k.offload_nvme & hw.has_nvme & (mem.nvme_bytes > nvme_capacity),
        "nvme_buffer": k.offload_nvme & (k.nvme_buffer_elems < _largest_partition_elems(ev)),
        "nvme_buffer_count": k.offload_nvme & (k.nvme_buffer_count < _swaps_per_module(ev)),
        "aio_block_size": k.offload_nvme & (k.aio_block_size_bytes > _largest_block_bytes(ev)),
        "context_length": np.full(k.n, context > ev.arrangement.model.max_position_embeddings),
    }


def feasible_mask(ev: Evaluation) -> np.ndarray:
    masks = capacity_masks(ev)
    return ~np.logical_or.reduce(list(masks.values()))


_GPU_FIXES = {
    "resident_weights": "offload weights (--offload cpu), quantize (--quant-bits 8 or 4) or split wider (--tp/--pp)",
    "kv_cache": "lower the batch, offload the KV cache (--kv-offload) or split wider (--tp/--pp)",
    "activations": "lower the batch or the prompt length, or use more pipeline micro-batches",
    "live_params": "lower the prefetch bucket (--prefetch-bucket) or split wider (--tp)",
    "dequant_buffers": "split wider (--tp): each 8/4-bit weight is dequantized into a 16-bit copy for its GEMM",
    "persistent_weights": "lower the persistence threshold",
    "quant_scales": "use fewer quantization groups or split wider (--tp/--pp)",
    "framework": "use a GPU with more memory",
}


def _gpu_reason(ev: Evaluation, i: int) -> Reason:
    hw, mem, k = ev.arrangement.hardware, ev.memory, ev.knobs
    parts = {name: float(v[i]) for name, v in mem.gpu_parts.items()}
    top = max(parts, key=parts.get)
    stage = int(mem.fullest_stage[i])
    gpu_name = ev.arrangement.placement.rank_gpus[stage * ev.arrangement.tp * ev.arrangement.dp]
    usable = hw.usable_gpu_bytes
    return Reason(
        "gpu_memory",
        f"GPU memory {mem.gpu_peak_bytes[i] / GB:.1f} GB > {usable / GB:.1f} GB usable on {gpu_name} "
        f"({top.replace('_', ' ')} {parts[top] / GB:.1f} GB at batch {int(k.batch_size[i])}): {_GPU_FIXES[top]}",
    )


def _build_reason(ev: Evaluation, i: int) -> Reason:
    hw, mem, k = ev.arrangement.hardware, ev.memory, ev.knobs
    where = "swaps it out to NVMe" if k.offload_nvme[i] else "partitions it"
    return Reason(
        "build_memory",
        f"host memory while building {mem.build_bytes[i] / GB:.1f} GB > {hw.usable_dram_bytes / GB:.1f} GB usable "
        f"per node (the 16-bit stage is built in host memory before ZeRO-3 {where}: "
        f"{mem.build_transient_bytes[i] / GB:.1f} GB of it only during the build; cost.build): quantize "
        "(--quant-bits 8 or 4: DeepSpeed builds each module on the GPU and keeps only its packed partition) or "
        "split over more GPUs (--tp/--pp)",
    )


def capacity_reasons(ev: Evaluation, i: int) -> list[Reason]:
    """The named reasons plan ``i`` of the evaluation breaks, with numbers and a fix."""
    hw, mem, k = ev.arrangement.hardware, ev.memory, ev.knobs
    masks = capacity_masks(ev)
    out: list[Reason] = []
    if masks["gpu_memory"][i]:
        out.append(_gpu_reason(ev, i))
    if masks["cpu_memory"][i]:
        parts = {n: float(v[i]) for n, v in mem.cpu_parts.items()}
        top = max(parts, key=parts.get)
        out.append(Reason(
            "cpu_memory",
            f"CPU memory {mem.cpu_bytes[i] / GB:.1f} GB > {hw.usable_dram_bytes / GB:.1f} GB "
            f"usable per node ({top.replace('_', ' ')} {parts[top] / GB:.1f} GB): offload to NVMe "
            "(--offload nvme), quantize (--quant-bits 4) or spread over more nodes",
        ))
    if masks["build_memory"][i]:
        out.append(_build_reason(ev, i))
    if masks["pinned_memory"][i]:
        buffers = float(mem.cpu_parts["nvme_buffers"][i])
        fix = ("use fewer NVMe swap buffers (--nvme-buffer-count: DeepSpeed pins them whatever --pin-memory says, "
               f"{buffers / GB:.1f} GB here)" if buffers else "use --no-pin-memory (slower copies) or quantize "
               "(--quant-bits 4)")
        out.append(Reason(
            "pinned_memory",
            f"pinned memory {mem.pinned_bytes[i] / GB:.1f} GB > {hw.host.pinnable_bytes / GB:.1f} GB pinnable per "
            f"node: {fix}",
        ))
    if masks["nvme_missing"][i]:
        out.append(Reason("nvme_missing", f"offload nvme but {hw.name} has no NVMe in its profile: use --offload cpu"))
    if masks["nvme_capacity"][i]:
        out.append(Reason(
            "nvme_capacity",
            f"NVMe {mem.nvme_bytes[i] / GB:.1f} GB > {hw.nvme.capacity_bytes / GB:.1f} GB capacity per node: "
            + ("quantize (--quant-bits 4) or " if k.weight_bits[i] > 4 else "")
            + "spread over more nodes or GPUs (--pp, --tp), or use a larger disk",
        ))
    if masks["nvme_buffer"][i]:
        need = _largest_partition_elems(ev)
        out.append(Reason(
            "nvme_buffer",
            f"NVMe buffer {int(k.nvme_buffer_elems[i]):,} elements < largest tensor partition {int(need):,}: "
            "DeepSpeed refuses it; raise the NVMe buffer size",
        ))
    if masks["nvme_buffer_count"][i]:
        need = _swaps_per_module(ev)
        out.append(Reason(
            "nvme_buffer_count",
            f"NVMe buffer count {int(k.nvme_buffer_count[i])} < {need}, the parameters one module swaps in at once: "
            f"DeepSpeed stops with 'Not enough buffers'; use --nvme-buffer-count {need} or more",
        ))
    if masks["aio_block_size"][i]:
        most = _largest_block_bytes(ev)
        out.append(Reason(
            "aio_block_size",
            f"aio block size {int(k.aio_block_size_bytes[i]):,} bytes > {int(most):,}, the smallest partition swapped "
            "to NVMe: DeepSpeed keeps partitions under the block size in CPU memory (min_aio_bytes), which the plan "
            f"does not count; use --aio-block-size {int(most)} or less",
        ))
    if masks["context_length"][i]:
        wl, model = ev.arrangement.workload, ev.arrangement.model
        out.append(Reason(
            "context_length",
            f"prompt({wl.prompt_len_tokens}) + gen({wl.gen_len_tokens}) = {wl.context_len_tokens} > "
            f"max_position_embeddings({model.max_position_embeddings}) of {model.name}: shorten the workload",
        ))
    return out
