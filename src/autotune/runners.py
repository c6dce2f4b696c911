"""What answers a trial: a real run through the executor, or the hidden machine of ``--simulate``.

Every runner has ``run(plan, out_dir, timeout_s, note, noise_key=...) -> hpi.records.RunRecord`` and signals
failure with ``RunFailed`` (kind ``oom`` | ``crash`` | ``timeout``), or ``KeyboardInterrupt`` when the run
was interrupted (the study then re-queues the trial). Nothing here imports torch: the executor's launcher
starts the ranks in processes of their own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpi.autotune.simulate import SimulatedOutOfMemory, SimulatedRunner
from hpi.planner.specs.plan import Plan, ds_examples_knobs
from hpi.planner.specs.workload import Workload
from hpi.processes import Interrupted
from hpi.records import RunRecord

_SIZE = re.compile(r"\d+(?:\.\d+)?\s*(?:[KMGTP]i?B|bytes)\b")
REPO = Path(__file__).resolve().parents[2]


class RunFailed(Exception):
    """A trial that produced no record. ``kind``: oom | crash | timeout; ``where``: gpu | host (oom)."""

    def __init__(self, kind: str, message: str, *, where: str = "gpu", figures: tuple[str, ...] = (),
                 log_dir: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.where = where
        self.figures = figures
        self.log_dir = log_dir

    @property
    def summary(self) -> str:
        return str(self).splitlines()[0] if str(self) else self.kind


def _oom_where(message: str) -> str:
    """Which memory ran out: the CUDA allocator's words name the GPU, anything else is host memory."""
    return "gpu" if re.search(r"CUDA|cuda|GPU", message) else "host"


@dataclass(frozen=True)
class ExecutorRunner:
    """Real runs: one ``hpi.executor.launch`` per trial, on this node's GPUs (or the CPU for tests)."""

    model: str  # as the user named it: catalogue name, config.json or checkpoint directory
    hardware: str
    workload: Workload
    device: str = "cuda"
    dtype: str = "bf16"
    warmup_steps: int = 1
    nvme_path: str | None = None
    checkpoint: str | None = None

    def graphs_for(self, plan: Plan) -> bool:
        """Whether this trial decodes through CUDA graphs: where the workload asks for them and the plan allows
        them, the rule the planner prices each candidate by (``cost.overhead.graphed_forwards``), so that a
        trial measures the decode the study predicted for it."""
        from hpi.planner.catalog import load_model
        from hpi.planner.specs.plan import decode_graph_blocker

        if not self.workload.decode_graphs:
            return False
        return decode_graph_blocker(plan, load_model(self.checkpoint or self.model)) is None

    def deployment(self, plan: Plan, out_dir: str | None, note: dict[str, Any]):
        """The trial's deployment, through the path every run takes (``hpi.deployment.resolve_deployment``).
        The study chose to run this plan with its own calibrated predictions (a plan they say overflows is
        recorded, never launched), so the profile's uncalibrated prediction must not veto it: forced."""
        from hpi.deployment import resolve_deployment
        from hpi.executor.spec import RunSpec

        spec = RunSpec(plan=plan, model=self.model, workload=self.workload, hardware=self.hardware,
                       device=self.device, dtype=self.dtype, checkpoint=self.checkpoint, nvme_path=self.nvme_path,
                       out_dir=str(out_dir), warmup_steps=self.warmup_steps, extra={"autotune": note})
        graphs = self.graphs_for(plan)
        # None: where hpi run would (a GPU; compiled and stacked where graphed, fused where quantized: hpi.deployment)
        return resolve_deployment(spec, decode_graphs=graphs,
                                  decode_compile=None if graphs and self.workload.decode_compile else False,
                                  fused_dequant=None if self.workload.fused_dequant else False,
                                  skinny_gemm=None if graphs and self.workload.skinny_gemm else False, force=True)

    def run(self, plan: Plan, out_dir: str | None, timeout_s: float | None, note: dict[str, Any], *,
            noise_key: int = 0) -> RunRecord:
        from hpi.executor.launch import LaunchError, start

        deployment = self.deployment(plan, out_dir, note)
        try:
            return start(deployment, timeout_s=timeout_s)
        except LaunchError as e:
            if e.reason == "interrupted":
                raise Interrupted(e.signum or signal.SIGINT) from None  # which signal: the trial's record says
            if e.out_of_memory:
                first = str(e).splitlines()[0]
                raise RunFailed("oom", str(e), where=_oom_where(first), figures=tuple(_SIZE.findall(first)),
                                log_dir=e.log_dir) from None
            raise RunFailed("timeout" if e.reason == "timeout" else "crash", str(e), log_dir=e.log_dir) from None


@dataclass(frozen=True)
class SimRunner:
    """``SimulatedRunner`` with its out-of-memory mapped to ``RunFailed`` like a real one."""

    inner: SimulatedRunner

    def run(self, plan: Plan, out_dir: str | None, timeout_s: float | None, note: dict[str, Any], *,
            noise_key: int = 0) -> RunRecord:
        try:
            return self.inner.run(plan, out_dir, timeout_s, note, noise_key=noise_key)
        except SimulatedOutOfMemory as e:
            raise RunFailed("oom", str(e), where=e.where, figures=e.figures) from None


# ---- baselines -----------------------------------------------------------------------------------------

BASELINES = ("ds-examples", "ds-examples-knobs")


def ds_examples_plan(hidden_size: int, batch: int, pin_memory: bool = True) -> Plan:
    """DeepSpeedExamples' ZeRO-Inference knobs (run_model.py) as an hpi plan: CPU offload, 16-bit weights,
    prefetch bucket = max live = 2 h^2, persistence threshold = h (its published scripts pin memory)."""
    return Plan(offload="cpu", pin_memory=pin_memory, batch_size=batch, **ds_examples_knobs(hidden_size))


@dataclass(frozen=True)
class RecipeRunner:
    """DeepSpeedExamples' own recipe (benchmarks/baselines.py ds-examples): the whole HF model under ZeRO-3
    with HF ``generate``, one torchrun process; CUDA only, from a repository checkout."""

    model: str
    workload: Workload
    script: Path = REPO / "benchmarks" / "baselines.py"

    def command(self, batch: int, port: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(port),
                str(self.script), "ds-examples", "--model", self.model, "--batch", str(batch),
                "--prompt-len", str(self.workload.prompt_len_tokens), "--gen-len", str(self.workload.gen_len_tokens)]

    def run(self, batch: int, out_dir: Path, timeout_s: float | None) -> dict[str, Any]:
        from hpi.executor.launch import free_port

        if not self.script.is_file():
            raise RunFailed("crash", f"--baseline ds-examples runs {self.script}, which is missing: run hpi autotune "
                                     "from a repository checkout, or use --baseline ds-examples-knobs")
        out_dir.mkdir(parents=True, exist_ok=True)
        cmd = self.command(batch, free_port())
        started = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except subprocess.TimeoutExpired:
            raise RunFailed("timeout", f"DeepSpeedExamples recipe timed out after {timeout_s:g} s") from None
        (out_dir / "recipe.log").write_text(proc.stdout[-20000:] + "\n--- stderr ---\n" + proc.stderr[-20000:])
        if proc.returncode != 0:
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            kind = "oom" if "out of memory" in proc.stderr.lower() else "crash"
            raise RunFailed(kind, f"DeepSpeedExamples recipe exited {proc.returncode}: {tail}")
        lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
        if not lines:
            raise RunFailed("crash", f"DeepSpeedExamples recipe printed no JSON result (log: {out_dir / 'recipe.log'})")
        result = json.loads(lines[-1])
        result["command"] = cmd
        result["wall_s"] = result.get("wall_s", time.perf_counter() - started)
        return result
