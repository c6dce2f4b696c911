"""``hpi run``: deploy one plan for real (DeepSpeed ZeRO-3 x TP x PP) and report what it measured beside
what the planner predicted.

Parse, resolve (``hpi.deployment.resolve_deployment``: every check before anything is written), claim the run
folder (``hpi.executor.rundir``), start (``hpi.executor.launch.start``), print. Exit status: 0 done, 1 the run
failed (a rank died, hung or timed out), 2 a usage error (a busy run folder too), 130 Ctrl-C, 143 SIGTERM (the
ranks are stopped either way). Importing this module imports neither torch nor the executor's
launcher: they are imported when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hpi.cli.args import (
    UsageError,
    add_plan_flags,
    add_preset_flag,
    add_run_conditions,
    add_target,
    count,
    non_negative,
    pin_memory_given,
    plan_from_args,
    port,
    positive,
    preset_plan,
    probability,
    seconds,
    workload_from_args,
)
from hpi.cli.output import emit_json
from hpi.records import RunRecord

EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130
_RUN_FIGURES = (("ttft_s", "time to first token", "s"), ("decode_step_s", "decode step", "s"),
                ("total_s", "total", "s"), ("throughput_tok_s", "throughput", "tok/s"))


def register(sub) -> dict:
    p = sub.add_parser("run", help="run one plan for real (DeepSpeed ZeRO-3 x TP x PP) and report what it measured")
    add_target(p, hardware_required=False)
    add_run_conditions(p)
    add_plan_flags(p, for_search=False)
    add_preset_flag(p)
    p.add_argument("--concurrency", type=positive, default=1,
                   help="with --preset: sequences at once, the largest batch the preset may use (default 1)")
    add_run_options(p)
    return {"run": cmd_run}


def add_run_options(p: argparse.ArgumentParser) -> None:
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", default=None, metavar="TEXT", help="one text prompt (default: random token ids)")
    prompts.add_argument("--prompts", dest="prompts_file", default=None, metavar="FILE",
                         help="text prompts, one per line (empty lines skipped)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: DeepSpeed's CPU accelerator with gloo, for tests (default cuda)")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="local HF checkpoint (safetensors + tokenizer); default: random weights")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="run folder: spec.json, ds_config.json, record.json, logs/ (default: a fresh "
                        "runs/<UTC time>-<plan>/, runs/latest pointing at it); one run at a time per folder")
    p.add_argument("--force", action="store_true", help="run a plan the prediction says cannot fit")
    p.add_argument("--nvme-path", default=None, metavar="DIR", help="folder on the NVMe drive (--offload nvme)")
    p.add_argument("--seed", type=count, default=0)
    p.add_argument("--temperature", type=non_negative, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling: 0 < P <= 1 (default 1)")
    p.add_argument("--chat", action="store_true", help="stop at EOS and stream the tokens as they come")
    p.add_argument("--warmup-steps", type=count, default=None, metavar="N",
                   help="untimed generations of 2 tokens before the measured one, at its shapes (default: 1 where "
                        "decode is graphed on a GPU, whose first step of a shape captures and compiles it, recorded "
                        "as compile_s; else 0)")
    p.add_argument("--timeout", type=seconds, default=None, metavar="S", help="stop the run after S seconds")
    p.add_argument("--hang-timeout", type=non_negative, default=None, metavar="S",
                   help="stop the run when a rank makes no progress for S seconds, naming it (default: max(300, 20 x "
                        "predicted step + prefill), 1800 without --hardware; 0: off)")
    p.add_argument("--nnodes", type=positive, default=1, help="nodes taking part (one hpi run per node)")
    p.add_argument("--node-rank", type=count, default=0, help="this node's rank (0 runs rank 0)")
    p.add_argument("--master-addr", default="127.0.0.1", help="node 0's address (rendezvous)")
    p.add_argument("--master-port", type=port, default=None, help="rendezvous port (default: a free one, 1 node)")


def read_prompts(args: argparse.Namespace) -> tuple[str, ...]:
    """--prompt TEXT or --prompts FILE (one per line); none: seeded random token ids."""
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


def resolve(args: argparse.Namespace):
    """The deployment ``hpi run`` asks for, checked: a ``hpi.deployment.Deployment``."""
    from hpi.cli.checks import executor_ready, existing_dir, writable_dir
    from hpi.deployment import Nodes, resolve_deployment, this_host
    from hpi.executor.spec import RunSpec
    from hpi.planner.catalog import load_model

    if args.out is not None:
        writable_dir(args.out, "--out", "hpi run")
    if args.nvme_path is not None:
        existing_dir(args.nvme_path, "--nvme-path", "hpi run")
    model = load_model(args.model)
    plan = (preset_plan(args, model, "hpi run", concurrency=args.concurrency) if args.preset
            else plan_from_args(args, model))
    spec = RunSpec(plan=plan, model=args.model, workload=workload_from_args(args), hardware=args.hardware,
                   device=args.device, dtype=args.dtype, fetch_wait=args.fetch_wait, checkpoint=args.checkpoint,
                   prompts=read_prompts(args), seed=args.seed, mode="chat" if args.chat else "benchmark",
                   temperature=args.temperature, top_p=args.top_p, nvme_path=args.nvme_path, out_dir=args.out,
                   extra={"argv": sys.argv[1:]})
    nodes = Nodes(nnodes=args.nnodes, node_rank=args.node_rank, master_addr=args.master_addr,
                  master_port=args.master_port)
    if args.node_rank == 0 and args.master_port:
        _check_rendezvous_port(args.master_addr, args.master_port)
    deployment = resolve_deployment(spec, decode_graphs=args.decode_graphs, decode_compile=args.decode_compile,
                                    fused_dequant=args.fused_dequant, skinny_gemm=args.skinny_gemm,
                                    warmup_steps=args.warmup_steps, force=args.force,
                                    nodes=nodes,
                                    model=model, host=this_host(), pin_memory_explicit=pin_memory_given(args))
    executor_ready(args.device, "hpi run")  # last: it imports torch to ask for a GPU
    return deployment


def _check_rendezvous_port(host: str, port: int) -> None:
    """Node 0 listens on --master-addr:--master-port; one in use is refused here, before the run folder is made
    (the launcher binds it again for the run: a port taken in between fails there, with the same line)."""
    from hpi.executor.torchrun import ListenError, bind_listener

    try:
        bind_listener(host, port).close()
    except ListenError as e:
        raise UsageError(f"hpi run: {e}") from None


def _is_record_line(line: str) -> bool:
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def cmd_run(args: argparse.Namespace) -> int:
    from hpi.executor.rundir import claim_run_folder  # imports no torch

    deployment = claim_run_folder(resolve(args))  # locked (busy: one line, exit 2); no --out: runs/<time>-<plan>/
    spec, plan = deployment.spec, deployment.plan

    # the executor only now: the planner's commands never import it
    from hpi.executor import launch as launcher
    from hpi.executor.render import ds_config
    from hpi.executor.spec import write_json_atomic

    config = ds_config(plan, dtype=spec.dtype, hidden_size=deployment.model.hidden_size, nvme_path=spec.nvme_path,
                       stage_layers=max(spec.stage_layer_counts(deployment.model)))  # the worker's split
    for warning in deployment.warnings:
        sys.stderr.write(f"hpi run: warning: {warning}\n")
    write_json_atomic(Path(spec.out_dir) / "ds_config.json", config)

    sink = sys.stdout if spec.mode == "chat" else sys.stderr

    def stream(line: str) -> None:  # rank 0's stdout as it comes; the record is printed once, below
        if not _is_record_line(line):
            sink.write(line + "\n")
            sink.flush()

    sys.stderr.write(f"hpi run: {plan.label} on {plan.world_size} rank(s), {spec.device} {spec.dtype}; "
                     f"run folder {spec.out_dir}\n")
    try:
        result = launcher.start(deployment, timeout_s=args.timeout, stream=stream, hang_timeout_s=args.hang_timeout)
    except launcher.LaunchError as e:
        sys.stderr.write(f"hpi run: {'' if e.reason == 'interrupted' else 'failed: '}{e}\n")
        return (128 + e.signum if e.signum else EXIT_INTERRUPTED) if e.reason == "interrupted" else EXIT_RUN_FAILED
    if args.json:
        emit_json(result.to_json())
        return 0
    if isinstance(result, launcher.NodeSummary):
        print(f"node {result.node_rank}: all {result.local_world_size} local rank(s) finished; "
              f"rank 0's record is on node 0; logs: {result.log_dir}")
        return 0
    print_summary(result, deployment)
    return 0


def print_summary(record: RunRecord, deployment) -> None:
    """Each measured figure with the prediction beside it, and the achieved host->device bandwidth."""
    est = deployment.prediction if deployment.prediction is not None else record.prediction
    print(f"run finished: {deployment.plan.label}; record: {Path(deployment.spec.out_dir) / 'record.json'}")
    for key, name, unit in _RUN_FIGURES:
        measured = record.timings.figure(key)
        if measured is None:
            continue
        predicted = getattr(est, key, None)
        line = f"  {name}: {measured:,.4g} {unit}"
        if predicted:
            line += f" (predicted {predicted:,.4g} {unit}, measured/predicted {measured / predicted:.2f})"
        print(line)
    _print_warmup(record, deployment.spec)
    h2d = record.transfers.h2d
    achieved, ceiling = (h2d.achieved_bytes_s, h2d.profile_pinned_bytes_s) if h2d else (None, None)
    if achieved:
        print(f"  host->device: {achieved / 1e9:,.2f} GB/s"
              + (f" of {ceiling / 1e9:,.1f} GB/s pinned ({achieved / ceiling:.0%})" if ceiling else ""))


def _print_warmup(record: RunRecord, spec) -> None:
    """What ran before the timers (the warm-ups) and where the decode step's compile fell: in a warm-up, outside the
    figures above, or inside the measured run (its first decode step, total and throughput)."""
    compile_s = record.timings.figure("compile_s")
    if spec.warmup_steps:
        print(f"  before the timers: {spec.warmup_steps} warm-up(s) of {spec.warmup_tokens} token(s)"
              + (f", which compiled and captured the decode step: {compile_s:,.4g} s" if compile_s is not None else ""))
    elif compile_s is not None:
        print(f"  compile and capture of the decode step: {compile_s:,.4g} s, inside the timed run (its first decode "
              "step, total and throughput); a warm-up pays it instead: drop --warmup-steps 0")
