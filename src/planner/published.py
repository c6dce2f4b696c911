"""Predictions against published and measured runs (``validation/published_runs.yaml``).

Each comparable run is rebuilt as a Plan with the knobs its source used and predicted uncalibrated
(the profiles' ceilings and default efficiencies). Runs fall into classes that say how comparable they are:

- ``pcie-pinned``: weights streamed from pinned CPU memory, KV cache on the GPU: what we model.
- ``pcie-pageable``: the same from pageable memory; the A6000 workstation's pageable bandwidth is an
  assumption (8 GB/s, our VMs' measured 6-8 GB/s), not a measurement.
- ``kv-cpu-attention``: DeepSpeedExamples offloads the KV cache *and computes attention on the CPU*
  (its kv_offload README, step 5); hpi models transformers' OffloadedCache, which copies the cache back
  to the GPU each step. Different mechanisms: listed for completeness, not claimed.
Only ``deepspeed-*`` systems on a profile we ship are compared; FlexGen and Accelerate rows are context.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hpi.planner.catalog import load_model
from hpi.planner.predict import predict
from hpi.planner.profiles import load_profile
from hpi.planner.search import nvme_buffer_elems_for
from hpi.planner.specs.plan import Plan
from hpi.planner.specs.workload import Workload

DEFAULT_RUNS = Path(__file__).resolve().parents[2] / "validation" / "published_runs.yaml"
CLASSES = ("pcie-pinned", "pcie-pageable", "kv-cpu-attention")
METRICS = {"throughput": "throughput_tok_s", "decode_step": "decode_step_s"}


@dataclass(frozen=True)
class Comparison:
    run_id: str
    source: str
    model: str
    hardware: str
    plan_label: str
    run_class: str
    metric: str
    published: float
    predicted: float

    @property
    def ratio(self) -> float:
        return self.predicted / self.published

    @property
    def error(self) -> float:
        """Signed relative error of the prediction."""
        return self.ratio - 1.0


def load_runs(path: Path = DEFAULT_RUNS) -> list[dict[str, Any]]:
    with open(path) as f:
        return yaml.safe_load(f)["runs"]


def is_comparable(run: dict[str, Any]) -> bool:
    return run["system"].startswith("deepspeed") and bool(run["hardware"].get("profile")) and bool(
        run["plan"].get("batch_size")
    )


def run_class(run: dict[str, Any]) -> str:
    plan = run["plan"]
    if plan["kv_offload"]:
        return "kv-cpu-attention"
    return "pcie-pinned" if plan.get("pin_memory") else "pcie-pageable"


def plan_for(run: dict[str, Any]) -> tuple[Plan, Workload]:
    """The run's plan with its source's ZeRO-3 knobs written out explicitly."""
    p, model = run["plan"], load_model(run["model"])
    knobs: dict[str, Any] = {}
    if run["system"] == "deepspeed-zero-inference":
        # DeepSpeedExamples run_model.py: prefetch bucket and max live 2*h^2, persistence threshold h.
        h = model.hidden_size
        knobs = {"prefetch_bucket_elems": 2 * h * h, "max_live_elems": 2 * h * h, "persistence_threshold_elems": h}
    plan = Plan(
        offload=p["offload"], tp=p.get("tp") or 1, pp=p.get("pp") or 1, weight_bits=p["weight_bits"],
        pin_memory=bool(p.get("pin_memory")), kv_offload=bool(p["kv_offload"]), batch_size=p["batch_size"],
        nvme_buffer_elems=nvme_buffer_elems_for(model, p.get("tp") or 1, 1), **knobs,
    )
    # Every published DeepSpeed run used DeepSpeed's own (host-synchronizing) ZeRO-3 fetch wait.
    # DeepSpeedExamples' run_model.py computes in the HF config's torch_dtype, fp16 where unset: fp16 for
    # every model it published (OPT and Llama-2 configs say float16, BLOOM's says none); our own H100 runs
    # (docs/measured-facts.md) computed in bf16.
    dtype = p.get("dtype") or ("fp16" if run["system"] == "deepspeed-zero-inference" else "bf16")
    return plan, Workload(p["prompt_len"], p["gen_len"], compute_dtype=dtype, fetch_wait=p.get("fetch_wait") or "host")


def compare(run: dict[str, Any]) -> list[Comparison]:
    plan, workload = plan_for(run)
    est = predict(load_model(run["model"]), load_profile(run["hardware"]["profile"]), workload, plan)
    src = run["source"]
    source = f"{src.get('repo', '')}/{src.get('path', '')}"
    return [
        Comparison(run["id"], source, run["model"], run["hardware"]["profile"], plan.label, run_class(run),
                   m["name"], float(m["value"]), float(getattr(est, METRICS[m["name"]])))
        for m in run["metrics"]
        if m["name"] in METRICS
    ]


def compare_all(path: Path = DEFAULT_RUNS) -> list[Comparison]:
    return [c for run in load_runs(path) if is_comparable(run) for c in compare(run)]


def summary(comparisons: list[Comparison]) -> dict[str, dict[str, float]]:
    """Per class: count, median and max absolute percentage error."""
    out = {}
    for cls in CLASSES:
        errors = [abs(c.error) for c in comparisons if c.run_class == cls]
        if errors:
            out[cls] = {"n": len(errors), "median_ape": statistics.median(errors), "max_ape": max(errors)}
    return out
