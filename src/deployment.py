"""A deployment: one model, one plan, one workload and how to run them, resolved and validated before any
process starts.

``hpi run``, autotune's real trials (and the serving and evaluation runtimes after them) start ranks through
this one path::

    spec = RunSpec(plan=..., model=..., ...)           # what the user asked for, as plain data
    deployment = resolve_deployment(spec, ...)         # the model read, the decode mode chosen, the plan
                                                       #   predicted and checked, this node's GPUs found
    hpi.executor.launch.start(deployment, ...)         # torchrun, the worker ranks, the RunRecord

Resolution is pure (the planner only: no torch, no processes, nothing written); every refusal is a
``DeploymentError`` whose one line names the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hpi.executor.spec import RunSpec
from hpi.planner.specs.model import ModelSpec
from hpi.planner.specs.plan import decode_graph_blocker


class DeploymentError(ValueError):
    """A deployment that cannot start as asked: one line that says what to change."""


@dataclass(frozen=True)
class Nodes:
    """Which node of a multi-node run this process starts, and where they meet."""

    nnodes: int = 1
    node_rank: int = 0  # node 0 runs global rank 0, which writes the RunRecord
    master_addr: str = "127.0.0.1"  # node 0's address: the rendezvous listens there
    master_port: int | None = None  # None: a free port (one node only; several must agree on one)


@dataclass(frozen=True)
class Deployment:
    """Everything ``hpi.executor.launch.start`` needs, checked."""

    spec: RunSpec  # what every rank reads (spec.json): plan, workload with its decode mode, run options
    model: ModelSpec  # the planner's view of spec.model
    prediction: Any | None  # hpi.planner.predict.Estimate for spec.hardware, None without a profile
    nodes: Nodes = Nodes()
    nproc_per_node: int | None = None  # ranks on this node (None: world / nnodes)
    visible_gpus: tuple[int, ...] | None = None  # CUDA_VISIBLE_DEVICES in local-rank order (None: as is)
    warnings: tuple[str, ...] = ()  # what --force let through, said once before the launch

    @property
    def plan(self):
        return self.spec.plan

    @property
    def prediction_summary(self) -> dict[str, Any] | None:
        """The prediction recorded with the run (``spec.extra["predicted"]``)."""
        return prediction_summary(self.prediction) if self.prediction is not None else None


def _who(spec: RunSpec) -> str:
    """The command whose input a message is about: hpi serve resolves its deployment here as hpi run does."""
    return "hpi serve" if spec.mode == "serve" else "hpi run"


def decode_mode(spec: RunSpec, model: ModelSpec, asked: bool | None) -> bool:
    """Whether the run decodes through CUDA graphs: as asked, else wherever they can run (a GPU, a plan without
    ZeRO-3 or KV offload, a dense model). Asked for where they cannot run: refused."""
    blocker = decode_graph_blocker(spec.plan, model)
    if asked and blocker:
        raise DeploymentError(f"{_who(spec)}: CUDA graphs cannot run {spec.plan.label}: {blocker}; drop --cuda-graphs")
    if asked is not None:
        return asked
    return spec.device == "cuda" and blocker is None


def compile_mode(spec: RunSpec, asked: bool | None) -> bool:
    """Whether the graphed decode step is compiled (``hpi.executor.graphs``): as asked, else on a GPU wherever
    decode is graphed, except under ``hpi serve``, whose graphs are captured per row and key-span bucket (one
    compile each). Asked for where it cannot run: refused."""
    return _graphed_step_switch(spec, asked, "--compile-decode", "compiles the graphed decode step",
                                "its graphs are captured per batch and key-span bucket, each would compile apart")


def dequant_mode(spec: RunSpec, asked: bool | None) -> bool:
    """Whether 8/4-bit weights are dequantized by hpi's fused kernel (``hpi.executor.dequant``): as asked, else on
    a GPU for a quantized plan. Asked for a 16-bit plan: refused (nothing to dequantize)."""
    if asked and not spec.plan.is_quantized:
        raise DeploymentError(f"{_who(spec)}: --fused-dequant dequantizes 8/4-bit weights, and plan "
                              f"{spec.plan.label} keeps 16-bit ones: add --quant-bits 8 or 4, or drop --fused-dequant")
    if asked is not None:
        return asked
    return spec.plan.is_quantized and spec.device == "cuda"


def skinny_mode(spec: RunSpec, asked: bool | None) -> bool:
    """Whether the graphed decode step stacks its sibling products and runs those of 2-16 rows in hpi's kernel
    (``hpi.executor.skinny_gemm``): as asked, else on a GPU wherever decode is graphed, except under ``hpi serve``,
    whose graphs run their products through torch. Asked for where it cannot run: refused."""
    return _graphed_step_switch(spec, asked, "--skinny-gemm", "changes the graphed decode step's products",
                                "its decode graphs run each product through torch")


def _graphed_step_switch(spec: RunSpec, asked: bool | None, flag: str, does: str, not_served: str) -> bool:
    """A switch of the graphed decode step (``flag`` ``does`` something to it): as asked, else on a GPU wherever
    decode is graphed and not under ``hpi serve`` (``not_served`` says why); asked for an eager run or under serve:
    refused in one line."""
    if asked and not spec.decode_graphs:
        raise DeploymentError(f"{_who(spec)}: {flag} {does}, and this run decodes eagerly: add --cuda-graphs "
                              f"(GPU-resident 16-bit plans) or drop {flag}")
    if asked and spec.mode == "serve":
        raise DeploymentError(f"hpi serve: {flag} is not supported: {not_served}; drop {flag}")
    if asked is not None:
        return asked
    return spec.decode_graphs and spec.device == "cuda" and spec.mode != "serve"


# A warm-up's tokens: its prefill and one decode forward fill DeepSpeed's prefetch trace, pick the decode kernels and,
# where decode is graphed, capture (and compile) the step at the measured run's cache slots (RunSpec.warmup_gen_len).
WARMUP_TOKENS = 2


def warmup_mode(spec: RunSpec, asked: int | None) -> RunSpec:
    """The untimed generations before the measured one: ``asked`` of ``WARMUP_TOKENS`` tokens each (the spec's own
    count where it sets one); None: one where a GPU run graphs its decode and none asked otherwise. A graphed step's
    first replay of a shape captures it and, compiled, compiles it (65-75 s for the 8B on an H100:
    benchmarks/results/2026-12-07-compiles): paid once per shape and recorded as compile_s, not timed as the measured
    run's first decode step, its total and its throughput. Serving warms up on its own (``hpi.executor.serve_loop``)."""
    if asked is None:
        if spec.warmup_steps or spec.mode == "serve" or not (spec.decode_graphs and spec.device == "cuda"):
            return spec
        asked = 1
    return replace(spec, warmup_steps=asked, warmup_gen_len=spec.warmup_gen_len or (WARMUP_TOKENS if asked else 0))


@dataclass(frozen=True)
class HostMemory:
    """What this node lets a run hold in RAM: MemAvailable, and RLIMIT_MEMLOCK's soft limit (None: unknown or
    unlimited)."""

    available_bytes: float | None
    memlock_bytes: float | None


def this_host() -> HostMemory:
    """This node's ``HostMemory`` (Linux: /proc/meminfo; elsewhere what ``resource`` tells)."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = float(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
        memlock = None if soft == resource.RLIM_INFINITY else float(soft)
    except (ImportError, OSError, ValueError):  # Windows has no resource module
        memlock = None
    return HostMemory(available, memlock)


def pinning_problem(pinned_bytes: float, process_bytes: float, host: HostMemory) -> str | None:
    """Why pinning ``pinned_bytes`` would fail on ``host`` while the run holds ``process_bytes`` of RAM in all (the
    prediction's CPU memory, pinned included), or None. Page-locked memory cannot be swapped: past available RAM
    the kernel's OOM killer ends the run (ZeRO-Inference's most common failure)."""
    gb = 1e9
    if host.available_bytes is not None and process_bytes > host.available_bytes:
        return (f"the run's {process_bytes / gb:,.1f} GB of RAM ({pinned_bytes / gb:,.1f} GB pinned) > "
                f"{host.available_bytes / gb:,.1f} GB available here (MemAvailable)")
    if host.memlock_bytes is not None and pinned_bytes > host.memlock_bytes:
        return f"{pinned_bytes / gb:,.1f} GB pinned > RLIMIT_MEMLOCK {host.memlock_bytes / gb:,.1f} GB (ulimit -l)"
    return None


def _safe_pinning(spec: RunSpec, est, host: HostMemory, explicit: bool, warnings: list[str]) -> RunSpec:
    """Pinning turned off (one warning, recorded in ``spec.extra["pinning"]``) where ``pinning_problem`` says it
    would fail; refused instead when --pin-memory was given. CUDA runs only: pinning serves host->GPU copies."""
    plan = spec.plan
    if est is None or spec.device != "cuda" or not (plan.pin_memory and plan.copies_from_host_memory):
        return spec
    problem = pinning_problem(est.pinned_bytes, est.cpu_bytes, host)
    if problem is None:
        return spec
    if explicit:
        raise DeploymentError(f"{_who(spec)}: --pin-memory: {problem}: drop --pin-memory (pageable copies, "
                              "slower), free memory, or raise the limit")
    warnings.append(f"pinned memory turned off: {problem}; host->device copies run pageable (slower); "
                    "--pin-memory refuses instead")
    return replace(spec, plan=plan.with_(pin_memory=False), extra={**spec.extra, "pinning": f"off: {problem}"})


def _check_swap_buffers(spec: RunSpec, est, host: HostMemory) -> None:
    """Refuse an NVMe-offload run whose swap buffers would not fit this node: DeepSpeed pins them whatever
    pin_memory says (partitioned_param_swapper.py ``_configure_aio``: ``new_cpu_locked_tensor``), so turning pinning
    off cannot help; fewer buffers can (``hpi.planner.search.nvme_buffer_counts_for``)."""
    plan = spec.plan
    if est is None or spec.device != "cuda" or not plan.offloads_to_nvme:
        return
    problem = pinning_problem(est.pinned_bytes, est.cpu_bytes, host)
    if problem is None:
        return
    each = plan.nvme_buffer_elems * 2 / 1e9
    raise DeploymentError(f"{_who(spec)}: the {plan.nvme_buffer_count} NVMe swap buffers ({each:,.1f} GB each) are "
                          f"pinned whatever --pin-memory says: {problem}: lower --nvme-buffer-count, free memory, or "
                          "raise the limit")


def resolve_deployment(spec: RunSpec, *, decode_graphs: bool | None = None, decode_compile: bool | None = None,
                       fused_dequant: bool | None = None, skinny_gemm: bool | None = None,
                       warmup_steps: int | None = None, force: bool = False,
                       nodes: Nodes = Nodes(), model: ModelSpec | None = None, host: HostMemory | None = None,
                       pin_memory_explicit: bool = False) -> Deployment:
    """Check ``spec`` against its model and (with ``spec.hardware``) its machine, and fill in what it derives.

    ``decode_graphs``: True / False as asked, None for graphs wherever the plan allows them; ``decode_compile``,
    ``fused_dequant`` and ``skinny_gemm`` likewise (``compile_mode``, ``dequant_mode``, ``skinny_mode``);
    ``warmup_steps``: as asked, None for one where the decode is graphed on a GPU (``warmup_mode``). ``force``:
    run a plan the prediction says cannot fit (with a warning). ``model``: the ModelSpec when the caller has read it.
    ``host``: this node's memory (``this_host``): pinning that would not fit it is turned off, or refused when
    ``pin_memory_explicit`` (``_safe_pinning``); None: not checked.
    """
    from hpi.planner.catalog import load_model

    model = model or load_model(spec.model)
    spec = replace(spec, decode_graphs=decode_mode(spec, model, decode_graphs))
    spec = replace(spec, decode_compile=compile_mode(spec, decode_compile))
    spec = replace(spec, fused_dequant=dequant_mode(spec, fused_dequant))
    spec = replace(spec, skinny_gemm=skinny_mode(spec, skinny_gemm))
    spec = warmup_mode(spec, warmup_steps)
    warnings: list[str] = []
    prediction = _predict(spec, model, force, warnings) if spec.hardware else None
    if host is not None:
        pinned = _safe_pinning(spec, prediction, host, pin_memory_explicit, warnings)
        if pinned is not spec:
            spec, prediction = pinned, _predict(pinned, model, force, warnings)
        _check_swap_buffers(spec, prediction, host)
    _check_inputs(spec, model, nodes)
    nproc, visible = _node_gpus(spec, prediction, nodes)
    if prediction is not None:
        spec = replace(spec, extra={**spec.extra, "predicted": prediction_summary(prediction)})
    return Deployment(spec=spec, model=model, prediction=prediction, nodes=nodes, nproc_per_node=nproc,
                      visible_gpus=visible, warnings=tuple(warnings))


def _predict(spec: RunSpec, model: ModelSpec, force: bool, warnings: list[str]):
    """The prediction a run checks before launching: an infeasible plan is refused unless ``force``."""
    from hpi.planner.predict import PlanError, predict
    from hpi.planner.profiles import load_profile

    hardware = load_profile(spec.hardware)
    plan = spec.plan
    try:
        est = predict(model, hardware, spec.workload, plan)
    except PlanError as e:
        if not force:
            raise DeploymentError(f"{_who(spec)}: plan {plan.label} cannot be placed on {hardware.name}: {e} "
                                  "(--force runs it anyway)") from None
        warnings.append(f"no prediction ({e}); running anyway (--force)")
        return None
    if not est.feasible:
        reasons = "; ".join(r.message for r in est.reasons)
        if not force:
            raise DeploymentError(f"{_who(spec)}: plan {plan.label} is infeasible on {hardware.name}: {reasons} "
                                  "(pass --force to run it anyway)")
        warnings.append(f"running an infeasible plan (--force): {reasons}")
    return est


def _check_inputs(spec: RunSpec, model: ModelSpec, nodes: Nodes) -> None:
    """What the run reads and how it starts, checked before anything is written."""
    from hpi.planner.feasibility import plan_problems

    context, positions = spec.workload.context_len_tokens, model.max_position_embeddings
    if context > positions:
        raise DeploymentError(f"{_who(spec)}: prompt {spec.workload.prompt_len_tokens} + gen "
                              f"{spec.workload.gen_len_tokens} = {context} tokens > {model.name}'s {positions} "
                              "positions (max_position_embeddings): shorten --prompt-len or --gen-len")
    if spec.mode == "chat" and not spec.prompts:
        raise DeploymentError(f"{_who(spec)}: --chat needs a prompt: pass --prompt TEXT or --prompts FILE")
    if spec.checkpoint and not Path(spec.checkpoint).is_dir():
        raise DeploymentError(f"{_who(spec)}: --checkpoint {spec.checkpoint}: no such directory")
    if spec.checkpoint and model.checkpoint_dtype_bytes < 2:  # read as bf16 values, the FP8 blocks lose their scales
        raise DeploymentError(f"{_who(spec)}: --checkpoint {spec.checkpoint} stores FP8 block-quantized weights "
                              "(config.json's quantization_config): hpi loads 16/32-bit checkpoints (and quantizes "
                              "them itself with --quant-bits): dequantize it to bf16 first")
    if spec.checkpoint:
        _check_checkpoint_headers(spec)
    if spec.prompts and not spec.checkpoint:
        raise DeploymentError(f"{_who(spec)}: text prompts need a tokenizer: pass --checkpoint DIR (a local HF "
                              "checkpoint with tokenizer files), or leave out --prompt for seeded random prompts")
    if not spec.hardware:  # with a profile, the prediction has checked the plan against the model already
        problems = plan_problems(model, None, spec.plan)
        if problems:
            raise DeploymentError(f"{_who(spec)}: {problems[0]}")
    if nodes.node_rank >= nodes.nnodes:
        raise DeploymentError(f"{_who(spec)}: --node-rank {nodes.node_rank} must be < --nnodes {nodes.nnodes}")


def _check_checkpoint_headers(spec: RunSpec) -> None:
    """Every safetensors header of the checkpoint parses and fits its file (a few KB read per file), so a truncated
    or corrupt file is named before any rank starts rather than by one rank's traceback."""
    from hpi.executor.safetensors_header import HeaderError, check_files, checkpoint_files

    try:
        files = checkpoint_files(spec.checkpoint)
    except FileNotFoundError:
        return  # no weight files: the reader names what is missing
    try:
        check_files(files)
    except (HeaderError, FileNotFoundError) as e:
        raise DeploymentError(f"{_who(spec)}: --checkpoint {spec.checkpoint}: {e}") from e


def _node_gpus(spec: RunSpec, est, nodes: Nodes) -> tuple[int | None, tuple[int, ...] | None]:
    """(ranks on this node, CUDA_VISIBLE_DEVICES in local-rank order) from the placement, for CUDA runs."""
    if est is None or spec.device != "cuda":
        return None, None
    from hpi.executor.render import node_ranks

    per_node = list(node_ranks(est.placement).values())
    if len(per_node) != nodes.nnodes:
        raise DeploymentError(
            f"{_who(spec)}: the plan's {est.placement.world_size} ranks span {len(per_node)} node(s) of "
            f"{est.hardware.name}: start one hpi run per node with --nnodes {len(per_node)} --node-rank K "
            "--master-addr HOST --master-port P")
    gpus = [gpu for _, gpu in per_node[nodes.node_rank]]
    return len(gpus), (tuple(gpus) if gpus != list(range(len(gpus))) else None)


def prediction_summary(est) -> dict[str, Any]:
    """What a RunRecord keeps of the planner's prediction (``predicted``), beside each measured figure."""
    return {"hardware": est.hardware.name, "feasible": est.feasible, "reasons": [r.message for r in est.reasons],
            "prefill_s": est.prefill_s, "ttft_s": est.ttft_s, "decode_step_s": est.decode_step_s,
            "total_s": est.total_s, "throughput_tok_s": est.throughput_tok_s, "gpu_peak_bytes": est.gpu_peak_bytes,
            "rank_gpus": list(est.placement.rank_gpus)}
