"""``hpi presets`` and ``hpi config``: presets a GUI loads, and the DeepSpeed configs of plans, presets and templates.

The choice of each preset, its reason, overrides, provenance and confirmation are the planner's
(``hpi.planner.presets``); this module adds what the executor renders (``hpi.executor.render.ds_config``, pure)
and the command lines, and writes the files (``hpi.atomic``). The JSON document is described by
``src/planner/schemas/presets.schema.json`` (kind ``hpi.Presets``, version ``hpi.planner.presets.VERSION``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hpi.cli import output
from hpi.cli.args import (
    GIVEN_PLAN_FLAGS,
    add_plan_flags,
    add_preset_flag,
    add_run_conditions,
    add_target,
    load_target,
    plan_flags,
    plan_from_args,
    positive,
    preset_plan,
)
from hpi.cli.errors import UsageError

PRESETS_FILE = "presets.json"
TEMPLATES_INDEX = "README.md"


def _definitions() -> str:
    from hpi.planner.presets import DEFINITIONS

    return "; ".join(f"{name.capitalize()}: {text}" for name, text in DEFINITIONS.items())


def register(sub) -> dict:
    p = sub.add_parser("presets", help="Latency / Balanced / Throughput presets: predicted, explained, with overrides",
                       description="Three presets for a model on a machine. " + _definitions() + ".")
    p.add_argument("--model", required=True, help="catalogue name (hpi models) or path to a HF config.json")
    p.add_argument("--hardware", required=True, help="profile name (hpi hardware) or path to a profile YAML")
    p.add_argument("--prompt-len", type=positive, default=512, help="prompt tokens (default 512)")
    p.add_argument("--gen-len", type=positive, default=32, help="generated tokens (default 32)")
    p.add_argument("--concurrency", type=positive, default=1,
                   help="requests served at once: the largest batch a preset may use (default 1)")
    add_run_conditions(p)
    _add_output_flags(p, "write presets.json and each preset's DeepSpeed config into DIR")
    p.add_argument("--serving", action="store_true",
                   help="choose among the plans hpi serve can serve (KV cache on the GPU, dp 1)")
    p.add_argument("--records", nargs="+", default=None, metavar="PATH",
                   help="kept RunRecords / autotune trials (files or folders): a preset a record ran is 'confirmed'")
    p.add_argument("--json", action="store_true", help="print one JSON document (presets.schema.json)")

    c = sub.add_parser("config", help="write the DeepSpeed config of a plan or preset, or the curated templates")
    add_target(c)
    add_run_conditions(c)
    add_plan_flags(c, for_search=False)
    add_preset_flag(c)
    c.add_argument("--concurrency", type=positive, default=1, help="with --preset: requests served at once")
    c.add_argument("--templates", action="store_true",
                   help="write every feasible tp x pp of the machine with CPU and NVMe offload, and a README index")
    _add_output_flags(c, "write deepspeed_zero3_tp{N}_pp{M}[_offload].json into DIR (default: print the config)")
    return {"presets": cmd_presets, "config": cmd_config}


def _add_output_flags(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--out", default=None, metavar="DIR", help=out_help)
    p.add_argument("--nvme-path", default=None, metavar="DIR",
                   help="the NVMe offload folder on the machine the configs are for (needed where one offloads to "
                        "NVMe; a UNC share is refused, WSL2's /mnt/c warned)")


# ---- pieces both commands use -------------------------------------------------------------------------------
def _nvme_path(args: argparse.Namespace, hardware, who: str, needed_by: list[str]) -> str | None:
    """--nvme-path as the profile's OS reads it (a warning on stderr where it is slow), or refused when a plan that
    offloads to NVMe has none."""
    from hpi.cli.checks import nvme_offload_path

    if args.nvme_path is None:
        if needed_by:
            raise UsageError(f"{who}: {', '.join(needed_by)} offload(s) to NVMe: pass --nvme-path DIR (a folder on "
                             f"{hardware.name}'s NVMe drive)")
        return None
    path, warning = nvme_offload_path(args.nvme_path, hardware.os, who)
    if warning:
        sys.stderr.write(f"{who}: warning: {warning}\n")
    return path


def _config(plan, model, args: argparse.Namespace, nvme_path: str | None) -> dict[str, Any]:
    from hpi.executor.render import ds_config
    from hpi.planner.cost.pipeline import stage_layer_sizes

    return ds_config(plan, dtype=args.dtype, hidden_size=model.hidden_size,
                     nvme_path=nvme_path if plan.offloads_to_nvme else None,
                     stage_layers=max(stage_layer_sizes(model, plan.pp)))


def config_file_name(plan) -> str:
    return f"deepspeed_zero3_tp{plan.tp}_pp{plan.pp}.json"


def commands(args: argparse.Namespace, plan, nvme_path: str | None) -> dict[str, str | None]:
    """The ``hpi run`` and ``hpi serve`` lines that deploy ``plan`` (serve names the batch --max-batch; None where
    hpi serve cannot serve the plan: ``serve_blocker``)."""
    from hpi.planner.specs.plan import serve_blocker

    target = f"--model {args.model} --hardware {args.hardware}"
    extra = []
    if (args.prompt_len, args.gen_len) != (512, 32):
        extra.append(f"--prompt-len {args.prompt_len} --gen-len {args.gen_len}")
    if args.dtype != "bf16":
        extra.append(f"--dtype {args.dtype}")
    if plan.offloads_to_nvme:
        extra.append(f"--nvme-path {nvme_path}")
    flags = plan_flags(plan)
    tail = "".join(" " + e for e in extra)
    serve = f"hpi serve {target} {flags.replace('--batch ', '--max-batch ')}{tail}"
    return {"run": f"hpi run {target} {flags}{tail}",
            "serve": None if serve_blocker(plan.kv_offload, plan.dp) else serve}


def _writable_out(args: argparse.Namespace, who: str) -> Path | None:
    from hpi.cli.checks import writable_dir

    return writable_dir(args.out, "--out", who) if args.out is not None else None


def _records(args: argparse.Namespace):
    from hpi.record_files import load_records
    from hpi.records import RecordError

    if not args.records:
        return []
    try:
        return load_records(args.records)
    except RecordError as e:
        raise UsageError(f"hpi presets: --records: {e}") from None


# ---- hpi presets --------------------------------------------------------------------------------------------
def presets_document(preset_set, args: argparse.Namespace, nvme_path: str | None) -> dict[str, Any]:
    """The planner's document with each preset's DeepSpeed config, its file name and its command lines."""
    from hpi.planner.specs.plan import model_serve_blocker, serve_blocker

    doc = preset_set.to_dict()
    doc["dtype"] = args.dtype
    doc["nvme_path"] = nvme_path
    for entry, preset in zip(doc["presets"], preset_set.presets):
        entry["config_file"] = f"{preset.name}.{config_file_name(preset.plan)}"
        entry["deepspeed_config"] = _config(preset.plan, preset_set.model, args, nvme_path)
        entry["commands"] = commands(args, preset.plan, nvme_path)
        entry["serve_blocker"] = (model_serve_blocker(preset_set.model)
                                  or serve_blocker(preset.plan.kv_offload, preset.plan.dp))
        if entry["serve_blocker"]:
            entry["commands"]["serve"] = None
    return doc


def cmd_presets(args: argparse.Namespace) -> int:
    from hpi.atomic import write_json
    from hpi.planner.presets import select_presets

    out = _writable_out(args, "hpi presets")
    model, hardware, workload = load_target(args)
    records = _records(args)
    preset_set = select_presets(model, hardware, workload, concurrency=args.concurrency, serving=args.serving,
                                records=records)
    nvme = _nvme_path(args, hardware, "hpi presets",
                      [p.name.capitalize() for p in preset_set.presets if p.plan.offloads_to_nvme])
    doc = presets_document(preset_set, args, nvme)
    if out is not None:
        for entry in doc["presets"]:
            write_json(out / entry["config_file"], entry["deepspeed_config"], indent=2, newline=True)
        write_json(out / PRESETS_FILE, doc, indent=1, newline=True)
    if args.json:
        output.emit_json(doc)
        return 0
    _print_presets(preset_set, doc, out)
    return 0


def _print_presets(preset_set, doc: dict[str, Any], out: Path | None) -> None:
    from rich.table import Table

    from hpi.planner.report import gb, ms, seconds

    console = output.console()
    m, hw = preset_set.model, preset_set.hardware
    console.print(f"[bold]{m.name}[/bold] on [bold]{hw.name}[/bold]: prompt {preset_set.workload.prompt_len_tokens}, "
                  f"gen {preset_set.workload.gen_len_tokens}, up to {preset_set.concurrency} request(s) at once; "
                  f"{preset_set.n_feasible:,} of {preset_set.n_plans:,} plans fit")
    table = Table(title="presets (predicted)", title_justify="left")
    for col in ("preset", "plan", "decode step", "TTFT", "throughput", "GPU peak", "CPU", "pinned", "status"):
        table.add_column(col, justify="right" if col not in ("preset", "plan", "status") else "left")
    for p in preset_set.presets:
        e = p.estimate
        table.add_row(p.name.capitalize(), p.plan.label, ms(e.decode_step_s), seconds(e.ttft_s),
                      f"{e.throughput_tok_s:,.2f} tok/s", gb(e.gpu_peak_bytes), gb(e.cpu_bytes), gb(e.pinned_bytes),
                      p.status)
    console.print(table)
    sources = ", ".join(f"{k} {v}" for k, v in sorted(doc["provenance"]["sources"].items()))
    console.print(f"profile numbers: {sources}")
    console.print(f"definitions: {_definitions()}")
    for p, entry in zip(preset_set.presets, doc["presets"]):
        console.print(f"[bold]{p.name.capitalize()}[/bold] wins by: {p.reason}")
        if p.confirmation:
            c = p.confirmation
            console.print(f"  confirmed by {c.record_id}: decode step {ms(c.decode_step_s or 0)}, "
                          f"{c.throughput_tok_s or 0:,.2f} tok/s measured")
        line = entry["commands"]["serve"] or f"{entry['commands']['run']}  (not servable: {entry['serve_blocker']})"
        output.say_command(console, "  " + line)
    console.print("every knob's valid values and predicted effects: hpi presets --json (each preset's overrides)")
    if out is not None:
        console.print(f"wrote {out / PRESETS_FILE} and {len(doc['presets'])} DeepSpeed configs")


# ---- hpi config ---------------------------------------------------------------------------------------------
def _config_plan(args: argparse.Namespace, model):
    """The plan --preset, --plan or the plan flags name."""
    if args.preset is None:
        return plan_from_args(args, model)
    return preset_plan(args, model, "hpi config", concurrency=args.concurrency)


def _check_fits(model, hardware, workload, plan) -> None:
    """A plan the machine cannot build is refused (``PlanError``); one predicted not to fit is written with a
    warning on stderr (the config is still what that plan needs; ``hpi explain`` says what to change)."""
    from hpi.planner.predict import predict

    est = predict(model, hardware, workload, plan)
    if not est.feasible:
        sys.stderr.write(f"hpi config: warning: {plan.label} is predicted not to fit {hardware.name}: "
                         f"{est.reasons[0].message}\n")


def cmd_config(args: argparse.Namespace) -> int:
    from hpi.atomic import write_json

    if args.templates:
        return cmd_templates(args)
    out = _writable_out(args, "hpi config")
    model, hardware, workload = load_target(args)
    plan = _config_plan(args, model)
    _check_fits(model, hardware, workload, plan)
    nvme = _nvme_path(args, hardware, "hpi config", [plan.label] if plan.offloads_to_nvme else [])
    cfg = _config(plan, model, args, nvme)
    if out is None:
        output.emit_json(cfg)
        return 0
    path = write_json(out / config_file_name(plan), cfg, indent=2, newline=True)
    print(f"wrote {path} ({plan.label})")
    return 0


def cmd_templates(args: argparse.Namespace) -> int:
    from hpi.atomic import write_json, write_text
    from hpi.planner.presets import templates

    given = getattr(args, GIVEN_PLAN_FLAGS, ())
    if given or args.plan_file or args.preset:
        what = ", ".join(dict.fromkeys(given)) or ("--plan" if args.plan_file else "--preset")
        raise UsageError(f"hpi config: {what} given beside --templates: the templates cover every layout of the "
                         f"machine; drop {what}, or drop --templates")
    if args.out is None:
        raise UsageError("hpi config: --templates writes a folder of configs: pass --out DIR")
    out = _writable_out(args, "hpi config")
    model, hardware, workload = load_target(args)
    found = templates(model, hardware, workload)
    nvme = _nvme_path(args, hardware, "hpi config", ["the NVMe templates"] if any(
        t.offload == "nvme" and t.estimate for t in found) else [])
    written = 0
    for t in found:
        if t.estimate is not None:
            write_json(out / t.file_name, _config(t.estimate.plan, model, args, nvme), indent=2, newline=True)
            written += 1
    write_text(out / TEMPLATES_INDEX, templates_index(model, hardware, found, args, nvme))
    print(f"wrote {written} DeepSpeed configs and {out / TEMPLATES_INDEX} ({len(found) - written} layouts fit no plan)")
    return 0


def templates_index(model, hardware, found, args: argparse.Namespace, nvme_path: str | None) -> str:
    """The README of a templates folder: what each file is for, its predicted figures, the command that runs it."""
    from hpi.planner.explain import bindings
    from hpi.planner.report import gb, ms

    lines = [
        f"# DeepSpeed ZeRO-3 inference configs: {model.name} on {hardware.name}",
        "",
        f"Written by `hpi config --templates` for prompt {args.prompt_len}, gen {args.gen_len}, {args.dtype}. One file "
        "per tensor x pipeline parallel layout the machine can build and per offload (CPU, and NVMe where the "
        "machine has a drive): each holds the plan with the lowest predicted decode step at batch 1 for that "
        "layout. Every key DeepSpeed's ZeRO-3 inference path reads is written with an explicit value (DeepSpeed "
        "drops `auto` values silently); the NVMe thread count is `aio.intra_op_parallelism` (a `thread_count` key "
        "would be ignored), and `offload_param.buffer_size` holds the largest tensor partition.",
        "",
        "| file | plan | decode step | tok/s (batch 1) | GPU peak | pinned | what binds | run it |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for t in found:
        if t.estimate is None:
            continue
        e = t.estimate
        b = bindings(e)[0]
        run = commands(args, e.plan, nvme_path)["run"]
        lines.append(f"| `{t.file_name}` | {e.plan.label} | {ms(e.decode_step_s)} | {e.throughput_tok_s:,.2f} | "
                     f"{gb(e.gpu_peak_bytes)} | {gb(e.pinned_bytes)} | {b.resource} ({b.share:.0%}) | `{run}` |")
    missing = [t for t in found if t.estimate is None]
    if missing:
        lines += ["", "Layouts with no plan that fits (the closest plan's limits):", ""]
        lines += [f"- tp{t.tp} pp{t.pp} {t.offload}: {t.why_not}" for t in missing]
    return "\n".join(lines) + "\n"
