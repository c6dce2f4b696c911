"""``hpi``: plan, predict and explain big-model inference on hardware it does not fit.

Every user mistake ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from dataclasses import replace
from typing import Any, Sequence

from hpi.planner.specs.plan import DEEPSPEED_DEFAULT_PREFETCH_ELEMS, OFFLOAD_KINDS, WEIGHT_BITS, Plan, decode_graph_blocker
from hpi.planner.specs.workload import COMPUTE_DTYPES, DEFAULT_GEN_LEN, DEFAULT_PROMPT_LEN, FETCH_WAITS, Workload

EXIT_USAGE = 2


class UsageError(Exception):
    """Anything the user can fix: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _positive(text: str) -> int:
    try:
        value = int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def _add_target(p: argparse.ArgumentParser, hardware_required: bool = True) -> None:
    p.add_argument("--model", required=True, help="catalogue name (hpi models) or path to a HF config.json")
    p.add_argument("--hardware", required=hardware_required, default=None,
                   help="profile name (hpi hardware) or path to a profile YAML"
                   + ("" if hardware_required else "; given, the plan is predicted and refused if infeasible"))
    p.add_argument("--batch", type=_positive, default=1, help="batch size (default 1)")
    p.add_argument("--prompt-len", type=_positive, default=DEFAULT_PROMPT_LEN, help="prompt tokens (default 512)")
    p.add_argument("--gen-len", type=_positive, default=DEFAULT_GEN_LEN, help="generated tokens (default 32)")
    p.add_argument("--json", action="store_true", help="print one JSON document")


def _add_run_conditions(p: argparse.ArgumentParser) -> None:
    """What the run computes in and how it waits for ZeRO-3 fetches (Workload fields outside the Plan)."""
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default="bf16",
                   help="compute dtype (default bf16); fp16 takes DeepSpeed's fused 4-bit dequantization")
    p.add_argument("--fetch-wait", choices=FETCH_WAITS, default="stream",
                   help="ZeRO-3 fetch wait: stream (hpi's, default) or host (DeepSpeed's stock, host-synchronizing)")
    _add_cuda_graph_flags(p, default=None, on_help="replay each decode step as a CUDA graph (default: wherever the "
                          "plan allows it: dense, GPU-resident, 16-bit, dp 1, KV cache on the GPU; run refuses it for "
                          "other plans)", off_help="decode eagerly, one kernel launch at a time")


def _add_cuda_graph_flags(p: argparse.ArgumentParser, *, default: bool | None, on_help: str, off_help: str) -> None:
    """--cuda-graphs / --no-cuda-graphs into ``args.decode_graphs`` (None: neither given, where default is None)."""
    graphs = p.add_mutually_exclusive_group()
    graphs.add_argument("--cuda-graphs", dest="decode_graphs", action="store_true", default=default, help=on_help)
    graphs.add_argument("--no-cuda-graphs", dest="decode_graphs", action="store_false", help=off_help)


def _add_plan_knobs(p: argparse.ArgumentParser, for_search: bool) -> None:
    """Plan flags: fixed values for predict/explain, restrictions of the search space for plan."""
    default = None if for_search else "none"
    p.add_argument("--offload", choices=OFFLOAD_KINDS, default=default, help="where ZeRO-3 keeps weights")
    p.add_argument("--tp", type=_positive, default=None if for_search else 1, help="tensor parallel degree")
    p.add_argument("--pp", type=_positive, default=None if for_search else 1, help="pipeline parallel degree")
    p.add_argument("--dp", type=_positive, default=None if for_search else 1, help="ZeRO-3 partition (data parallel) degree")
    p.add_argument("--quant-bits", type=int, choices=WEIGHT_BITS, default=None if for_search else 16)
    pin = p.add_mutually_exclusive_group()
    pin.add_argument("--pin-memory", dest="pin_memory", action="store_true", default=None)
    pin.add_argument("--no-pin-memory", dest="pin_memory", action="store_false")
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--kv-offload", dest="kv_offload", action="store_true", default=None, help="KV cache in CPU RAM")
    kv.add_argument("--no-kv-offload", dest="kv_offload", action="store_false")
    if not for_search:
        p.add_argument("--prefetch-bucket", type=_positive, default=DEEPSPEED_DEFAULT_PREFETCH_ELEMS,
                       metavar="ELEMS", help="stage3_prefetch_bucket_size (default 5e7)")
        p.add_argument("--micro-batches", type=_positive, default=None, help="pipeline micro-batches (default: pp)")
        p.add_argument("--max-live", type=_positive, default=Plan.max_live_elems, metavar="ELEMS")
        p.add_argument("--persistence-threshold", type=_positive, default=Plan.persistence_threshold_elems, metavar="ELEMS")
        p.add_argument("--nvme-buffer-count", type=_positive, default=Plan.nvme_buffer_count)
        p.add_argument("--nvme-buffer-size", type=_positive, default=None, metavar="ELEMS",
                       help="elements per NVMe buffer (default: fits the largest tensor)")
        p.add_argument("--plan", dest="plan_file", default=None, metavar="PLAN.json",
                       help="read the plan from JSON (a plan object, or an entry of hpi plan --json)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hpi", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("plan", help="rank the plans that can run a model on a machine")
    _add_target(p)
    _add_run_conditions(p)
    _add_plan_knobs(p, for_search=True)
    p.add_argument("--objective", choices=("latency", "throughput", "balanced"), default="latency")
    p.add_argument("--top", type=_positive, default=10, help="plans to show (default 10)")
    p.add_argument("--max-batch", type=_positive, default=256, help="largest batch searched (default 256)")
    p.add_argument("--pareto", action="store_true", help="also show the latency/throughput Pareto front")
    for name, text in (("predict", "predict one plan's memory and time"),
                       ("explain", "what binds a plan, what each knob would change, how to fix it")):
        p = sub.add_parser(name, help=text)
        _add_target(p)
        _add_run_conditions(p)
        _add_plan_knobs(p, for_search=False)
    p = sub.add_parser("run", help="run one plan for real (DeepSpeed ZeRO-3 x TP x PP) and report what it measured")
    _add_target(p, hardware_required=False)
    _add_run_conditions(p)
    _add_plan_knobs(p, for_search=False)
    _add_run_options(p)
    p = sub.add_parser("models", help="the model catalogue")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("hardware", help="the hardware profiles")
    p.add_argument("--json", action="store_true")
    for module in _COMMAND_MODULES:
        COMMANDS.update(importlib.import_module(module).register(sub))
    return parser


# Subcommands that live with their own package. Each module has ``register(sub) -> {name: handler}``: it
# adds its parsers to ``sub`` (argparse sub-parsers) and returns the handlers, each ``handler(args) -> int``.
# Importing a module here must stay cheap and must not import torch (hpi plan starts in under a second).
_COMMAND_MODULES: tuple[str, ...] = ("hpi.executor.probe_cli", "hpi.planner.calibrate_cli", "hpi.autotune.cli")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", default=None, metavar="TEXT", help="one text prompt (default: random token ids)")
    prompts.add_argument("--prompts", dest="prompts_file", default=None, metavar="FILE",
                         help="text prompts, one per line (empty lines skipped)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: DeepSpeed's CPU accelerator with gloo, for tests (default cuda)")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="local HF checkpoint (safetensors + tokenizer); default: random weights")
    p.add_argument("--out", default="runs/latest", metavar="DIR",
                   help="run folder: spec.json, ds_config.json, record.json, logs/ (default runs/latest)")
    p.add_argument("--force", action="store_true", help="run a plan the prediction says cannot fit")
    p.add_argument("--nvme-path", default=None, metavar="DIR", help="folder on the NVMe drive (--offload nvme)")
    p.add_argument("--seed", type=_positive, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--chat", action="store_true", help="stop at EOS and stream the tokens as they come")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="stop the run after S seconds")
    p.add_argument("--nnodes", type=_positive, default=1, help="nodes taking part (one hpi run per node)")
    p.add_argument("--node-rank", type=_positive, default=0, help="this node's rank (0 runs rank 0)")
    p.add_argument("--master-addr", default="127.0.0.1", help="node 0's address (rendezvous)")
    p.add_argument("--master-port", type=_positive, default=None, help="rendezvous port (default: a free one, 1 node)")


# ---- loading the target ---------------------------------------------------------------------------
def _workload(args: argparse.Namespace) -> Workload:
    return Workload(args.prompt_len, args.gen_len, compute_dtype=getattr(args, "dtype", None) or "bf16",
                    fetch_wait=getattr(args, "fetch_wait", None) or "stream",
                    decode_graphs=getattr(args, "decode_graphs", None) is not False)  # priced where a plan allows


def _run_graphs(args: argparse.Namespace, model, plan) -> bool:
    """hpi run's decode mode: as asked, else CUDA graphs wherever they can run (a GPU, a plan without ZeRO-3
    or KV offload, a dense model)."""
    blocker = decode_graph_blocker(plan, model)
    if args.decode_graphs and blocker:
        raise UsageError(f"hpi run: CUDA graphs cannot run {plan.label}: {blocker}; drop --cuda-graphs")
    if args.decode_graphs is not None:
        return args.decode_graphs
    return args.device == "cuda" and blocker is None


def _load_target(args: argparse.Namespace):
    from hpi.planner.catalog import load_model
    from hpi.planner.profiles import load_profile

    return load_model(args.model), load_profile(args.hardware), _workload(args)


def _plan_from_file(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise UsageError(f"cannot read plan {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    if isinstance(data, dict) and "plans" in data:
        data = data["plans"][0] if data["plans"] else {}
    if isinstance(data, dict) and isinstance(data.get("plan"), dict):
        data = data["plan"]
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object with the plan's fields")
    return data


def _plan_from_args(args: argparse.Namespace, model) -> Plan:
    from hpi.planner.search import nvme_buffer_elems_for

    if args.plan_file:
        fields = _plan_from_file(args.plan_file)
        return Plan.from_dict(fields)
    per_replica = max(args.batch // max(args.dp, 1), 1)
    micro = args.micro_batches
    if micro is None:  # as many micro-batches as stages, when the batch allows
        micro = max(d for d in range(1, min(args.pp, per_replica) + 1) if per_replica % d == 0) if args.pp > 1 else 1
    nvme_buffer = args.nvme_buffer_size
    if nvme_buffer is None:
        nvme_buffer = nvme_buffer_elems_for(model, max(args.tp, 1), max(args.dp, 1))
    return Plan(
        offload=args.offload,
        tp=args.tp,
        pp=args.pp,
        dp=args.dp,
        weight_bits=args.quant_bits,
        pin_memory=True if args.pin_memory is None else args.pin_memory,
        kv_offload=bool(args.kv_offload),
        batch_size=args.batch,
        micro_batches=micro,
        prefetch_bucket_elems=args.prefetch_bucket,
        max_live_elems=args.max_live,
        persistence_threshold_elems=args.persistence_threshold,
        nvme_buffer_count=args.nvme_buffer_count,
        nvme_buffer_elems=nvme_buffer,
    )


def _console():
    from rich.console import Console

    return Console(width=160)


def _emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, default=_json_default) + "\n")


def _json_default(o: Any):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"cannot encode {type(o).__name__}")


# ---- commands ---------------------------------------------------------------------------------------
def cmd_predict(args: argparse.Namespace) -> int:
    from hpi.planner.predict import predict
    from hpi.planner.report import print_estimate, print_placement

    model, hardware, workload = _load_target(args)
    est = predict(model, hardware, workload, _plan_from_args(args, model))
    if args.json:
        _emit_json(est.to_dict())
    else:
        console = _console()
        print_estimate(console, est)
        print_placement(console, est)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from hpi.planner.explain import bindings, fixes, knob_effects
    from hpi.planner.predict import predict
    from hpi.planner.report import knob_table, print_bindings, print_estimate, print_placement

    model, hardware, workload = _load_target(args)
    est = predict(model, hardware, workload, _plan_from_args(args, model))
    effects = knob_effects(est)
    if args.json:
        doc = est.to_dict()
        doc["binds"] = [b.__dict__ for b in bindings(est)]
        doc["knobs"] = [
            {"change": e.label, "decode_step_s": e.estimate.decode_step_s, "throughput_tok_s": e.estimate.throughput_tok_s,
             "gpu_peak_bytes": e.estimate.gpu_peak_bytes, "feasible": e.estimate.feasible,
             "decode_ratio": e.decode_ratio, "throughput_ratio": e.throughput_ratio}
            for e in effects
        ]
        doc["fixes"] = [e.label for e in fixes(effects)] if not est.feasible else []
        _emit_json(doc)
        return 0
    console = _console()
    print_estimate(console, est)
    print_placement(console, est)
    print_bindings(console, bindings(est), est)
    console.print(knob_table(effects))
    if not est.feasible:
        ok = fixes(effects)
        if ok:
            console.print("[bold]one-knob fixes[/bold]: " + "; ".join(
                f"{e.label} -> decode {e.estimate.decode_step_s * 1e3:,.1f} ms" for e in ok))
        else:
            console.print("[bold]no single knob makes this plan fit[/bold]: try `hpi plan` for the whole space")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from hpi.planner.report import plans_table
    from hpi.planner.search import DEFAULT_BATCHES, SearchSpace, search

    model, hardware, workload = _load_target(args)
    batches = tuple(sorted({b for b in DEFAULT_BATCHES if b <= args.max_batch} | {args.batch}))
    space = SearchSpace(batch_sizes=batches).restrict(
        offloads=args.offload, weight_bits=args.quant_bits, tp=args.tp, pp=args.pp, dp=args.dp,
        kv_offload=args.kv_offload, pin_memory=args.pin_memory,
    )
    started = time.perf_counter()
    result = search(model, hardware, workload, space)
    ranked = result.ranked(args.objective, batch_size=args.batch)[: args.top]
    elapsed = time.perf_counter() - started
    estimates = [result.estimate(i) for i in ranked]
    closest = [] if len(estimates) else [result.estimate(i) for i in result.closest_infeasible(min(args.top, 5))]
    pareto = [result.estimate(i) for i in result.pareto_front()] if (args.pareto or args.json) else []
    if args.json:
        _emit_json({
            "model": model.name,
            "hardware": hardware.name,
            "objective": args.objective,
            "workload": {"batch_size": args.batch, "prompt_len_tokens": workload.prompt_len_tokens,
                         "gen_len_tokens": workload.gen_len_tokens},
            "n_plans_evaluated": result.n_plans,
            "n_feasible": result.n_feasible,
            "infeasible_counts": result.infeasible_counts,
            "search_s": elapsed,
            "plans": [{**e.plan.to_dict(), **e.to_dict()} for e in estimates],
            "closest_infeasible": [{**e.plan.to_dict(), **e.to_dict()} for e in closest],
            "pareto": [{"label": e.plan.label, "plan": e.plan.to_dict(), "decode_step_s": e.decode_step_s,
                        "throughput_tok_s": e.throughput_tok_s} for e in pareto],
        })
        return 0
    console = _console()
    what = {"latency": f"lowest decode step at batch {args.batch}", "throughput": "highest throughput at each plan's best batch",
            "balanced": "best geometric mean of normalised latency and throughput"}[args.objective]
    console.print(f"[bold]{model.name}[/bold] ({model.params_total / 1e9:,.1f}B params, {model.params_active / 1e9:,.1f}B active) on "
                  f"[bold]{hardware.name}[/bold] ({hardware.n_gpus}x {hardware.gpu.name}); prompt {workload.prompt_len_tokens}, "
                  f"gen {workload.gen_len_tokens}; objective: {what}")
    if estimates:
        console.print(plans_table(estimates, f"top {len(estimates)} plans"))
    else:
        console.print("[red]no feasible plan[/red]; the closest ones and why they fail:")
        for e in closest:
            console.print(f"  {e.plan.label}: " + "; ".join(r.message for r in e.reasons))
    reasons = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in sorted(result.infeasible_counts.items(), key=lambda kv: -kv[1]))
    console.print(f"evaluated {result.n_plans:,} plans in {elapsed:.2f} s: {result.n_feasible:,} feasible"
                  + (f"; limits broken: {reasons}" if reasons else ""))
    if args.pareto:
        console.print(plans_table(pareto, "latency/throughput Pareto front"))
    if estimates:
        console.print(f"why #1 wins and what would change it: hpi explain --model {args.model} --hardware {args.hardware} "
                      + _plan_flags(estimates[0].plan))
    return 0


def _plan_flags(plan: Plan) -> str:
    flags = [f"--offload {plan.offload}", f"--tp {plan.tp}", f"--pp {plan.pp}", f"--dp {plan.dp}",
             f"--quant-bits {plan.weight_bits}", f"--batch {plan.batch_size}",
             "--pin-memory" if plan.pin_memory else "--no-pin-memory"]
    if plan.kv_offload:
        flags.append("--kv-offload")
    if plan.pp > 1:
        flags.append(f"--micro-batches {plan.micro_batches}")
    if plan.prefetch_bucket_elems != DEEPSPEED_DEFAULT_PREFETCH_ELEMS:
        flags.append(f"--prefetch-bucket {plan.prefetch_bucket_elems}")
    return " ".join(flags)


EXIT_RUN_FAILED = 1
_RUN_FIGURES = (("ttft_s", "time to first token", "s"), ("decode_step_s", "decode step", "s"),
                ("total_s", "total", "s"), ("throughput_tok_s", "throughput", "tok/s"))


def _read_prompts(args: argparse.Namespace) -> tuple[str, ...]:
    if args.prompt is not None:
        if not args.prompt.strip():
            raise UsageError("hpi run: --prompt is empty")
        return (args.prompt,)
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts = tuple(line.rstrip("\r\n") for line in f if line.strip())
        except OSError as e:
            raise UsageError(f"cannot read prompts {args.prompts_file}: {e.strerror}") from None
        if not prompts:
            raise UsageError(f"{args.prompts_file}: no prompts (one per line)")
        return prompts
    return ()


def _predict_for_run(args: argparse.Namespace, model, workload: Workload, plan: Plan):
    """The prediction ``hpi run`` checks before launching: refuses an infeasible plan unless --force."""
    from hpi.planner.predict import PlanError, predict
    from hpi.planner.profiles import load_profile

    hardware = load_profile(args.hardware)
    try:
        est = predict(model, hardware, workload, plan)
    except PlanError as e:
        if not args.force:
            raise UsageError(f"hpi run: plan {plan.label} cannot be placed on {hardware.name}: {e} "
                             "(--force runs it anyway)") from None
        sys.stderr.write(f"hpi run: warning: no prediction ({e}); running anyway (--force)\n")
        return None
    if not est.feasible:
        reasons = "; ".join(r.message for r in est.reasons)
        if not args.force:
            raise UsageError(f"hpi run: plan {plan.label} is infeasible on {hardware.name}: {reasons} "
                             "(pass --force to run it anyway)")
        sys.stderr.write(f"hpi run: warning: running an infeasible plan (--force): {reasons}\n")
    return est


def _node_gpus(args: argparse.Namespace, est) -> tuple[int | None, list[int] | None]:
    """(ranks on this node, CUDA_VISIBLE_DEVICES in local-rank order) from the placement, for CUDA runs."""
    if est is None or args.device != "cuda":
        return None, None
    from hpi.executor.render import node_ranks

    nodes = list(node_ranks(est.placement).values())
    if len(nodes) != args.nnodes:
        raise UsageError(
            f"hpi run: the plan's {est.placement.world_size} ranks span {len(nodes)} node(s) of {est.hardware.name}: "
            f"start one hpi run per node with --nnodes {len(nodes)} --node-rank K --master-addr HOST --master-port P")
    members = nodes[args.node_rank]
    gpus = [gpu for _, gpu in members]
    return len(members), (gpus if gpus != list(range(len(gpus))) else None)


def _prediction_summary(est) -> dict[str, Any]:
    return {"hardware": est.hardware.name, "feasible": est.feasible, "reasons": [r.message for r in est.reasons],
            "prefill_s": est.prefill_s, "ttft_s": est.ttft_s, "decode_step_s": est.decode_step_s,
            "total_s": est.total_s, "throughput_tok_s": est.throughput_tok_s, "gpu_peak_bytes": est.gpu_peak_bytes,
            "rank_gpus": list(est.placement.rank_gpus)}


def _figure(doc: Any, key: str) -> float | None:
    """A RunRecord figure: a number, or the median of a distribution (``{"median": ...}``)."""
    v = doc.get(key) if isinstance(doc, dict) else None
    if isinstance(v, dict):
        v = v.get("median")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _is_record_line(line: str) -> bool:
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hpi.planner.catalog import load_model

    model = load_model(args.model)
    plan = _plan_from_args(args, model)
    graphs = _run_graphs(args, model, plan)
    workload = replace(_workload(args), decode_graphs=graphs)  # the prediction prices the decode mode that runs
    est = _predict_for_run(args, model, workload, plan) if args.hardware else None
    prompts = _read_prompts(args)
    if args.chat and not prompts:
        raise UsageError("hpi run: --chat needs a prompt: pass --prompt TEXT or --prompts FILE")
    if args.checkpoint and not Path(args.checkpoint).is_dir():
        raise UsageError(f"hpi run: --checkpoint {args.checkpoint}: no such directory")
    if prompts and not args.checkpoint:
        raise UsageError("hpi run: text prompts need a tokenizer: pass --checkpoint DIR (a local HF checkpoint "
                         "with tokenizer files), or leave out --prompt for seeded random prompts")
    from hpi.planner.feasibility import plan_problems

    problems = plan_problems(model, None, plan) if args.hardware is None else []  # with one, predict checked
    if problems:
        raise UsageError(f"hpi run: {problems[0]}")
    if args.node_rank >= args.nnodes:
        raise UsageError(f"hpi run: --node-rank {args.node_rank} must be < --nnodes {args.nnodes}")
    nproc, visible = _node_gpus(args, est)

    # the executor only now: the planner's commands never import it
    from hpi.executor.launch import LaunchError, launch
    from hpi.executor.render import ds_config
    from hpi.executor.spec import RunSpec, write_json_atomic

    config = ds_config(plan, dtype=args.dtype, hidden_size=model.hidden_size, nvme_path=args.nvme_path)
    extra: dict[str, Any] = {"argv": sys.argv[1:]}
    if est is not None:
        extra["predicted"] = _prediction_summary(est)
    spec = RunSpec(plan=plan, model=args.model, workload=workload, hardware=args.hardware, device=args.device,
                   dtype=args.dtype, fetch_wait=args.fetch_wait, decode_graphs=graphs, checkpoint=args.checkpoint, prompts=prompts, seed=args.seed,
                   mode="chat" if args.chat else "benchmark", temperature=args.temperature, top_p=args.top_p,
                   nvme_path=args.nvme_path, out_dir=args.out, extra=extra)
    write_json_atomic(Path(args.out) / "ds_config.json", config)

    sink = sys.stdout if args.chat else sys.stderr

    def stream(line: str) -> None:  # rank 0's stdout as it comes; the record is printed once, below
        if not _is_record_line(line):
            sink.write(line + "\n")
            sink.flush()

    sys.stderr.write(f"hpi run: {plan.label} on {plan.world_size} rank(s), {args.device} {args.dtype}; "
                     f"run folder {args.out}\n")
    try:
        record = launch(spec, nnodes=args.nnodes, node_rank=args.node_rank, master_addr=args.master_addr,
                        master_port=args.master_port, timeout_s=args.timeout, stream=stream, nproc_per_node=nproc,
                        visible_gpus=visible)
    except LaunchError as e:
        sys.stderr.write(f"hpi run: {'' if e.reason == 'interrupted' else 'failed: '}{e}\n")
        return 130 if e.reason == "interrupted" else EXIT_RUN_FAILED
    if args.json:
        _emit_json(record)
        return 0
    if args.node_rank != 0:
        print(f"node {args.node_rank}: all {record.get('local_world_size')} local rank(s) finished; "
              f"rank 0's record is on node 0; logs: {record.get('log_dir')}")
        return 0
    print(f"run finished: {plan.label}; record: {Path(args.out) / 'record.json'}")
    for key, name, unit in _RUN_FIGURES:
        measured = _figure(record, key)
        if measured is None:
            continue
        predicted = getattr(est, key, None) if est is not None else _figure(record.get("predicted"), key)
        line = f"  {name}: {measured:,.4g} {unit}"
        if predicted:
            line += f" (predicted {predicted:,.4g} {unit}, measured/predicted {measured / predicted:.2f})"
        print(line)
    h2d = record.get("h2d") if isinstance(record.get("h2d"), dict) else {}
    achieved, ceiling = _figure(h2d, "achieved_bytes_s"), _figure(h2d, "profile_pinned_bytes_s")
    if achieved:
        print(f"  host->device: {achieved / 1e9:,.2f} GB/s" + (f" of {ceiling / 1e9:,.1f} GB/s pinned ({achieved / ceiling:.0%})"
                                                             if ceiling else ""))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from hpi.planner.catalog import load_model, model_names
    from rich.table import Table

    models = [load_model(n) for n in model_names()]
    if args.json:
        _emit_json([{"name": m.name, "family": m.family, "params_total": m.params_total, "params_active": m.params_active,
                     "n_layers": m.n_layers, "hidden_size": m.hidden_size, "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads,
                     "n_experts": m.n_experts, "source": m.source} for m in models])
        return 0
    table = Table(title="model catalogue (hpi plan --model NAME, or a path to a HF config.json)", title_justify="left")
    for col in ("name", "family", "params", "active", "layers", "hidden", "heads/kv", "experts"):
        table.add_column(col, justify="left" if col in ("name", "family") else "right")
    for m in models:
        experts = f"{m.n_experts_active}/{m.n_experts}" + (f"+{m.n_shared_experts}" if m.n_shared_experts else "") if m.is_moe else "-"
        table.add_row(m.name, m.family, f"{m.params_total / 1e9:,.2f}B", f"{m.params_active / 1e9:,.2f}B",
                      str(m.n_layers), str(m.hidden_size), f"{m.n_heads}/{m.n_kv_heads}", experts)
    _console().print(table)
    return 0


def cmd_hardware(args: argparse.Namespace) -> int:
    from hpi.planner.profiles import load_profile, profile_names
    from rich.table import Table

    profiles = [load_profile(n) for n in profile_names()]
    if args.json:
        _emit_json([{"name": p.name, "description": p.description, "os": p.os, "n_nodes": p.n_nodes,
                     "gpus_per_node": p.gpus_per_node, "gpu": p.gpu.name, "gpu_memory_bytes": p.gpu.memory_bytes,
                     "dram_bytes": p.host.dram_bytes, "has_nvme": p.has_nvme} for p in profiles])
        return 0
    table = Table(title="hardware profiles (hpi plan --hardware NAME, or a path to a profile YAML)", title_justify="left")
    for col in ("name", "GPUs", "GPU memory", "DRAM/node", "NVMe read", "OS", "description"):
        table.add_column(col)
    for p in profiles:
        gpus = f"{p.n_nodes}x{p.gpus_per_node} {p.gpu.name}" if p.n_nodes > 1 else f"{p.gpus_per_node}x {p.gpu.name}"
        nvme = f"{p.nvme.read_bytes_s / 1e9:.1f} GB/s" if p.has_nvme else "-"
        table.add_row(p.name, gpus, f"{p.gpu.memory_bytes / 1e9:.0f} GB", f"{p.host.dram_bytes / 1e9:,.0f} GB", nvme, p.os,
                      p.description)
    _console().print(table)
    return 0


COMMANDS = {"plan": cmd_plan, "predict": cmd_predict, "explain": cmd_explain, "run": cmd_run, "models": cmd_models,
            "hardware": cmd_hardware}


def main(argv: Sequence[str] | None = None) -> int:
    from hpi.planner.catalog import ModelConfigError
    from hpi.planner.profiles import ProfileError

    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except (UsageError, ModelConfigError, ProfileError, ValueError) as e:
        message = str(e)
        sys.stderr.write(message if message.startswith("hpi") else f"hpi: error: {message}")
        sys.stderr.write("\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("hpi: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
