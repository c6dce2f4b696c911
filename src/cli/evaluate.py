"""``hpi eval``: lm-evaluation-harness tasks scored by hpi's serving runtime, optionally against lm-eval's own
``hf`` model on the same checkpoint (``--reference hf``: score parity), kept in an eval history.

The runtime is started for the job from the deployment flags ``hpi serve`` takes (plan flags, ``--plan`` or
``--preset``: ``hpi.evaluation.runtime``) or, with ``--url``, a running ``hpi serve``. Parse, check, run
(``hpi.evaluation.job``). lm-eval is imported when the command runs (the eval extra).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hpi.cli.args import UsageError, positive
from hpi.cli.args import count as non_negative_count
from hpi.cli.serve import add_deployment_flags, deployment_argv

EVAL_MODULES = ("lm_eval", "transformers")
DEFAULT_HISTORY = "evals"
WHO = "hpi eval"


def register(sub) -> dict:
    p = sub.add_parser("eval", help="score lm-eval tasks on hpi's serving runtime; --reference hf checks parity",
                       description="Run lm-evaluation-harness tasks through hpi's serving runtime and keep the results "
                                   "with a launch descriptor in an eval history. The runtime is hpi serve, started for "
                                   "the job with the deployment flags below (plan flags, --plan or --preset) and "
                                   "stopped after it, or a running one named by --url. The offline tasks the "
                                   "repository ships (hpi_arith_mc, hpi_count_ppl, hpi_arith_gen) are always "
                                   "available.")
    p.add_argument("--url", default=None, help="a running hpi serve (http://HOST:PORT) instead of starting one")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="the checkpoint to evaluate (the served one with --url): its weights, its tokenizer, the "
                        "reference's weights, the fingerprint")
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
                   help="with --url: hpi serve's run folder (--out): its spec.json (plan, DeepSpeed settings) joins "
                        "the record")
    p.add_argument("--reference", choices=("hf",), default=None,
                   help="hf: also run lm-eval's hf model on --checkpoint here, in the server's precision on its kind "
                        "of device, and report parity (exit 1 if off)")
    p.add_argument("--api-key", default=None, help="with --url: the server's API key (default: $HPI_API_KEY)")
    p.add_argument("--out", default=DEFAULT_HISTORY, metavar="DIR",
                   help=f"the eval history folder: one entry per job (default {DEFAULT_HISTORY}/)")
    p.add_argument("--log-samples", action="store_true",
                   help="keep every request and response in the entry (samples.json), as lm-eval's --log_samples")
    p.add_argument("--history", action="store_true", help="list the entries of --out's history and exit")
    p.add_argument("--progress-json", action="store_true",
                   help="progress as one JSON line per update on stdout (for a GUI) instead of a bar on stderr")
    group = p.add_argument_group("the runtime hpi eval starts (hpi serve's flags; not with --url)")
    p.set_defaults(deployment_flags=add_deployment_flags(group, max_batch_default="--batch-size"))
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

    if args.url is not None:
        if not args.url.startswith(("http://", "https://")):
            raise UsageError(f"{WHO}: --url {args.url!r} must start with http:// or https://")
        beside = [f for f in deployment_argv(args.deployment_flags, args) if f.startswith("--")]
        if beside:
            raise UsageError(f"{WHO}: {' '.join(beside)} given beside --url: the running server's deployment is "
                             "fixed; drop them, or drop --url to have hpi eval start the runtime")
    else:
        for flag, value in (("--serve-dir", args.serve_dir), ("--api-key", args.api_key)):
            if value is not None:
                raise UsageError(f"{WHO}: {flag} names a running server's; without --url hpi eval starts its "
                                 f"own: drop {flag}, or name the server with --url")
    if args.checkpoint is None:
        raise UsageError(f"{WHO}: name the checkpoint to evaluate: --checkpoint DIR (with --url: the one it serves)")
    existing_dir(args.checkpoint, "--checkpoint", WHO)
    tasks = tuple(t.strip() for t in (args.tasks or "").split(",") if t.strip())
    if not tasks:
        raise UsageError(f"{WHO}: name the tasks: --tasks T1,T2 (shipped: hpi_arith_mc,hpi_count_ppl,hpi_arith_gen)")
    for folder in args.include_path:
        existing_dir(folder, "--include-path", WHO)
    if args.serve_dir is not None and not (Path(args.serve_dir) / "spec.json").is_file():
        raise UsageError(f"{WHO}: --serve-dir {args.serve_dir} holds no spec.json: name the folder hpi serve --out "
                         "wrote")
    if args.nvme_path is not None:
        existing_dir(args.nvme_path, "--nvme-path", WHO)
    writable_dir(args.out, "--out", WHO)
    require(EVAL_MODULES, WHO)
    return EvalJob(url=(args.url or "").rstrip("/"), checkpoint=args.checkpoint, tasks=tasks,
                   include_paths=tuple(args.include_path), num_fewshot=args.num_fewshot, limit=args.limit,
                   batch_size=args.batch_size, max_length=args.max_length,
                   api_key=args.api_key or (os.environ.get("HPI_API_KEY") if args.url else None),
                   serve_dir=args.serve_dir)


def serve_argv(args: argparse.Namespace) -> list[str]:
    """The ``hpi serve`` flags of the runtime ``hpi eval`` starts: its deployment flags as given, the checkpoint,
    a window of --max-length tokens and --batch-size KV slots unless --max-batch says otherwise."""
    argv = [*deployment_argv(args.deployment_flags, args), "--checkpoint", args.checkpoint,
            "--max-model-len", str(args.max_length)]
    return argv if args.max_batch is not None else [*argv, "--max-batch", str(args.batch_size)]


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
    if args.url is not None:
        return _evaluate_attached(args, job)
    return _evaluate_started(args, job)


def _ready(url: str, api_key: str | None) -> dict | None:
    """The server's ``/ready`` document, or None while it is not ready."""
    from hpi.evaluation.lm import ServerError, request_json

    try:
        return request_json(f"{url}/ready", None, api_key, 30.0)
    except ServerError:
        return None


def _evaluate_attached(args: argparse.Namespace, job) -> int:
    from hpi.evaluation.job import new_entry

    server = _ready(job.url, job.api_key)
    if server is None:
        raise UsageError(f"{WHO}: no ready hpi serve answers at {job.url}/ready: start one (hpi serve), or drop "
                         "--url to have hpi eval start it")
    job = job.served_by(server)
    results = _score(args, job)
    parity = _parity(args, job, results)
    return _keep(args, new_entry(Path(args.out), job.tasks), job, server, results, parity)


def _evaluate_started(args: argparse.Namespace, job) -> int:
    """Start hpi serve for the job in its history entry, score, stop it, then run the reference (the GPU is free
    by then)."""
    import dataclasses
    import shutil

    from hpi.evaluation.job import new_entry
    from hpi.evaluation.runtime import RuntimeFailed, start_runtime

    history_was_there = Path(args.out).exists()
    folder = new_entry(Path(args.out), job.tasks)
    say = (lambda text: None) if args.progress_json else (lambda text: sys.stderr.write(f"{WHO}: {text}\n"))
    try:
        runtime = start_runtime(serve_argv(args), folder, ready=_ready, say=say)
    except RuntimeFailed as e:
        if e.refused:  # hpi serve's own line names the fix; it started nothing, so the entry goes too
            shutil.rmtree(folder, ignore_errors=True)
            if not history_was_there:
                Path(args.out).rmdir()
            raise UsageError(str(e)) from None
        sys.stderr.write(f"{WHO}: the runtime stopped before it was ready (exit {e.code}): {e}; its output: "
                         f"{e.log}\n")
        return 1
    try:
        say(f"the runtime was ready in {runtime.ready_s:.1f} s")
        server = runtime.server
        job = dataclasses.replace(job, url=runtime.url, api_key=runtime.api_key,
                                  serve_dir=str(runtime.run_dir)).served_by(server)
        results = _score(args, job)
    finally:
        stopped = runtime.stop()
    if stopped != 0:
        sys.stderr.write(f"{WHO}: warning: hpi serve exited {stopped} when stopped; its output: {runtime.log}\n")
    parity = _parity(args, job, results)
    return _keep(args, folder, job, server, results, parity)


def _score(args: argparse.Namespace, job) -> dict:
    if args.progress_json:
        return job.run_hpi(JsonProgress())
    from hpi.cli.progress import PhaseProgress

    with PhaseProgress(WHO, PHASES, counted=tuple(PHASES)) as progress:
        return job.run_hpi(progress)


def _parity(args: argparse.Namespace, job, results: dict):
    from hpi.evaluation.parity import compare

    return compare(results, job.run_reference(), job.reference_dtype) if args.reference == "hf" else None


def _keep(args: argparse.Namespace, folder: Path, job, server: dict, results: dict, parity) -> int:
    """The entry's files, then what the job found (a JSON line with --progress-json); exit 1 when parity is off."""
    from hpi.evaluation.job import launch_descriptor, write_entry

    write_entry(folder, results, launch_descriptor(job, server), None if parity is None else parity.as_dict(),
                samples=args.log_samples)
    off = parity is not None and not parity.ok
    if args.progress_json:
        sys.stdout.write(json.dumps({"event": "done", "entry": str(folder),
                                     "parity_ok": None if parity is None else parity.ok}) + "\n")
        return 1 if off else 0
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
    return 1 if off else 0
