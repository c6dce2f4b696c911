"""One ``hpi eval`` job: lm-eval's run through the ``hpi`` model, optionally lm-eval's ``hf`` model on the same
checkpoint as the reference, and an entry in the eval history that lets the score be reproduced and compared.

An entry is a folder ``<history>/<UTC time>-<tasks>/`` holding ``results.json`` (lm-eval's results, samples
left out), ``launch.json`` (the launch descriptor: what ran where, with which software, on which checkpoint),
with a reference ``parity.json``, with ``--log-samples`` ``samples.json`` and, when hpi eval started the
runtime, hpi serve's run folder ``runtime/`` and its output ``runtime-serve.log``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpi.evaluation.offline_tasks import TASKS_DIR

FINGERPRINT_BYTES = 1 << 20  # read from each end of each checkpoint file
SOFTWARE = ("hybrid-parallel-inference", "lm_eval", "torch", "transformers", "deepspeed", "datasets")


@dataclass(frozen=True)
class EvalJob:
    url: str  # a running hpi serve
    checkpoint: str  # the folder it serves (its tokenizer scores here; the reference loads it)
    tasks: tuple[str, ...]
    include_paths: tuple[str, ...] = ()  # task folders besides the shipped ones
    num_fewshot: int | None = None
    limit: int | None = None
    batch_size: int = 16
    max_length: int = 2048
    api_key: str | None = None
    serve_dir: str | None = None  # hpi serve's run folder: its spec.json (plan, workload) joins the descriptor
    reference_dtype: str = "float32"  # the reference's precision and device: the server's (its /ready says)
    reference_device: str = "cpu"

    def task_manager(self):
        from lm_eval.tasks import TaskManager

        return TaskManager(include_path=[str(TASKS_DIR), *self.include_paths])

    def evaluate(self, model, model_args: dict[str, Any] | None = None, device: str = "cpu") -> dict:
        """``model``: a registered name with ``model_args``, or an lm-eval model object."""
        import lm_eval

        return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(self.tasks),
                                       num_fewshot=self.num_fewshot, limit=self.limit, batch_size=self.batch_size,
                                       task_manager=self.task_manager(), log_samples=True, device=device)

    def run_hpi(self, progress=None) -> dict:
        """``progress(request_type, done, total)`` after each batch of requests, or None."""
        from hpi.evaluation.lm import HpiLM

        model = HpiLM(url=self.url, tokenizer=self.checkpoint, api_key=self.api_key, batch_size=self.batch_size,
                      max_length=self.max_length)
        model.progress = progress
        return self.evaluate(model)

    def run_reference(self) -> dict:
        """lm-eval's hf model on the checkpoint in one process (the single-node reference), in the server's
        precision on the server's kind of device."""
        return self.evaluate("hf", {"pretrained": self.checkpoint, "dtype": self.reference_dtype},
                             device=self.reference_device)

    def served_by(self, server: dict[str, Any]) -> EvalJob:
        """This job with its reference in the precision and on the kind of device the server (``/ready``) runs."""
        device = "cpu" if server.get("device", "cpu") == "cpu" else "cuda"
        return dataclasses.replace(self, reference_dtype=server.get("dtype", self.reference_dtype),
                                   reference_device=device)


def checkpoint_fingerprint(folder: str | Path) -> str:
    """sha256 over every file's relative name, size, and first and last MiB: the same checkpoint gives the
    same fingerprint in seconds however large it is (a full hash of a 140 GB checkpoint takes minutes)."""
    digest = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        with path.open("rb") as f:
            digest.update(f.read(FINGERPRINT_BYTES))
            if size > 2 * FINGERPRINT_BYTES:
                f.seek(size - FINGERPRINT_BYTES)
                digest.update(f.read())
    return digest.hexdigest()


def software_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in SOFTWARE:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def deployment_of(spec_path: Path, checkpoint: str) -> dict[str, Any]:
    """The layout hpi serve ran (``spec_path``: its run folder's spec.json): world size, tp / pp / dp, the offload
    settings, and the DeepSpeed config its ranks were given (``hpi.executor.render.ds_config``, the one the
    worker writes; None where the plan runs without ZeRO-3)."""
    from hpi.executor.modeling import load_hf_config
    from hpi.executor.render import ds_config
    from hpi.executor.spec import RunSpec

    spec = RunSpec.read(spec_path)
    plan = spec.plan
    config = None
    if not plan.runs_without_zero3:
        from hpi.planner.catalog import load_model

        hidden_size = load_hf_config(checkpoint).hidden_size
        config = ds_config(plan, dtype=spec.dtype, hidden_size=hidden_size, nvme_path=spec.nvme_path,
                           stage_layers=max(spec.stage_layer_counts(load_model(checkpoint))))  # the worker's split
    return {"world_size": plan.world_size, "tp": plan.tp, "pp": plan.pp, "dp": plan.dp, "offload": plan.offload,
            "weight_bits": plan.weight_bits, "pin_memory": plan.pin_memory, "zero3": not plan.runs_without_zero3,
            "hardware": spec.hardware, "device": spec.device, "dtype": spec.dtype, "deepspeed_config": config}


def launch_descriptor(job: EvalJob, server: dict[str, Any]) -> dict[str, Any]:
    """What ran: the job, the server's own account (``/ready``), hpi serve's spec (plan, workload, DeepSpeed
    settings) and its layout when its run folder is known, the checkpoint's fingerprint and the software
    versions."""
    spec = deployment = None
    if job.serve_dir is not None:
        spec = json.loads((Path(job.serve_dir) / "spec.json").read_text())
        deployment = deployment_of(Path(job.serve_dir) / "spec.json", job.checkpoint)
    job_doc = {k: v for k, v in dataclasses.asdict(job).items() if k != "api_key"}
    return {"job": job_doc, "server": server, "serve_spec": spec, "deployment": deployment,
            "checkpoint_fingerprint": checkpoint_fingerprint(job.checkpoint), "software": software_versions(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def entry_name(tasks: tuple[str, ...], now_s: float) -> str:
    label = "+".join(tasks) if len("+".join(tasks)) <= 60 else f"{tasks[0]}+{len(tasks) - 1}-more"
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now_s))}-{label}"


def new_entry(history: Path, tasks: tuple[str, ...], now_s: float | None = None) -> Path:
    """A new, empty folder for one job in ``history`` (a clash in the same second gets a suffix)."""
    base = history / entry_name(tasks, time.time() if now_s is None else now_s)
    folder, n = base, 1
    while True:
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            n += 1
            folder = base.with_name(f"{base.name}-{n}")


def write_entry(folder: Path, results: dict, descriptor: dict, parity: dict | None, *,
                samples: bool = False) -> Path:
    """The job's results, launch descriptor and parity into its entry folder (``new_entry``); ``samples``: every
    request and response too (``samples.json``, lm-eval's --log_samples), for comparing runs request by request."""
    from hpi.atomic import write_json

    kept = {k: v for k, v in results.items() if k != "samples"}
    if samples:
        write_json(folder / "samples.json", results.get("samples", {}), indent=None)
    write_json(folder / "results.json", kept)
    write_json(folder / "launch.json", descriptor)
    if parity is not None:
        write_json(folder / "parity.json", parity)
    return folder


def read_history(history: Path) -> list[dict[str, Any]]:
    """Every entry, oldest first: its folder name, tasks, headline scores and parity verdict."""
    out = []
    for folder in sorted(p for p in history.iterdir() if (p / "results.json").is_file()) if history.is_dir() else []:
        results = json.loads((folder / "results.json").read_text())
        parity_path = folder / "parity.json"
        parity = json.loads(parity_path.read_text()) if parity_path.is_file() else None
        scores = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "_stderr" not in k
                         and k != "sample_len"} for task, metrics in results.get("results", {}).items()}
        out.append({"entry": folder.name, "scores": scores, "parity_ok": None if parity is None else parity["ok"]})
    return out
