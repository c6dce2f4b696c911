"""``hpi eval``: lm-evaluation-harness tasks scored by a running ``hpi serve`` (``--url``), optionally against
lm-eval's own ``hf`` model on the same checkpoint (``--reference hf``: score parity), kept in an eval history.

Parse, check, run (``hpi.evaluation.job``). lm-eval is imported when the command runs (the eval extra).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hpi.cli.args import UsageError, positive
from hpi.cli.args import count as non_negative_count

EVAL_MODULES = ("lm_eval", "transformers")
DEFAULT_HISTORY = "evals"
WHO = "hpi eval"


def register(sub) -> dict:
    p = sub.add_parser("eval", help="score lm-eval tasks on a running hpi serve; --reference hf checks parity",
                       description="Run lm-evaluation-harness tasks through hpi's serving runtime (a running "
                                   "hpi serve, --url) and keep the results with a launch descriptor in an eval "
                                   "history. The offline tasks the repository ships (hpi_arith_mc, hpi_count_ppl, "
                                   "hpi_arith_gen) are always available.")
    p.add_argument("--url", default=None, help="the running hpi serve (http://HOST:PORT)")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="the checkpoint the server serves: its tokenizer, the reference's weights, the fingerprint")
    p.add_argument("--tasks", default=None, metavar="T1,T2", help="lm-eval task names, comma-separated")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of task YAMLs besides the shipped ones (repeatable)")
    p.add_argument("--num-fewshot", type=non_negative_count, default=None, metavar="K")
    p.add_argument("--limit", type=positive, default=None, metavar="N", help="items per task at most")
    p.add_argument("--batch-size", type=positive, default=16, metavar="B",
                   help="prompts per request to the server (and the reference's batch)")
    p.add_argument("--max-length", type=positive, default=2048, metavar="TOKENS",
                   help="tokens one scored window holds: the server's --max-model-len (default 2048)")
    p.add_argument("--serve-dir", default=None, metavar="DIR",
                   help="hpi serve's run folder (--out): its spec.json (plan, DeepSpeed settings) joins the record")
    p.add_argument("--reference", choices=("hf",), default=None,
                   help="hf: also run lm-eval's hf model on --checkpoint here and report parity (exit 1 if off)")
    p.add_argument("--api-key", default=None, help="the server's API key (default: $HPI_API_KEY)")
    p.add_argument("--out", default=DEFAULT_HISTORY, metavar="DIR",
                   help=f"the eval history folder: one entry per job (default {DEFAULT_HISTORY}/)")
    p.add_argument("--history", action="store_true", help="list the entries of --out's history and exit")
    p.add_argument("--progress-json", action="store_true",
                   help="progress as one JSON line per update on stdout (for a GUI) instead of a bar on stderr")
    return {"eval": run_eval}


PHASES = {"loglikelihood": "scoring continuations", "loglikelihood_rolling": "scoring documents",
          "generate_until": "generating"}


class JsonProgress:
    """``progress(request_type, done, total)`` as JSON lines: requests done of total and the rate since that
    request type started."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stdout
        self.started: dict[str, float] = {}

    def __call__(self, request_type: str, done: int, total: int) -> None:
        now = time.monotonic()
        start = self.started.setdefault(request_type, now)
        rate = done / (now - start) if now > start else None
        self.stream.write(json.dumps({"event": "progress", "request_type": request_type, "done": done,
                                      "total": total, "requests_per_s": rate}) + "\n")
        self.stream.flush()


def _job(args: argparse.Namespace):
    import os

    from hpi.cli.checks import existing_dir, writable_dir
    from hpi.cli.errors import require
    from hpi.evaluation.job import EvalJob

    if args.url is None:
        raise UsageError(f"{WHO}: name the server: --url http://HOST:PORT of a running hpi serve")
    if not args.url.startswith(("http://", "https://")):
        raise UsageError(f"{WHO}: --url {args.url!r} must start with http:// or https://")
    if args.checkpoint is None:
        raise UsageError(f"{WHO}: name the checkpoint the server serves: --checkpoint DIR")
    existing_dir(args.checkpoint, "--checkpoint", WHO)
    tasks = tuple(t.strip() for t in (args.tasks or "").split(",") if t.strip())
    if not tasks:
        raise UsageError(f"{WHO}: name the tasks: --tasks T1,T2 (shipped: hpi_arith_mc,hpi_count_ppl,hpi_arith_gen)")
    for folder in args.include_path:
        existing_dir(folder, "--include-path", WHO)
    if args.serve_dir is not None and not (Path(args.serve_dir) / "spec.json").is_file():
        raise UsageError(f"{WHO}: --serve-dir {args.serve_dir} holds no spec.json: name the folder hpi serve --out "
                         "wrote")
    writable_dir(args.out, "--out", WHO)
    require(EVAL_MODULES, WHO)
    return EvalJob(url=args.url.rstrip("/"), checkpoint=args.checkpoint, tasks=tasks,
                   include_paths=tuple(args.include_path), num_fewshot=args.num_fewshot, limit=args.limit,
                   batch_size=args.batch_size, max_length=args.max_length,
                   api_key=args.api_key or os.environ.get("HPI_API_KEY"), serve_dir=args.serve_dir)


def _check_task_names(job) -> None:
    known = set(job.task_manager().all_tasks)
    unknown = [t for t in job.tasks if t not in known]
    if unknown:
        raise UsageError(f"{WHO}: --tasks {','.join(unknown)}: no such lm-eval task here (add its folder with "
                         "--include-path, or see lm_eval ls tasks)")


def _show_history(args: argparse.Namespace) -> int:
    from hpi.evaluation.job import read_history

    entries = read_history(Path(args.out))
    if not entries:
        sys.stdout.write(f"no eval entries in {args.out}\n")
    for e in entries:
        verdict = {None: "", True: "  parity ok", False: "  PARITY OFF"}[e["parity_ok"]]
        scores = "; ".join(f"{task} " + ", ".join(f"{k.split(',')[0]}={v:.4g}" for k, v in m.items())
                           for task, m in e["scores"].items())
        sys.stdout.write(f"{e['entry']}  {scores}{verdict}\n")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    if args.history:
        return _show_history(args)
    job = _job(args)
    _check_task_names(job)
    from hpi.evaluation.job import launch_descriptor, write_entry
    from hpi.evaluation.lm import ServerError, request_json
    from hpi.evaluation.parity import compare

    try:
        server = request_json(f"{job.url}/ready", None, job.api_key, 30.0)
    except ServerError as e:
        raise UsageError(f"{WHO}: the server is not ready: {e}") from None
    if args.progress_json:
        results = job.run_hpi(JsonProgress())
    else:
        from hpi.cli.progress import PhaseProgress

        with PhaseProgress(WHO, PHASES, counted=tuple(PHASES)) as progress:
            results = job.run_hpi(progress)
    parity = compare(results, job.run_reference()) if args.reference == "hf" else None
    folder = write_entry(Path(args.out), job, results, launch_descriptor(job, server),
                         None if parity is None else parity.as_dict())
    if args.progress_json:
        sys.stdout.write(json.dumps({"event": "done", "entry": str(folder),
                                     "parity_ok": None if parity is None else parity.ok}) + "\n")
        return 1 if parity is not None and not parity.ok else 0
    for task, metrics in results["results"].items():
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "sample_len"}
        sys.stdout.write(f"{task}: {json.dumps(shown)}\n")
    if parity is not None:
        for r in parity.requests:
            sys.stdout.write(f"parity {r.task}: max |dll| {r.max_delta:.3g}, median {r.median_delta:.3g}, "
                             f"agreement {r.agreement:.3f} ({r.decisions} decisions)\n")
        for line in parity.failures():
            sys.stderr.write(f"{WHO}: parity off: {line}\n")
    sys.stdout.write(f"kept in {folder}\n")
    return 1 if parity is not None and not parity.ok else 0
