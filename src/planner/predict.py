"""One plan in, one Estimate out: the record ``hpi predict`` prints and the executor compares against.

``Estimate`` is plain data (JSON via ``to_dict``); it is read off an ``Evaluation`` (the vectorised cost
model) at one index, so a single prediction and a search run the very same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hpi.planner.cost.estimate import Evaluation, evaluate
from hpi.planner.cost.inputs import Arrangement, Knobs, make_arrangement
from hpi.planner.feasibility import Reason, capacity_reasons, plan_problems
from hpi.planner.ranks import place
from hpi.planner.specs.hardware import HardwareProfile
from hpi.planner.specs.model import ModelSpec
from hpi.planner.specs.placement import Placement
from hpi.planner.specs.plan import Plan
from hpi.planner.specs.workload import SWITCHES, Workload
from hpi.planner.topology import build_topology


class PlanError(ValueError):
    """A plan that cannot be built at all (impossible degrees); the message names the constraint."""


@dataclass(frozen=True)
class Estimate:
    model: ModelSpec
    hardware: HardwareProfile
    workload: Workload
    plan: Plan
    placement: Placement
    feasible: bool
    reasons: tuple[Reason, ...]
    prefill_s: float
    decode_step_s: float
    total_s: float
    ttft_s: float
    throughput_tok_s: float
    gpu_peak_bytes: float
    cpu_bytes: float
    pinned_bytes: float
    nvme_bytes: float
    weight_bytes_total: float
    build_bytes: float  # host memory of the fullest node while its ranks build (cost.build)
    build_transient_bytes: float
    gpu_memory_parts: dict[str, float]
    cpu_memory_parts: dict[str, float]
    prefill_exposed: dict[str, float]
    decode_exposed: dict[str, float]
    prefill_link: dict[str, float]
    decode_link: dict[str, float]
    prefill_bubble_s: float
    decode_bubble_s: float
    decode_h2d_bytes: float
    h2d_bandwidth_bytes_s: float

    @property
    def decode_bubble_ratio(self) -> float:
        return self.decode_bubble_s / self.decode_step_s if self.decode_step_s > 0 else 0.0

    @property
    def prefill_bubble_ratio(self) -> float:
        return self.prefill_bubble_s / self.prefill_s if self.prefill_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "feasible": self.feasible,
            "reasons": [r.message for r in self.reasons],
            "reason_kinds": [r.kind for r in self.reasons],
            "prefill_s": self.prefill_s,
            "decode_step_s": self.decode_step_s,
            "total_s": self.total_s,
            "ttft_s": self.ttft_s,
            "throughput_tok_s": self.throughput_tok_s,
            "memory": {
                "gpu_peak_bytes": self.gpu_peak_bytes,
                "cpu_bytes": self.cpu_bytes,
                "pinned_bytes": self.pinned_bytes,
                "nvme_bytes": self.nvme_bytes,
                "weight_bytes_total": self.weight_bytes_total,
                "build_bytes": self.build_bytes,
                "build_transient_bytes": self.build_transient_bytes,
                "gpu": self.gpu_memory_parts,
                "cpu": self.cpu_memory_parts,
            },
            "breakdown": {
                "prefill": {
                    "exposed": self.prefill_exposed,
                    "link": self.prefill_link,
                    "bubble_s": self.prefill_bubble_s,
                    "bubble_ratio": self.prefill_bubble_ratio,
                },
                "decode_step": {
                    "exposed": self.decode_exposed,
                    "link": self.decode_link,
                    "bubble_s": self.decode_bubble_s,
                    "bubble_ratio": self.decode_bubble_ratio,
                    "h2d_bytes": self.decode_h2d_bytes,
                    "h2d_bandwidth_bytes_s": self.h2d_bandwidth_bytes_s,
                },
            },
            "placement": self.placement.to_dict(),
            "model": {
                "name": self.model.name,
                "params_total": self.model.params_total,
                "params_active": self.model.params_active,
            },
            "hardware": self.hardware.name,
            "workload": {
                "batch_size": self.plan.batch_size,
                "prompt_len_tokens": self.workload.prompt_len_tokens,
                "gen_len_tokens": self.workload.gen_len_tokens,
                "compute_dtype": self.workload.compute_dtype,
                "fetch_wait": self.workload.fetch_wait,
                **{name: getattr(self.workload, name) for name in SWITCHES},
            },
            "plan": self.plan.to_dict(),
        }


def _floats(parts: dict, i: int) -> dict[str, float]:
    return {name: float(v[i]) for name, v in parts.items()}


def estimate_from_evaluation(ev: Evaluation, i: int, plan: Plan) -> Estimate:
    """Read plan ``i`` of a vectorised evaluation into an Estimate."""
    arrangement, mem = ev.arrangement, ev.memory
    reasons = tuple(capacity_reasons(ev, i))
    return Estimate(
        model=arrangement.model,
        hardware=arrangement.hardware,
        workload=arrangement.workload,
        plan=plan,
        placement=arrangement.placement,
        feasible=not reasons,
        reasons=reasons,
        prefill_s=float(ev.prefill_s[i]),
        decode_step_s=float(ev.decode_step_s[i]),
        total_s=float(ev.total_s[i]),
        ttft_s=float(ev.ttft_s[i]),
        throughput_tok_s=float(ev.throughput_tok_s[i]),
        gpu_peak_bytes=float(mem.gpu_peak_bytes[i]),
        cpu_bytes=float(mem.cpu_bytes[i]),
        pinned_bytes=float(mem.pinned_bytes[i]),
        nvme_bytes=float(mem.nvme_bytes[i]),
        weight_bytes_total=float(mem.weight_bytes_total[i]),
        build_bytes=float(mem.build_bytes[i]),
        build_transient_bytes=float(mem.build_transient_bytes[i]),
        gpu_memory_parts=_floats(mem.gpu_parts, i),
        cpu_memory_parts=_floats(mem.cpu_parts, i),
        prefill_exposed=_floats(ev.prefill.exposed, i),
        decode_exposed=_floats(ev.decode.exposed, i),
        prefill_link=_floats(ev.prefill.link, i),
        decode_link=_floats(ev.decode.link, i),
        prefill_bubble_s=float(ev.prefill.bubble_s[i]),
        decode_bubble_s=float(ev.decode.bubble_s[i]),
        decode_h2d_bytes=float(ev.decode.h2d_bytes[i]),
        h2d_bandwidth_bytes_s=float(ev.decode.h2d_bandwidth_bytes_s[i]),
    )


def arrangement_for(model: ModelSpec, hardware: HardwareProfile, workload: Workload, tp: int, pp: int,
                    dp: int) -> Arrangement:
    """Place (tp, pp, dp) on the hardware; the caller has checked that it can be built."""
    placement = place(Plan(tp=tp, pp=pp, dp=dp, batch_size=dp), build_topology(hardware))
    return make_arrangement(model, hardware, workload, placement)


def predict_many(model: ModelSpec, hardware: HardwareProfile, workload: Workload, plans: list[Plan]) -> list[Estimate]:
    """Estimates for plans of any arrangements, grouped by arrangement so each group is one vectorised evaluation."""
    out: dict[int, Estimate] = {}
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, plan in enumerate(plans):
        problems = plan_problems(model, hardware, plan)
        if problems:
            raise PlanError(problems[0])
        groups.setdefault((plan.tp, plan.pp, plan.dp), []).append(i)
    for (tp, pp, dp), idx in groups.items():
        arrangement = arrangement_for(model, hardware, workload, tp, pp, dp)
        ev = evaluate(arrangement, Knobs.from_plans([plans[i] for i in idx]))
        for j, i in enumerate(idx):
            out[i] = estimate_from_evaluation(ev, j, plans[i])
    return [out[i] for i in range(len(plans))]


def predict(model: ModelSpec, hardware: HardwareProfile, workload: Workload, plan: Plan) -> Estimate:
    return predict_many(model, hardware, workload, [plan])[0]
