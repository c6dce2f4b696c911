"""Presets a GUI can load: Latency, Balanced and Throughput, each predicted, explained and open to expert overrides.

Definitions (``DEFINITIONS``, printed by ``hpi presets``), over the feasible plans of one search whose batches
stay within the workload's concurrency:

- latency: the lowest decode step at batch 1 (the lowest TTFT breaks ties): ``SearchResult.ranked("latency")``.
- throughput: the highest generated tokens/s, each plan at its best batch: ``SearchResult.ranked("throughput")``.
- balanced: the highest tokens/s among the plans whose decode step is at least Latency's and at most
  ``BALANCED_DECODE_BOUND`` (2) times it: the project's "< 2x latency regression at batch 1" bound.

So Latency's decode step <= Balanced's <= 2x Latency's, and Throughput's tokens/s >= the other two's (Latency
itself is a Balanced candidate, and all three come from the same candidates). Each preset carries its one-line
reason (the binding resource, ``hpi.planner.explain.bindings``), every knob's valid values on this machine with
what each one-knob change is predicted to do (``explain.knob_effects``: the same cost model), the hardware
profile's provenance, and the kept RunRecord (or autotune trial) that ran it on this hardware, if any.

Pure: the document ``PresetSet.to_dict`` lacks only what the executor renders (the DeepSpeed config) and the
command lines; ``hpi.cli.presets`` adds them. ``schemas/presets.schema.json`` describes the whole document.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping

import numpy as np

from hpi.planner.cost.shape import swaps_per_module
from hpi.planner.explain import KnobEffect, bindings, knob_effects
from hpi.planner.feasibility import quantization_problems
from hpi.planner.predict import Estimate
from hpi.planner.search import DEFAULT_BATCHES, SearchResult, SearchSpace, candidate_arrangements, nvme_buffer_elems_for
from hpi.planner.search import search as run_search
from hpi.planner.specs.hardware import HardwareProfile
from hpi.planner.specs.knob import knob_fields
from hpi.planner.specs.model import ModelSpec
from hpi.planner.specs.plan import OFFLOAD_KINDS, WEIGHT_BITS, Plan, leaf_choices
from hpi.planner.specs.workload import Workload
from hpi.records import RunRecord

KIND = "hpi.Presets"
VERSION = 1
PRESET_NAMES = ("latency", "balanced", "throughput")
BALANCED_DECODE_BOUND = 2.0  # Balanced's decode step <= this x Latency's: the "< 2x latency regression" bound
DEFINITIONS = {
    "latency": "the lowest decode step at batch 1 (the lowest TTFT breaks ties)",
    "balanced": f"the highest tokens/s whose decode step stays within {BALANCED_DECODE_BOUND:g}x Latency's "
                "(the < 2x latency regression at batch 1 bound)",
    "throughput": "the highest generated tokens/s for the workload, each plan at its best batch",
}
# What ``hpi serve`` can serve (``specs.plan.serve_blocker``): its presets are chosen within these.
SERVING = {"kv_offload": (False,), "dp": (1,)}
# Knobs that a one-knob change moves along with the one it is about (``explain.knob_variants``): a tp change
# keeps the batch a multiple of dp, a pp change resets micro-batches, NVMe offload sizes its buffer.
_FOLLOWERS = ("batch_size", "micro_batches", "nvme_buffer_elems")
GRAPHS_CONDITION = "decode_graphs"  # the run condition explain's CUDA-graph variant turns on (--cuda-graphs)
# What each knob changes at run time, and which predicted figures depend on it in the cost model (an override's
# ``note``; ``override_note`` adds why an override shows no effect).
KNOB_NOTES = {
    "offload": "where ZeRO-3 keeps the weights between uses (GPU, CPU memory or NVMe); predicted: memory per tier "
               "and the time to stream the weights every forward",
    "tp": "tensor-parallel degree: each matrix split over GPUs of one island; predicted: compute, all-reduces, memory",
    "pp": "pipeline stages; predicted: memory per stage, pipeline bubbles and stage-to-stage sends",
    "dp": "ZeRO-3 partition degree: replicas that each hold 1/dp of every weight and all-gather it; predicted: "
          "memory, the all-gather and the batch split",
    "weight_bits": "DeepSpeed's quantized_initialization bits; predicted: bytes stored and streamed, "
                   "dequantization time, memory",
    "pin_memory": "offload_param.pin_memory: page-locks the offloaded weights (and an offloaded KV cache); "
                  "predicted: host->device copy bandwidth and pinned memory",
    "kv_offload": "the KV cache in CPU memory, copied in layer by layer (transformers' OffloadedCache); predicted: "
                  "GPU memory, CPU memory and the copy time each decode step",
    "batch_size": "sequences decoded together; predicted: every time and memory term",
    "micro_batches": "pipeline micro-batches per step; predicted: bubbles and stage concurrency",
    "prefetch_bucket_elems": "stage3_prefetch_bucket_size: elements ZeRO-3 gathers ahead of use, counted as stored "
                             "(a 4-bit weight 0.28, an 8-bit 0.53); predicted: GPU memory (live parameters) and, with "
                             "MoE layer leaves, whether the router waits for the layer's copy "
                             "(hpi.planner.cost.estimate)",
    "max_live_elems": "stage3_max_live_parameters (and stage3_max_reuse_distance, written equal): the most gathered "
                      "elements ZeRO-3 keeps on the GPU before it stops prefetching, counted as stored (a 4-bit "
                      "weight 0.28); predicted: GPU memory (live "
                      "parameters) only: the cost model's times do not depend on it",
    "persistence_threshold_elems": "stage3_param_persistence_threshold: parameters of at most this many stored "
                                   "elements (a 4-bit matrix's: 0.28 a weight) are "
                                   "gathered once and kept whole on every GPU; predicted: GPU memory (persistent "
                                   "weights) and the bytes streamed every forward",
    "zero3_leaf": "ZeRO-3's unit of gathering: module (DeepSpeed's hooks on every submodule) or layer "
                  "(zero_optimization.leaf_module names each decoder layer: one hook pair a layer, all of its weights "
                  "gathered at once; not with NVMe offload); predicted: host overhead a layer, how the copies "
                  "interleave with it, and GPU memory (a whole layer gathered)",
    "nvme_buffer_count": "offload_param.buffer_count: NVMe swap buffers, each pinned by DeepSpeed whatever pin_memory "
                         "says; predicted: pinned and CPU memory, parameters in flight on the GPU, and whether reads "
                         "overlap copies and compute (fully from 3 buffers per partition a module swaps in; "
                         "DeepSpeed stops below the minimum)",
    "nvme_buffer_elems": "offload_param.buffer_size: elements per NVMe swap buffer, at least the largest parameter "
                         "partition (DeepSpeed refuses less); predicted: pinned and CPU memory only (a larger buffer "
                         "is never faster)",
    "aio_block_size_bytes": "aio.block_size: bytes per NVMe read request, at most the smallest partition swapped "
                            "(DeepSpeed keeps smaller ones in CPU memory); predicted: the NVMe read rate, from the "
                            "probe's read grid (the same for every value without one)",
    "aio_queue_depth": "aio.queue_depth: NVMe read requests in flight per aio thread; predicted: the NVMe read rate, "
                       "from the probe's read grid (the same for every value without one)",
    "aio_threads": "aio.intra_op_parallelism: threads each reading a slice of every partition; predicted: the NVMe "
                   "read rate, from the probe's read grid (the same for every value without one)",
    GRAPHS_CONDITION: "decode steps replayed as CUDA graphs (--cuda-graphs), a run condition; predicted: host "
                      "overhead per step",
}


class PresetError(ValueError):
    """No preset can be chosen (nothing feasible at batch 1); the message says what to change."""


@dataclass(frozen=True)
class Override:
    """One knob of a preset an expert may change: its value, the values valid on this machine, and what each
    one-knob change is predicted to do (``effects``; empty where no change of it was predicted, and then ``note``
    says why: never an effect where the knob changes nothing)."""

    knob: str  # a Plan field, or GRAPHS_CONDITION
    flag: str | None
    value: Any
    unit: str
    valid: Mapping[str, Any]  # {"choices": [...]} or {"minimum": n}
    applies: bool  # whether the knob changes anything in this plan (pinning where nothing is copied does not)
    effects: tuple[KnobEffect, ...]
    note: str  # what the knob changes at run time, what the cost model prices of it, why no effect is shown

    def to_dict(self) -> dict[str, Any]:
        return {"knob": self.knob, "flag": self.flag, "value": self.value, "unit": self.unit, "valid": dict(self.valid),
                "applies": self.applies, "effects": [_effect_dict(e) for e in self.effects], "note": self.note}


@dataclass(frozen=True)
class Confirmation:
    """A kept run of the preset's plan, model and workload on the same hardware profile, and what it measured."""

    record_id: str
    path: str | None
    decode_step_s: float | None
    ttft_s: float | None
    throughput_tok_s: float | None
    gpu_peak_allocated_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"record": self.record_id, "path": self.path, "decode_step_s": self.decode_step_s,
                "ttft_s": self.ttft_s, "throughput_tok_s": self.throughput_tok_s,
                "gpu_peak_allocated_bytes": self.gpu_peak_allocated_bytes}


@dataclass(frozen=True)
class Preset:
    name: str  # one of PRESET_NAMES
    estimate: Estimate
    reason: str
    overrides: tuple[Override, ...]
    confirmation: Confirmation | None

    @property
    def plan(self) -> Plan:
        return self.estimate.plan

    @property
    def definition(self) -> str:
        return DEFINITIONS[self.name]

    @property
    def status(self) -> str:
        return "confirmed by a run" if self.confirmation else "predicted only"

    def to_dict(self) -> dict[str, Any]:
        e = self.estimate
        return {
            "name": self.name, "definition": self.definition, "label": self.plan.label, "plan": self.plan.to_dict(),
            "reason": self.reason,
            "predicted": {"ttft_s": e.ttft_s, "prefill_s": e.prefill_s, "decode_step_s": e.decode_step_s,
                          "total_s": e.total_s, "throughput_tok_s": e.throughput_tok_s},
            "memory": {"gpu_peak_bytes": e.gpu_peak_bytes, "cpu_bytes": e.cpu_bytes, "pinned_bytes": e.pinned_bytes,
                       "nvme_bytes": e.nvme_bytes},
            "overrides": [o.to_dict() for o in self.overrides],
            "status": self.status,
            "confirmed_by": self.confirmation.to_dict() if self.confirmation else None,
        }


@dataclass(frozen=True)
class PresetSet:
    model: ModelSpec
    hardware: HardwareProfile
    workload: Workload
    concurrency: int
    serving: bool  # chosen among the plans hpi serve can serve (``SERVING``)
    n_plans: int
    n_feasible: int
    presets: tuple[Preset, ...]

    def named(self, name: str) -> Preset:
        for p in self.presets:
            if p.name == name:
                return p
        raise KeyError(f"no preset {name!r}; presets: {', '.join(PRESET_NAMES)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": KIND, "version": VERSION, "model": self.model.name, "hardware": self.hardware.name,
            "os": self.hardware.os,
            "workload": {"prompt_len_tokens": self.workload.prompt_len_tokens,
                         "gen_len_tokens": self.workload.gen_len_tokens, "concurrency": self.concurrency,
                         "serving": self.serving},
            "definitions": dict(DEFINITIONS), "n_plans_evaluated": self.n_plans, "n_feasible": self.n_feasible,
            "provenance": provenance(self.hardware),
            "presets": [p.to_dict() for p in self.presets],
        }


def _effect_dict(e: KnobEffect) -> dict[str, Any]:
    est = e.estimate
    return {"change": e.label, "plan": est.plan.to_dict(), "feasible": est.feasible,
            "why_not": [r.message for r in est.reasons], "decode_step_s": est.decode_step_s, "ttft_s": est.ttft_s,
            "throughput_tok_s": est.throughput_tok_s, "gpu_peak_bytes": est.gpu_peak_bytes,
            "cpu_bytes": est.cpu_bytes, "pinned_bytes": est.pinned_bytes,
            "decode_ratio": e.decode_ratio, "throughput_ratio": e.throughput_ratio}


# ---- the search space a preset may come from -------------------------------------------------------------------
def preset_space(hardware: HardwareProfile, concurrency: int, serving: bool = False) -> SearchSpace:
    """Batches up to the concurrency (a batch larger than the requests in flight never fills). Native Windows
    has no libaio, so its presets offload to the CPU only (DeepSpeed's NVMe offload needs libaio). ``serving``:
    only plans hpi serve can serve (``SERVING``)."""
    batches = tuple(b for b in DEFAULT_BATCHES if b <= concurrency)
    if concurrency not in batches:
        batches = batches + (concurrency,)
    offloads = tuple(o for o in OFFLOAD_KINDS if o != "nvme" or hardware.os != "windows")
    space = SearchSpace(batch_sizes=batches, offloads=offloads)
    return replace(space, **SERVING) if serving else space


def _pick(result: SearchResult, candidates: np.ndarray, score: np.ndarray) -> int:
    """The candidate with the lowest score, the lowest TTFT breaking ties."""
    idx = np.flatnonzero(candidates)
    return int(idx[np.lexsort((result.ttft_s[idx], score[idx]))[0]])


def choose(result: SearchResult) -> dict[str, tuple[int, int]]:
    """{preset: (flat index of its plan in ``result``, how many plans it was chosen from)} (``DEFINITIONS``)."""
    feasible = result.feasible
    at_one = feasible & (result.batch_size == 1)
    if not at_one.any():
        raise PresetError(f"no feasible plan of {result.model.name} on {result.hardware.name} at batch 1 "
                          f"({result.n_feasible:,} of {result.n_plans:,} plans fit at all): "
                          f"`hpi plan --model {result.model.name} --hardware {result.hardware.name}` shows the "
                          "closest ones and why they fail")
    latency = _pick(result, at_one, result.decode_step_s)
    floor = result.decode_step_s[latency]
    within = feasible & (result.decode_step_s >= floor) & (result.decode_step_s <= BALANCED_DECODE_BOUND * floor)
    within[latency] = True
    return {"latency": (latency, int(at_one.sum())),
            "balanced": (_pick(result, within, -result.throughput_tok_s), int(within.sum())),
            "throughput": (_pick(result, feasible, -result.throughput_tok_s), int(feasible.sum()))}


def reason(name: str, est: Estimate, n_candidates: int, latency_step_s: float) -> str:
    """Why the preset won, in one line: its criterion, among how many plans, and what binds its decode step."""
    b = bindings(est)[0]
    binds = f"decode binds on {b.resource} ({b.share:.0%} of the step): {b.detail}"
    won = {
        "latency": f"lowest decode step at batch 1 ({est.decode_step_s * 1e3:,.1f} ms) of {n_candidates:,} "
                   "feasible plans",
        "balanced": f"highest throughput ({est.throughput_tok_s:,.2f} tok/s at batch {est.plan.batch_size}) of the "
                    f"{n_candidates:,} feasible plans whose decode step is within {BALANCED_DECODE_BOUND:g}x "
                    f"Latency's ({BALANCED_DECODE_BOUND * latency_step_s * 1e3:,.1f} ms)",
        "throughput": f"highest throughput ({est.throughput_tok_s:,.2f} tok/s at batch {est.plan.batch_size}) of "
                      f"{n_candidates:,} feasible plans",
    }[name]
    return f"{won}; {binds}"


# ---- expert overrides ------------------------------------------------------------------------------------------
def valid_values(model: ModelSpec, hardware: HardwareProfile, plan: Plan, space: SearchSpace) -> dict[str, dict]:
    """Each Plan knob's valid values on this machine for this model within the presets' space: choices where they
    are a set (degrees that can be built, offloads the machine has, bit widths DeepSpeed can quantize at this tp),
    else a minimum."""
    arrangements = candidate_arrangements(model, hardware, space)
    degrees = {name: sorted({a[i] for a in arrangements}) for i, name in enumerate(("tp", "pp", "dp"))}
    quantizable = not any(True for _ in quantization_problems(model, plan.tp))
    out: dict[str, dict] = {
        "offload": {"choices": list(space.offloads if hardware.has_nvme else [o for o in space.offloads
                                                                              if o != "nvme"])},
        **{name: {"choices": values} for name, values in degrees.items()},
        "weight_bits": {"choices": [b for b in WEIGHT_BITS if b == 16 or quantizable]},
        "pin_memory": {"choices": list(space.pin_memory)},
        "kv_offload": {"choices": list(space.kv_offload)},
        "micro_batches": {"choices": [m for m in range(1, plan.batch_per_replica + 1)
                                      if plan.batch_per_replica % m == 0] if plan.is_pipelined else [1]},
        "nvme_buffer_elems": {"minimum": nvme_buffer_elems_for(model, plan.tp, plan.dp)},
        "nvme_buffer_count": {"minimum": swaps_per_module(model, plan.tp, plan.dp)},
        "zero3_leaf": {"choices": list(leaf_choices(plan.offloads_to_nvme))},
    }
    for k in knob_fields(Plan):
        out.setdefault(k.name, {"choices": list(k.spec.choices)} if k.spec.choices else {"minimum": k.spec.minimum})
    return out


def knob_of(base: Plan, variant: Plan) -> str:
    """The knob a one-knob variant is about: the field it changes, besides those that follow it (``_FOLLOWERS``);
    ``GRAPHS_CONDITION`` for explain's CUDA-graph variant, which changes a run condition, not the plan."""
    changed = [k.name for k in knob_fields(Plan) if getattr(base, k.name) != getattr(variant, k.name)]
    leading = [name for name in changed if name not in _FOLLOWERS]
    return (leading or changed or [GRAPHS_CONDITION])[0]


def overrides(est: Estimate, space: SearchSpace) -> tuple[Override, ...]:
    plan = est.plan
    valid = valid_values(est.model, est.hardware, plan, space)
    effects: dict[str, list[KnobEffect]] = {}
    for e in knob_effects(est):
        effects.setdefault(knob_of(plan, e.estimate.plan), []).append(e)
    out = []
    for k in knob_fields(Plan):
        applies = plan.applies(k.name)
        shown = tuple(effects.get(k.name, ())) if applies else ()  # an idle knob's variant runs the same plan
        note = override_note(k.name, applies, valid[k.name], shown)
        if k.name == "max_live_elems" and plan.offloads_to_nvme:
            note = (f"{KNOB_NOTES[k.name]}. With NVMe offload the swap buffers bound what is in flight "
                    "(hpi.planner.cost.memory.live_param_elems): DeepSpeed still applies it, the cost model does not "
                    "price it here, so no effect is predicted")
        out.append(Override(k.name, k.spec.flag, getattr(plan, k.name), k.spec.unit, valid[k.name], applies, shown,
                            note))
    if GRAPHS_CONDITION in effects:
        shown = tuple(effects[GRAPHS_CONDITION])
        out.append(Override(GRAPHS_CONDITION, "--cuda-graphs", est.workload.decode_graphs, "",
                            {"choices": [True, False]}, True, shown,
                            override_note(GRAPHS_CONDITION, True, {"choices": [True, False]}, shown)))
    return tuple(out)


def override_note(knob: str, applies: bool, valid: Mapping[str, Any], effects: tuple[KnobEffect, ...]) -> str:
    """``KNOB_NOTES[knob]``, and where no effect is shown, why: the knob changes nothing in this plan, it has no
    other valid value here, or no one-knob change of it is predicted (compare whole plans with ``hpi plan``)."""
    note = KNOB_NOTES[knob]
    if not applies:
        return f"{note}. It changes nothing in this plan, so no effect is predicted"
    if effects:
        return note
    if len(valid.get("choices", [None, None])) < 2:
        return f"{note}. No other value is valid on this machine"
    return (f"{note}. No one-knob change of it is a valid plan here (or hpi varies it only with others): "
            "no effect is predicted; compare whole plans with hpi plan")


# ---- provenance and confirmation -------------------------------------------------------------------------------
def provenance(hardware: HardwareProfile) -> dict[str, Any]:
    """Where the profile's numbers come from: a count per source (datasheet, probed, calibrated, ...) and each
    field's source and note."""
    return {"sources": dict(Counter(p.source for p in hardware.provenance.values())),
            "calibrated": any(p.source == "calibrated" for p in hardware.provenance.values()),
            "fields": {name: {"source": p.source, "note": p.note} for name, p in sorted(hardware.provenance.items())}}


def _record_plan(record: RunRecord) -> Plan | None:
    try:
        return Plan.from_dict(dict(record.plan)) if record.plan else None
    except (ValueError, TypeError):
        return None  # a plan of an older shape: it cannot be this preset's


def confirmation(est: Estimate, records: Iterable[RunRecord]) -> Confirmation | None:
    """The first measured (not simulated) record of this plan, model and workload on this hardware profile."""
    for r in records:
        c = r.conditions
        if (r.simulated or r.hardware != est.hardware.name or r.model_name != est.model.name
                or (c.prompt_len_tokens, c.gen_len_tokens) != (est.workload.prompt_len_tokens,
                                                               est.workload.gen_len_tokens)
                or _record_plan(r) != est.plan):
            continue
        return Confirmation(r.record_id, r.source.path if r.source else None, r.timings.figure("decode_step_s"),
                            r.timings.ttft_s, r.timings.throughput_tok_s, r.gpu_peak_allocated_bytes)
    return None


def select_presets(model: ModelSpec, hardware: HardwareProfile, workload: Workload, *, concurrency: int = 1,
                   serving: bool = False, records: Iterable[RunRecord] = ()) -> PresetSet:
    """The three presets of ``model`` on ``hardware`` for ``workload`` with up to ``concurrency`` requests at once
    (``serving``: among the plans hpi serve can serve)."""
    if concurrency < 1:
        raise PresetError(f"concurrency {concurrency} must be >= 1: the number of requests served at once")
    space = preset_space(hardware, concurrency, serving)
    result = run_search(model, hardware, workload, space)
    chosen = choose(result)
    records = list(records)
    latency_step = float(result.decode_step_s[chosen["latency"][0]])
    presets = []
    for name in PRESET_NAMES:
        flat, n = chosen[name]
        est = result.estimate(flat)
        presets.append(Preset(name, est, reason(name, est, n, latency_step), overrides(est, space),
                              confirmation(est, records)))
    return PresetSet(model, hardware, workload, concurrency, serving, result.n_plans, result.n_feasible, tuple(presets))



# ---- DeepSpeed config templates --------------------------------------------------------------------------------
TEMPLATE_OFFLOADS = ("cpu", "nvme")


@dataclass(frozen=True)
class Template:
    """The plan a curated config is written for: the lowest decode step at batch 1 of one (tp, pp, offload)."""

    tp: int
    pp: int
    offload: str
    estimate: Estimate | None  # None: no plan of this layout fits (``why_not`` says what breaks)
    why_not: str = ""

    @property
    def file_name(self) -> str:
        return f"deepspeed_zero3_tp{self.tp}_pp{self.pp}_{self.offload}.json"


def template_offloads(hardware: HardwareProfile) -> tuple[str, ...]:
    """CPU offload always; NVMe where the machine has a drive and is not native Windows (no libaio there)."""
    return tuple(o for o in TEMPLATE_OFFLOADS if o == "cpu" or (hardware.has_nvme and hardware.os != "windows"))


def templates(model: ModelSpec, hardware: HardwareProfile, workload: Workload) -> tuple[Template, ...]:
    """One template per tp x pp the machine can build (dp 1: ZeRO-3 partitions over no replicas) and per
    offload (``template_offloads``), each the fastest feasible plan at batch 1 of that layout."""
    offloads = template_offloads(hardware)
    result = run_search(model, hardware, workload, SearchSpace(offloads=offloads, batch_sizes=(1,), dp=(1,)))
    best: dict[tuple[int, int, str], int] = {}
    for flat in result.ranked("latency", batch_size=1):  # best first: the first of each layout wins
        p = result.plan(int(flat))
        best.setdefault((p.tp, p.pp, p.offload), int(flat))
    layouts = sorted({(tp, pp) for tp, pp, _ in candidate_arrangements(model, hardware, SearchSpace(dp=(1,)))})
    out = []
    for tp, pp in layouts:
        for offload in offloads:
            flat = best.get((tp, pp, offload))
            if flat is not None:
                out.append(Template(tp, pp, offload, result.estimate(flat)))
                continue
            out.append(Template(tp, pp, offload, None, _why_none_fits(result, tp, pp, offload)))
    return tuple(out)


def _why_none_fits(result: SearchResult, tp: int, pp: int, offload: str) -> str:
    """The limits the closest plan of one layout breaks (the smallest overshoot)."""
    for flat in result.closest_infeasible(result.n_plans):
        p = result.plan(int(flat))
        if (p.tp, p.pp, p.offload) == (tp, pp, offload):
            return "; ".join(r.message for r in result.estimate(int(flat)).reasons)
    return "no plan of this layout was evaluated"
