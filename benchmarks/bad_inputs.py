"""Run the bad-input table (``tests/cli/test_bad_inputs.py``) as subprocesses against an ``hpi`` executable and
count how each bad input ends: the before/after measure of issue 14.

    python benchmarks/bad_inputs.py --hpi /path/to/venv/bin/hpi --label after --out benchmarks/results/X.json

Each case runs in a fresh folder holding the table's fixtures (its working directory), with ``HPI_DEBUG`` unset,
``XDG_CACHE_HOME`` inside the folder and ``DS_ACCELERATOR=cpu``; a module the case hides is made unimportable
through a ``sitecustomize`` on ``PYTHONPATH``. Classes, first match wins:

- ``traceback``: a Python traceback on stderr or stdout;
- ``accepted``: exit code 0, or still running at ``--timeout`` (the bad input was taken);
- ``one_line``: exit code 2, exactly one line on stderr, nothing written in the case's folder;
- ``unclear``: anything else (another exit code, several lines, files written).

Commands the executable does not have (``hpi --help``) are left out, so that an old hpi is measured on what it
had. The last stdout line is the summary as one JSON document; ``--out`` keeps every case's outcome.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "tests" / "cli" / "test_bad_inputs.py"
CLASSES = ("one_line", "traceback", "unclear", "accepted")
HIDE_ENV = "HPI_BAD_INPUTS_HIDE"
# DeepSpeed's compiled CPU ops stay where they were built (the case's own cache would rebuild them every run)
TORCH_EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")
SITECUSTOMIZE = f"""import os, sys
for _name in filter(None, os.environ.get("{HIDE_ENV}", "").split(",")):
    sys.modules[_name] = None  # import raises ModuleNotFoundError, find_spec answers None
"""


def load_table():
    """The test module holding CASES, FIXTURES and their helpers (imported by path: tests are no package)."""
    spec = importlib.util.spec_from_file_location("bad_input_table", TABLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def target_python(hpi: Path) -> str:
    """The interpreter of a console script (its shebang), else this one."""
    first = hpi.read_text(errors="replace").splitlines()[0] if hpi.is_file() else ""
    return first[2:].strip() if first.startswith("#!") and "python" in first else sys.executable


def commands_of(hpi: Path) -> set[str]:
    """The commands ``hpi --help`` lists."""
    text = subprocess.run([str(hpi), "--help"], capture_output=True, text=True, timeout=120).stdout
    match = re.search(r"\{([a-z,\-]+)\}", text)
    return set(match.group(1).split(",")) if match else set()


def package_profiles_of(hpi: Path) -> str:
    """The profiles folder inside the target's installed package (hpi.planner, or the old top-level planner)."""
    code = ("try:\n import hpi.planner.profiles as p\nexcept ImportError:\n import planner.profiles as p\n"
            "print(p._DEFAULT_DIR)")
    return subprocess.run([target_python(hpi), "-c", code], capture_output=True, text=True, timeout=120,
                          check=True).stdout.strip()


def classify(code: int | None, out: str, err: str, written: bool) -> str:
    if "Traceback (most recent call last)" in err or "Traceback (most recent call last)" in out:
        return "traceback"
    if code == 0 or code is None:
        return "accepted"
    if code == 2 and len(err.strip().splitlines()) == 1 and err.strip() and not written:
        return "one_line"
    return "unclear"


def run_case(table, case, hpi: Path, base: Path, pkg_profiles: str, timeout_s: float, hide_dir: Path) -> dict:
    folder = base / "cwd"
    folder.mkdir(parents=True)
    table.materialize(folder)
    env = {k: v for k, v in os.environ.items() if k not in ("HPI_DEBUG", "PYTHONPATH")}
    env.update(XDG_CACHE_HOME=str(base / "cache"), DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=TORCH_EXTENSIONS)
    env.update({k: v.replace("{tmp}", str(folder)) for k, v in case.env})
    if case.hide:
        env.update(PYTHONPATH=str(hide_dir), **{HIDE_ENV: ",".join(case.hide)})
    before = table.listing(base)
    argv = table.expand(case.argv, folder, pkg_profiles)
    started = time.monotonic()
    proc = subprocess.Popen([str(hpi), *argv], cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the run it started, its ranks with it
        out, err = proc.communicate()
        code = None
    written = table.listing(base) != before
    lines = err.strip().splitlines()
    return {"id": case.id, "argv": list(case.argv), "class": classify(code, out, err, written), "exit_code": code,
            "stderr_lines": len(lines), "last_stderr_line": (lines[-1][:300] if lines else ""), "written": written,
            "wall_s": round(time.monotonic() - started, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hpi", required=True, help="the hpi executable to measure")
    p.add_argument("--label", default=None, help="a name for this run in the output (default: the executable)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a case may run (default 60)")
    p.add_argument("--out", default=None, help="JSON file for every case's outcome")
    p.add_argument("-k", dest="pattern", default=None, help="only cases whose id contains this")
    args = p.parse_args(argv)
    hpi = Path(shutil.which(args.hpi) or args.hpi).absolute()
    table = load_table()
    commands = commands_of(hpi)
    pkg_profiles = package_profiles_of(hpi)
    known = [c for c in table.CASES if not c.argv or c.argv[0] in commands or c.argv[0] in ("nosuch", "--bogus")]
    chosen = [c for c in known if not args.pattern or args.pattern in c.id]
    results, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="hpi-bad-inputs-") as tmp:
        hide_dir = Path(tmp) / "hide"
        hide_dir.mkdir()
        (hide_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
        for i, case in enumerate(chosen):
            why = table.skip_reason(case)
            if why:
                skipped.append({"id": case.id, "why": why})
                continue
            result = run_case(table, case, hpi, Path(tmp) / f"case-{i:03d}", pkg_profiles, args.timeout, hide_dir)
            results.append(result)
            print(f"{result['class']:9s} {result['exit_code']!s:>4} {case.id[:90]}", file=sys.stderr, flush=True)
    counts = {k: sum(r["class"] == k for r in results) for k in CLASSES}
    summary = {"label": args.label or str(hpi), "hpi": str(hpi), "date": dt.datetime.now(dt.timezone.utc).isoformat(),
               "commands": sorted(commands), "n_cases": len(results), "counts": counts,
               "not_run": {"command_missing": len(table.CASES) - len(known), "not_bad_here": len(skipped)}}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**summary, "cases": results, "skipped": skipped}, indent=1) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
