"""What one run is asked to do: the plan and everything else a worker rank needs, as plain JSON.

The launcher writes it to ``<out_dir>/spec.json``; every rank reads the same file, so all ranks agree on
inputs (TP ranks must see identical prompts; ZeRO-3 ranks must run the same number of forwards).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hpi.atomic import write_json as write_json_atomic  # the one atomic writer (hpi.atomic); old name kept
from hpi.planner.cost.pipeline import stage_layer_sizes
from hpi.planner.specs.model import ModelSpec
from hpi.planner.specs.plan import Plan, reject_unknown_fields
from hpi.planner.specs.workload import COMPUTE_DTYPES as DTYPES
from hpi.planner.specs.workload import FETCH_WAITS, SWITCHES, Workload

DEVICES = ("cuda", "cpu")
MODES = ("benchmark", "chat", "serve")
# Plan fields a run may vary without rebuilding the model or its ZeRO-3 partitions: a variant re-measures
# the same built stage at another batch / micro-batch count / KV placement (a batch sweep pays the weight
# materialization once, which for a 70B offload plan costs more than the measurement itself).
RUNTIME_FIELDS = ("batch_size", "micro_batches", "kv_offload")
# Run conditions a variant may change too: the same stage decodes eagerly or as CUDA graphs, compiled or not,
# and dequantizes with DeepSpeed's ops or the fused kernel (side by side on one build).
VARIANT_CONDITIONS = SWITCHES


@dataclass(frozen=True)
class ServeSpec:
    """How ``hpi serve`` runs the loaded model (``hpi.executor.serve_loop``)."""

    n_slots: int  # KV-cache slots: requests decoded together at most
    max_model_len: int  # prompt + generated tokens of one request at most (each slot's cache length)
    step_tokens: int  # tokens one step may carry (prompt chunks + decode tokens)
    address: tuple[str, int]  # the HTTP front's listener that rank 0 connects back to
    policy: str = "fused"  # hpi.executor.scheduler.POLICIES
    max_queue: int = 1024  # waiting requests at most; more are answered 429
    hang_timeout_s: float = 600.0  # a rank that hears nothing from its predecessor this long is stuck
    metrics: bool = True  # count each rank's work for /metrics and /v1/events (hpi serve --no-metrics: off)

    def __post_init__(self) -> None:
        from hpi.executor.scheduler import POLICIES

        object.__setattr__(self, "address", (str(self.address[0]), int(self.address[1])))
        if self.n_slots < 1 or self.max_model_len < 2 or self.step_tokens < 1 or self.max_queue < 1:
            raise ValueError(f"serve needs n_slots({self.n_slots}) >= 1, max_model_len({self.max_model_len}) >= 2, "
                             f"step_tokens({self.step_tokens}) >= 1 and max_queue({self.max_queue}) >= 1")
        if self.policy not in POLICIES:
            raise ValueError(f"policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        if not self.hang_timeout_s > 0:
            raise ValueError(f"hang_timeout_s({self.hang_timeout_s}) must be > 0")


@dataclass(frozen=True)
class RunSpec:
    plan: Plan
    model: str  # catalogue name, or a path to a config.json or a checkpoint directory
    workload: Workload = Workload()
    hardware: str | None = None  # profile name or path (for the prediction beside each figure)
    device: str = "cuda"
    dtype: str = "bf16"
    checkpoint: str | None = None  # local HF checkpoint directory (safetensors + tokenizer)
    prompts: tuple[str, ...] = ()  # text prompts; empty: random token ids (seeded, same for every layout)
    seed: int = 0
    mode: str = "benchmark"  # benchmark: exactly gen_len tokens; chat: stop at EOS, stream tokens
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    nvme_path: str | None = None
    stage_layers: tuple[int, ...] = ()  # decoder layers per pipeline stage; empty: balanced by the planner
    out_dir: str = "runs/latest"
    warmup_steps: int = 0  # untimed generate calls before the measured one
    warmup_gen_len: int = 0  # tokens each warm-up generates; 0: the workload's gen_len (2 already fills
    #   DeepSpeed's prefetch trace, picks the decode kernels and, graphed, compiles and captures the measured run's
    #   step: prefill + one decode forward, on a cache of the measured run's slots)
    fetch_wait: str = "event"  # event / stream: hpi's GPU-ordered ZeRO-3 fetch waits (each parameter's own copy,
    #   dp 1 / every copy queued); host: DeepSpeed's stock (hpi.executor.zero3)
    decode_graphs: bool = False  # replay each decode step as a CUDA graph (hpi.executor.graphs); resident plans only
    decode_compile: bool = False  # compile the graphed decode step with torch.compile before capture (graphs)
    fused_dequant: bool = False  # dequantize 8/4-bit weights with hpi's fused kernel (hpi.executor.dequant)
    skinny_gemm: bool = False  # graphed decode: stacked sibling products, few-row kernel (hpi.executor.skinny_gemm)
    variants: tuple[dict[str, Any], ...] = ()  # further measurements on the same build: RUNTIME_FIELDS overrides
    serve: ServeSpec | None = None  # mode "serve": the serving runtime's settings
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes recorded with the run

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.stage_layers and len(self.stage_layers) != self.plan.pp:
            raise ValueError(
                f"stage_layers has {len(self.stage_layers)} entries but pp = {self.plan.pp}: give one count per stage"
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and 0 < top_p <= 1")
        if self.plan.offload == "nvme" and self.dtype == "fp32":
            # DeepSpeed 0.19.8 hands NVMe-swapped fp32 weights back as bf16 ("expected m1 and m2 to have the
            # same dtype, but got: float != c10::BFloat16" in the first Linear), seen on its CPU accelerator.
            raise ValueError("offload nvme with dtype fp32 fails inside DeepSpeed 0.19.8: use --dtype bf16 or fp16")
        if self.fetch_wait not in FETCH_WAITS:
            raise ValueError(f"fetch_wait {self.fetch_wait!r} is not one of {', '.join(FETCH_WAITS)}")
        for v in self.variants:
            other = sorted(set(v) - set(RUNTIME_FIELDS) - set(VARIANT_CONDITIONS))
            if other:
                raise ValueError(f"variant {v} changes {', '.join(other)}, which needs a new build: a variant may "
                                 f"only change {', '.join(RUNTIME_FIELDS + VARIANT_CONDITIONS)}; launch another "
                                 f"run for the rest")
        if self.decode_graphs and self.plan.graph_blocker:
            raise ValueError(f"CUDA graphs cannot run plan {self.plan.label}: {self.plan.graph_blocker}; drop "
                             f"--cuda-graphs or use a GPU-resident 16-bit plan without KV offload")
        if self.decode_compile and not self.decode_graphs:
            raise ValueError("decode_compile compiles the graphed decode step: turn decode_graphs on too "
                             "(--cuda-graphs) or drop --compile-decode")
        if self.skinny_gemm and not self.decode_graphs:
            raise ValueError("skinny_gemm stacks the graphed decode step's products: turn decode_graphs on too "
                             "(--cuda-graphs) or drop --skinny-gemm")
        for v in self.variants:
            self._variant(v)  # each variant is a RunSpec: it checks its own plan and run conditions
        if self.variants and self.mode != "benchmark":
            raise ValueError(f"variants re-measure a benchmark run; {self.mode} mode takes none")
        if (self.mode == "serve") != (self.serve is not None):
            raise ValueError("mode serve and a ServeSpec go together: give both or neither")
        # The run conditions the cost model prices (cost.dequant, cost.estimate, cost.overhead) are the spec's
        # own: the prediction beside each measured figure prices the dtype, fetch wait and graphs the run used.
        conditions = dict(compute_dtype=self.dtype, fetch_wait=self.fetch_wait,
                          **{name: getattr(self, name) for name in SWITCHES})
        object.__setattr__(self, "workload", replace(self.workload, **conditions))

    def measurements(self) -> list["RunSpec"]:
        """This run's own measurement, then one spec per variant (each with its own folder under out_dir)."""
        specs = [replace(self, variants=())]
        for i, v in enumerate(self.variants, start=1):
            specs.append(replace(self._variant(v), out_dir=str(Path(self.out_dir) / f"variant-{i}")))
        return specs

    def _variant(self, v: dict[str, Any]) -> "RunSpec":
        """This spec with one variant's plan fields and run conditions, without variants of its own."""
        plan_fields = {k: x for k, x in v.items() if k not in VARIANT_CONDITIONS}
        conditions = {k: x for k, x in v.items() if k in VARIANT_CONDITIONS}
        return replace(self, plan=replace(self.plan, **plan_fields), variants=(), **conditions)

    def stage_layer_counts(self, model: ModelSpec) -> tuple[int, ...]:
        """Decoder layers per pipeline stage: this spec's ``stage_layers``, else the planner's balanced split
        (``cost.pipeline.stage_layer_sizes``). The one rule the worker builds its stages by and the config
        writers (``hpi run``'s ds_config.json, the evaluation job) size ZeRO-3's layer leaves by."""
        if not self.stage_layers:
            return stage_layer_sizes(model, self.plan.pp)
        if sum(self.stage_layers) != model.n_layers:
            raise ValueError(f"sum(stage_layers {list(self.stage_layers)}) = {sum(self.stage_layers)} != n_layers "
                             f"({model.n_layers}) of {model.name}: give counts that add up to the model's layers")
        return tuple(self.stage_layers)

    @property
    def world_size(self) -> int:
        return self.plan.world_size

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def warmup_tokens(self) -> int:
        """Tokens each warm-up generates: ``warmup_gen_len``, at most the workload's (0: all of the workload's)."""
        gen_len = self.workload.gen_len_tokens
        return min(self.warmup_gen_len or gen_len, gen_len)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prompts"] = list(self.prompts)
        d["stage_layers"] = list(self.stage_layers)
        d["variants"] = [dict(v) for v in self.variants]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunSpec":
        reject_unknown_fields(cls, data, "run spec")
        d = dict(data)
        d["plan"] = Plan.from_dict(d["plan"])
        d["workload"] = Workload(**d.get("workload", {}))
        d["prompts"] = tuple(d.get("prompts", ()))
        d["stage_layers"] = tuple(d.get("stage_layers", ()))
        d["variants"] = tuple(dict(v) for v in d.get("variants", ()))
        if d.get("serve") is not None:
            reject_unknown_fields(ServeSpec, d["serve"], "serve spec")
            d["serve"] = ServeSpec(**d["serve"])
        return cls(**d)

    def write(self, path: str | os.PathLike) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def read(cls, path: str | os.PathLike) -> "RunSpec":
        with open(path) as f:
            return cls.from_dict(json.load(f))
