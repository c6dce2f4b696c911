"""``hpi autotune``: find the fastest real configuration in a handful of runs (or simulated ones).

Registered in ``hpi.cli.app.COMMAND_MODULES``. Importing this module is cheap: optuna,
matplotlib and the executor are imported when the command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from hpi.cli.args import (
    add_cuda_graph_flags,
    add_kernel_flags,
    add_plan_flags,
    add_target,
    count,
    non_negative,
    positive,
    search_restrictions,
    seconds,
)
from hpi.cli.errors import UsageError
from hpi.cli.output import json_default
from hpi.processes import exit_code, signal_of


def register(sub) -> dict[str, Any]:
    p = sub.add_parser("autotune",
                       help="tune a plan with real (or simulated) runs: an Optuna study steered by the planner",
                       description="Optuna study over the planner's top feasible plans and the ZeRO-3 runtime knobs, "
                                   "seeded with the planner's best predictions; every run recalibrates the planner.")
    add_target(p)
    add_plan_flags(p, for_search=True)
    p.add_argument("--objective", choices=("throughput", "latency"), default="throughput",
                   help="throughput: highest tok/s at the best batch; latency: lowest decode step at --batch")
    p.add_argument("--trials", type=count, default=12,
                   help="trials in the study, resumed ones included (default 12)")
    p.add_argument("--timeout", type=non_negative, default=None, metavar="S",
                   help="time budget in seconds for the whole command: no trial starts that would not fit, the "
                        "baseline included")
    p.add_argument("--trial-timeout", type=seconds, default=None, metavar="S",
                   help="stop a single run after S seconds")
    p.add_argument("--study", default=None, metavar="NAME", help="study name (default MODEL_HARDWARE_OBJECTIVE[_sim])")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="SQLAlchemy URL (default sqlite:///studies/NAME/study.db); share one to tune from several "
                        "machines")
    p.add_argument("--studies-dir", default="studies", metavar="DIR",
                   help="where studies keep runs and reports (default studies)")
    p.add_argument("--simulate", action="store_true",
                   help="answer trials from a hidden simulated machine (no GPU): CI and search-efficiency measurements")
    p.add_argument("--seed", type=count, default=0, help="sampler seed (and the hidden machine's with --simulate)")
    p.add_argument("--seeds", type=count, default=3, help="planner predictions enqueued first (default 3)")
    p.add_argument("--top-configs", type=positive, default=6,
                   help="discrete plans (offload, tp, pp, dp, bits) offered to the study: the planner's best "
                        "(default 6)")
    p.add_argument("--max-batch", type=positive, default=256, help="largest batch searched (default 256)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: DeepSpeed's CPU accelerator (tests)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default bf16 on cuda, fp32 on cpu")
    add_cuda_graph_flags(p, default=True, on_help="decode through CUDA graphs in every trial whose plan allows it "
                          "(dense, GPU-resident, 16-bit, dp 1, KV cache on the GPU), priced so by the planner "
                          "(default)",
                          off_help="decode every trial eagerly, and price it so")
    add_kernel_flags(p)
    p.add_argument("--warmup-steps", type=count, default=1, help="untimed generate calls before each measured one")
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="local HF checkpoint (default: random weights)")
    p.add_argument("--nvme-path", default=None, metavar="DIR", help="folder on the NVMe drive (NVMe trials need it)")
    p.add_argument("--baseline", choices=("ds-examples", "ds-examples-knobs"), default=None,
                   help="also measure DeepSpeedExamples' ZeRO-Inference recipe (ds-examples: its own script, CUDA; "
                        "ds-examples-knobs: its knobs through hpi's executor) and report the ratio")
    p.add_argument("--baseline-batch", type=positive, default=None,
                   help="batch of the baseline run (default: the best plan's batch; 1 is run_model.py's default)")
    p.add_argument("--sim-spread", type=non_negative, default=1.0,
                   help="--simulate: how far the hidden machine strays (default 1)")
    p.add_argument("--sim-noise", type=non_negative, default=0.02, help="--simulate: measurement noise (default 0.02)")
    p.add_argument("--no-report", dest="report", action="store_false", help="skip the Markdown report and plots")
    return {"autotune": cmd_autotune}


def _settings(args: argparse.Namespace):
    from hpi.autotune.tuner import TuneSettings
    from hpi.planner.specs.workload import Workload

    restrict = search_restrictions(args)
    return TuneSettings(
        model=args.model, hardware=args.hardware,
        workload=Workload(args.prompt_len, args.gen_len, decode_graphs=args.decode_graphs,
                          decode_compile=args.decode_graphs and args.decode_compile is not False,
                          fused_dequant=args.fused_dequant is not False,
                          skinny_gemm=args.decode_graphs and args.skinny_gemm is not False),
        objective=args.objective, n_trials=args.trials, timeout_s=args.timeout, study=args.study,
        storage=args.storage, studies_dir=args.studies_dir, simulate=args.simulate, seed=args.seed,
        n_seeds=args.seeds, top_configs=args.top_configs, batch=args.batch or 1, max_batch=args.max_batch,
        restrict=tuple((k, v) for k, v in restrict.items() if v is not None), device=args.device, dtype=args.dtype,
        warmup_steps=args.warmup_steps, nvme_path=args.nvme_path, checkpoint=args.checkpoint,
        trial_timeout_s=args.trial_timeout, baseline=args.baseline, baseline_batch=args.baseline_batch,
        sim_spread=args.sim_spread, sim_noise=args.sim_noise, report=args.report,
    )


class _Progress:
    """A progress bar on stderr and one line per trial above it."""

    def __init__(self, objective: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.unit = "tok/s" if objective == "throughput" else "s/step"
        self.maximize = objective == "throughput"
        self.best: float | None = None
        self.progress = Progress(TextColumn("[bold]autotune[/bold] {task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True, width=140))
        self.task = None

    def __enter__(self) -> "_Progress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def _fmt(self, v: float | None) -> str:
        return "-" if v is None else f"{v:,.4g} {self.unit}"

    def __call__(self, kind: str, doc: dict[str, Any]) -> None:
        def say(text: str) -> None:  # plan labels and sources hold brackets: no rich markup
            self.progress.console.print(text, markup=False)

        if kind == "start":
            self.task = self.progress.add_task("", total=doc["n_trials"], completed=min(doc["done"], doc["n_trials"]))
            say(f"study {doc['study']} ({doc['storage']}): {len(doc['configs'])} discrete plans "
                f"[{', '.join(doc['configs'])}], {doc['grid_size']:,} lattice points; "
                f"{doc['done']} trial(s) done, {doc['seeded']} seeded" +
                (f", re-queued interrupted trial(s) {doc['requeued']}" if doc["requeued"] else ""))
        elif kind == "trial":
            value = doc.get("value") if doc["status"] == "ok" else None
            if value is not None and (self.best is None or (value > self.best if self.maximize else value < self.best)):
                self.best = value
            what = {"ok": self._fmt(value), "oom": f"out of memory ({(doc.get('oom') or {}).get('message', '')[:80]})",
                    "predicted_overflow": "not launched: predicted to overflow " + ", ".join(doc.get("broken", {})),
                    "crash": f"crashed: {doc.get('error', '')[:100]}",
                    "timeout": f"timed out: {doc.get('error', '')[:80]}"}
            pred = doc.get("predicted", {}).get("value")
            say(f"trial {doc['trial']:3d} [{doc['source']}] {doc['label']}: {what.get(doc['status'], doc['status'])}"
                + (f" (predicted {self._fmt(pred)})" if doc["status"] == "ok" and pred else "")
                + (f" [reused trial {doc['reused_from']}]" if doc.get("reused_from") is not None else ""))
            if self.task is not None:
                self.progress.update(self.task, advance=1, description=f"best {self._fmt(self.best)}")
        elif kind == "baseline_start":
            say(f"baseline {doc['kind']} at batch {doc['batch']} ...")
        elif kind == "baseline":
            m = doc.get("measured") or {}
            say(f"baseline {doc['kind']} at batch {doc['batch']}: " + (
                f"{m.get('throughput_tok_s', 0):,.4g} tok/s, decode step {m.get('decode_step_s', 0):.4g} s"
                if doc["status"] == "ok" else f"{doc['status']}: {doc.get('error', '')[:160]}"))
        elif kind == "stop":
            say(f"stopping: {doc['why']}")


def _print_summary(doc: dict[str, Any]) -> None:
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(doc["statuses"].items()))
    print(f"study {doc['study']}: {doc['trials']} trial(s), {doc['runs']} run(s) launched ({statuses})")
    best = doc.get("best")
    if best is None:
        print("no trial produced a measurement: see the trial lines above and the records under the study's runs/")
    else:
        nominal = best.get("predicted_nominal") or {}
        print(f"best: {best['label']} (trial {best['trial']}, {best['source']}): "
              f"{best['throughput_tok_s']:,.4g} tok/s, decode step {best['decode_step_s']:.4g} s"
              + (f" (uncalibrated prediction {nominal['throughput_tok_s']:,.4g} tok/s)"
                 if nominal.get("throughput_tok_s") else ""))
    base = doc.get("baseline")
    if base:
        if base.get("status") == "ok":
            m = base["measured"]
            print(f"baseline {base['kind']} at batch {base['batch']}: {m['throughput_tok_s']:,.4g} tok/s, decode step "
                  f"{m['decode_step_s']:.4g} s -> best / baseline = "
                  f"{doc.get('ratio_over_baseline', float('nan')):.2f}x")
        else:
            print(f"baseline {base['kind']}: {base['status']} {base.get('error', base.get('why', ''))[:200]}")
    sim = doc.get("simulation")
    if sim:
        within = sim["trials_to_within_3pct"]
        print(f"simulation: true optimum {sim['value']:,.4g} ({sim['true_optimum_plan']}); best is "
              f"{(sim['final_gap'] or 0) * 100:.1f}% off; within 3% at trial {within if within else 'never'}; trial 1 "
              f"was {(sim['trial1_gap'] or 0) * 100:.1f}% off; a {sim['grid_size']:,}-point grid needs "
              + (f"{sim['expected_grid_trials']:,.0f} trials on average" if sim["expected_grid_trials"]
                 else "more than it has"))
    for what, path in (doc.get("files") or {}).items():
        print(f"{what.replace('_', ' ')}: {path}")
    if doc.get("launch_command"):
        print(f"run it: {doc['launch_command']}")


def check_inputs(args: argparse.Namespace) -> None:
    """Everything autotune reads, writes and runs on, checked before a study is created or a trial starts."""
    from hpi.cli.args import workload_from_args
    from hpi.cli.checks import executor_ready, existing_dir, folder_name, storage_url, writable_dir
    from hpi.cli.errors import require
    from hpi.planner.catalog import load_model
    from hpi.planner.profiles import load_profile

    who = "hpi autotune"
    require(("optuna", "matplotlib") if args.report else ("optuna",), who)
    if args.study is not None:
        folder_name(args.study, "--study", who)
    writable_dir(args.studies_dir, "--studies-dir", who)
    if args.storage not in (None, "memory"):
        storage_url(args.storage, "--storage", who)
    for flag, path in (("--checkpoint", args.checkpoint), ("--nvme-path", args.nvme_path)):
        if path is not None:
            existing_dir(path, flag, who)
    model = load_model(args.checkpoint or args.model)  # as the tuner reads it
    load_profile(args.hardware)
    workload = workload_from_args(args)
    if workload.context_len_tokens > model.max_position_embeddings:
        raise UsageError(f"{who}: prompt {workload.prompt_len_tokens} + gen {workload.gen_len_tokens} = "
                         f"{workload.context_len_tokens} tokens > {model.name}'s {model.max_position_embeddings} "
                         "positions (max_position_embeddings): shorten --prompt-len or --gen-len")
    if not args.simulate:
        if args.offload == "nvme" and not args.nvme_path:  # the tuner's rule too; said before the GPU question
            raise UsageError("--offload nvme needs --nvme-path DIR (a folder on the NVMe drive) for real trials")
        executor_ready(args.device, who)  # last: it imports torch to ask for a GPU


def cmd_autotune(args: argparse.Namespace) -> int:
    cfg = _settings(args)  # TuneSettings checks its own fields
    check_inputs(args)
    from hpi.autotune.tuner import tune

    bar = not args.json or sys.stderr.isatty()  # --json into a pipe: plain lines on stderr, no redraws
    try:
        with _Progress(cfg.objective) if bar else contextlib.nullcontext(_quiet) as on_event:
            doc = tune(cfg, on_event=on_event)
    except KeyboardInterrupt as e:  # SIGINT or SIGTERM (hpi.processes.Interrupted): 130 or 143, as the shell says
        sys.stderr.write(f"hpi autotune: interrupted ({signal_of(e).name}); run the same command again to resume the "
                         "study (a trial cut short is run again, none is lost)\n")
        return exit_code(e)
    if args.json:
        sys.stdout.write(json.dumps(doc, default=json_default) + "\n")
    else:
        _print_summary(doc)
    return 0


def _quiet(kind: str, doc: dict[str, Any]) -> None:
    """--json without a terminal: one plain line per trial on stderr, stdout keeps the JSON only."""
    if kind == "trial":
        value = doc.get("value") if doc["status"] == "ok" else None
        sys.stderr.write(f"trial {doc['trial']} [{doc['source']}] {doc['label']}: {doc['status']}"
                         + (f" {value:.6g}" if value is not None else "") + "\n")
