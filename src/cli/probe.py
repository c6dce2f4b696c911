"""``hpi probe`` and ``hpi check``: the command-line side of hpi.executor.probe and hpi.executor.check.

Listed in ``hpi.cli.app.COMMAND_MODULES``, so this module is imported by every ``hpi`` command: it must
stay cheap and import neither torch nor the measuring modules at import time (``hpi plan`` stays fast and
the planner-purity test holds). The handlers import what they need when they run.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hpi.cli.args import UsageError, add_plan_flags, add_target, load_target, plan_from_args
from hpi.cli.output import say_command

__all__ = ["register", "cmd_probe", "cmd_check"]


def register(sub: Any) -> dict[str, Any]:
    """Add the ``probe`` and ``check`` parsers to ``sub`` (argparse sub-parsers); returns {name: handler}."""
    p = sub.add_parser("probe", help="measure this machine and write a hardware profile YAML")
    p.add_argument("--out", default=None, metavar="PATH.yaml",
                   help="where to write the profile (default hardware_profiles/NAME.yaml under the current directory)")
    p.add_argument("--name", default=None, help="profile name (default: the --out file name, else probed-<host>)")
    p.add_argument("--nvme-path", default=None, metavar="DIR",
                   help="directory on the disk to measure for offload (default: the system temp dir)")
    p.add_argument("--quick", action="store_true", help="small buffers, few repeats: seconds, for tests and CI")
    p.add_argument("--json", action="store_true", help="last stdout line: the raw measurement document")
    p = sub.add_parser("check", help="warn about what would stop a plan from launching on this machine")
    add_target(p)
    add_plan_flags(p, for_search=False)
    p.add_argument("--nvme-path", default=None, metavar="DIR", help="the NVMe offload directory the run will use")
    return {"probe": cmd_probe, "check": cmd_check}


def _names(args: argparse.Namespace) -> tuple[str, Path]:
    import socket

    from hpi.executor.probe import check_profile_name, default_profile_name

    out = Path(args.out).expanduser() if args.out else None
    if out is not None and out.suffix not in (".yaml", ".yml"):
        raise ValueError(f"hpi probe: --out {args.out} must end in .yaml (profiles are NAME.yaml)")
    if args.name and out is not None and out.stem != args.name:
        raise ValueError(f"hpi probe: --name {args.name} != --out file name {out.stem!r}: a profile's name is its "
                         "file name; drop one of them")
    name = check_profile_name(args.name
                              or (out.stem if out is not None else default_profile_name(socket.gethostname())))
    return name, out if out is not None else Path("hardware_profiles") / f"{name}.yaml"


def _check_out(out: Path, flag: str) -> None:
    """The profile and its NAME.probe.json can be written there, and it is not the installed package: a probe
    writes into the user's folders, never into the profiles hpi ships (a checkout's hardware_profiles/ is a link
    to them)."""
    import hpi
    from hpi.cli.checks import writable_file
    from hpi.executor.probe import measurements_path

    writable_file(str(out), flag, "hpi probe", (".yaml", ".yml"))
    writable_file(str(measurements_path(out)), flag, "hpi probe")
    package = Path(hpi.__file__).resolve().parent
    if out.resolve().is_relative_to(package):
        raise UsageError(f"hpi probe: {flag} {out} is inside the installed hpi package ({out.resolve().parent}): "
                         "write the profile elsewhere, e.g. --out profiles/NAME.yaml, and plan on it with "
                         "--hardware profiles/NAME.yaml or HPI_PROFILES_DIR=profiles")


def _check_nvme_path(path: str | None) -> None:
    import os

    if path is None:
        return
    from hpi.cli.checks import existing_dir

    existing_dir(path, "--nvme-path", "hpi probe")
    if not os.access(path, os.W_OK):
        raise UsageError(f"hpi probe: --nvme-path {path}: not writable; pick a directory you can write to")


class _Steps:
    """A rich progress line per measurement step, on stderr (stdout stays for the summary / JSON)."""

    def __init__(self, console: Any) -> None:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                 console=console)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        task = self.progress.add_task(name, total=1)
        try:
            yield
        finally:
            self.progress.update(task, completed=1, description=f"[green]done[/green] {name}")


def cmd_probe(args: argparse.Namespace) -> int:
    from rich.console import Console

    _check_nvme_path(args.nvme_path)
    name, out = _names(args)
    _check_out(out, "--out" if args.out else "the default --out")  # before measuring: nothing is lost to a bad path
    from hpi.executor.probe import (
        ProbeSettings,
        build_profile,
        measurements_path,
        run_probe,
        write_measurements,
        write_profile,
    )
    from hpi.planner.profiles import load_profile

    err = Console(stderr=True)
    settings = ProbeSettings.small() if args.quick else ProbeSettings.full()
    steps = _Steps(err)
    with steps.progress:
        doc = run_probe(settings, nvme_path=args.nvme_path, step=steps.step)
    profile = build_profile(doc, name)
    header = (f"Written by `hpi probe{' --quick' if args.quick else ''}` on {doc['hostname']}, {doc['date']} "
              f"({doc['seconds']:.0f} s).\nEvery figure says how it was measured; raw numbers: {name}.probe.json "
              "beside this file.\nRe-measure: hpi probe --out " + str(out))
    write_profile(profile, out, header)
    json_path = measurements_path(out)
    write_measurements(doc, json_path)
    loaded = load_profile(str(out))  # the written file must load: a failure here is a probe bug, said plainly
    summary = Console(stderr=True) if args.json else Console()
    _summarize(summary, doc, loaded, out, json_path)
    if args.json:
        sys.stdout.write(json.dumps(doc, default=str) + "\n")
    return 0


def _summarize(console: Any, doc: dict[str, Any], profile: Any, out: Path, json_path: Path) -> None:
    from rich.table import Table

    table = Table(title=f"hpi probe: {profile.name} ({doc['seconds']:.0f} s)", title_justify="left")
    table.add_column("field")
    table.add_column("value", justify="right")
    table.add_column("source")
    for path, prov in sorted(profile.provenance.items()):
        value = _lookup(profile.raw, path)
        table.add_row(path, _fmt(path, value), prov.source)
    console.print(table)
    for step, error in (doc.get("errors") or {}).items():
        console.print(f"[yellow]not measured[/yellow] {step}: {error}")
    for note in doc.get("notes") or []:
        console.print(f"[cyan]note[/cyan] {note}")
    if not profile.gpus_per_node:
        console.print("no GPU found: the profile holds the CPU, host memory and disk figures only")
    say_command(console, f"wrote {out} and {json_path}; plan on it: hpi plan --model llama-3-70b --hardware {out}")


def _lookup(raw: Any, dotted: str) -> Any:
    node = raw
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node.get("value") if isinstance(node, dict) else node


def _fmt(path: str, value: Any) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    if path.endswith("bytes_s"):
        return f"{value / 1e9:,.2f} GB/s"
    if path.endswith("_bytes"):
        return f"{value / 1e9:,.1f} GB"
    if path.endswith("flops"):
        return f"{value / 1e12:,.0f} TFLOP/s"
    if path.endswith("latency_s"):
        return f"{value * 1e6:,.1f} us"
    return f"{value:,.4g}"


EXIT_CHECK_FAILED = 1


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0 when nothing is an error, 1 when something is (bad input: 2, as every hpi command)."""
    from hpi.planner.predict import PlanError, predict

    model, hardware, workload = load_target(args)
    plan = plan_from_args(args, model)
    try:
        est, problems = predict(model, hardware, workload, plan), ()
    except PlanError as e:
        est, problems = None, (f"cannot be placed: {e}",)
    from hpi.executor.check import findings_doc, gather_facts, has_errors, run_rules

    findings = run_rules(gather_facts(est, hardware, plan_problems=problems, nvme_path=args.nvme_path))
    if args.json:
        sys.stdout.write(json.dumps(findings_doc(findings)) + "\n")
    else:
        _print_findings(findings, plan.label, hardware.name)
    return EXIT_CHECK_FAILED if has_errors(findings) else 0


def _print_findings(findings: Any, label: str, profile: str) -> None:
    from rich.console import Console
    from rich.table import Table

    colors = {"error": "red", "warning": "yellow", "info": "dim"}
    table = Table(title=f"hpi check: {label} on this machine (profile {profile})", title_justify="left")
    for column in ("severity", "check", "finding", "fix"):
        table.add_column(column, overflow="fold")
    for f in findings:
        table.add_row(f"[{colors[f.severity]}]{f.severity}[/{colors[f.severity]}]", f.check, f.message, f.fix)
    console = Console(width=160)
    console.print(table)
    errors = sum(f.severity == "error" for f in findings)
    console.print(f"{errors} error(s): fix them before hpi run" if errors else "no errors: ready to launch")
