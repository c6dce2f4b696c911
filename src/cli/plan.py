"""``hpi plan``, ``hpi predict`` and ``hpi explain``: the planner's commands (pure: no torch, no executor)."""

from __future__ import annotations

import argparse
import time

from hpi.cli import output
from hpi.cli.args import (
    add_plan_flags,
    add_run_conditions,
    add_target,
    load_target,
    plan_flags,
    plan_from_args,
    positive,
    search_restrictions,
)


def register(sub) -> dict:
    p = sub.add_parser("plan", help="rank the plans that can run a model on a machine")
    add_target(p)
    add_run_conditions(p)
    add_plan_flags(p, for_search=True)
    p.add_argument("--objective", choices=("latency", "throughput", "balanced"), default="latency")
    p.add_argument("--top", type=positive, default=10, help="plans to show (default 10)")
    p.add_argument("--max-batch", type=positive, default=256, help="largest batch searched (default 256)")
    p.add_argument("--pareto", action="store_true", help="also show the latency/throughput Pareto front")
    for name, text in (("predict", "predict one plan's memory and time"),
                       ("explain", "what binds a plan, what each knob would change, how to fix it")):
        p = sub.add_parser(name, help=text)
        add_target(p)
        add_run_conditions(p)
        add_plan_flags(p, for_search=False)
    return {"plan": cmd_plan, "predict": cmd_predict, "explain": cmd_explain}


def cmd_predict(args: argparse.Namespace) -> int:
    from hpi.planner.predict import predict
    from hpi.planner.report import print_estimate, print_placement

    model, hardware, workload = load_target(args)
    est = predict(model, hardware, workload, plan_from_args(args, model))
    if args.json:
        output.emit_json(est.to_dict())
    else:
        console = output.console()
        print_estimate(console, est)
        print_placement(console, est)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from hpi.planner.explain import bindings, fixes, knob_effects
    from hpi.planner.predict import predict
    from hpi.planner.report import knob_table, print_bindings, print_estimate, print_placement

    model, hardware, workload = load_target(args)
    est = predict(model, hardware, workload, plan_from_args(args, model))
    effects = knob_effects(est)
    if args.json:
        doc = est.to_dict()
        doc["binds"] = [b.__dict__ for b in bindings(est)]
        doc["knobs"] = [
            {"change": e.label, "decode_step_s": e.estimate.decode_step_s,
             "throughput_tok_s": e.estimate.throughput_tok_s, "gpu_peak_bytes": e.estimate.gpu_peak_bytes,
             "feasible": e.estimate.feasible, "decode_ratio": e.decode_ratio, "throughput_ratio": e.throughput_ratio}
            for e in effects
        ]
        doc["fixes"] = [e.label for e in fixes(effects)] if not est.feasible else []
        output.emit_json(doc)
        return 0
    console = output.console()
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

    model, hardware, workload = load_target(args)
    batches = tuple(sorted({b for b in DEFAULT_BATCHES if b <= args.max_batch} | {args.batch}))
    space = SearchSpace(batch_sizes=batches).restrict(**search_restrictions(args))
    started = time.perf_counter()
    result = search(model, hardware, workload, space)
    ranked = result.ranked(args.objective, batch_size=args.batch)[: args.top]
    elapsed = time.perf_counter() - started
    estimates = [result.estimate(i) for i in ranked]
    closest = [] if len(estimates) else [result.estimate(i) for i in result.closest_infeasible(min(args.top, 5))]
    pareto = [result.estimate(i) for i in result.pareto_front()] if (args.pareto or args.json) else []
    if args.json:
        output.emit_json({
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
    console = output.console()
    what = {"latency": f"lowest decode step at batch {args.batch}",
            "throughput": "highest throughput at each plan's best batch",
            "balanced": "best geometric mean of normalised latency and throughput"}[args.objective]
    console.print(f"[bold]{model.name}[/bold] ({model.params_total / 1e9:,.1f}B params, "
                  f"{model.params_active / 1e9:,.1f}B active) on [bold]{hardware.name}[/bold] "
                  f"({hardware.n_gpus}x {hardware.gpu.name}); prompt {workload.prompt_len_tokens}, "
                  f"gen {workload.gen_len_tokens}; objective: {what}")
    if estimates:
        console.print(plans_table(estimates, f"top {len(estimates)} plans"))
    else:
        console.print("[red]no feasible plan[/red]; the closest ones and why they fail:")
        for e in closest:
            console.print(f"  {e.plan.label}: " + "; ".join(r.message for r in e.reasons))
    reasons = ", ".join(f"{k.replace('_', ' ')} {v:,}"
                        for k, v in sorted(result.infeasible_counts.items(), key=lambda kv: -kv[1]))
    console.print(f"evaluated {result.n_plans:,} plans in {elapsed:.2f} s: {result.n_feasible:,} feasible"
                  + (f"; limits broken: {reasons}" if reasons else ""))
    if args.pareto:
        console.print(plans_table(pareto, "latency/throughput Pareto front"))
    if estimates:
        output.say_command(console, f"why #1 wins and what would change it: hpi explain --model {args.model} "
                           f"--hardware {args.hardware} " + plan_flags(estimates[0].plan))
    return 0
