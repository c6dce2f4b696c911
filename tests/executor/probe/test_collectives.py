"""hpi.executor.probe.collectives: the all-reduce schedule (group sizes 2..N in one spawned job) on gloo here,
and its CUDA-graphed figures where there are two GPUs.

Each job runs in a child interpreter: spawning the ranks starts multiprocessing's resource tracker, a process
that lives as long as the interpreter that spawned them, and pytest's own process must keep no child behind
(tests/executor/test_launch.py asserts it after every launch)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def allreduce_in_child(n_ranks: int, backend: str, **settings: object) -> dict:
    """``measure_allreduce(n_ranks, replace(ProbeSettings.small(), **settings), backend)`` in a fresh interpreter."""
    code = ("import json, sys\nfrom dataclasses import replace\n"
            "from hpi.executor.probe import ProbeSettings, measure_allreduce\n"
            "n, backend, settings = json.loads(sys.argv[1])\n"
            "settings = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}\n"
            "print(json.dumps(measure_allreduce(n, replace(ProbeSettings.small(), **settings), backend=backend)))\n")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([n_ranks, backend, settings])], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_allreduce_schedule_runs_on_cpu_with_gloo():
    """The spawned all-reduce job (group sizes 2..N, rank 0 reports) on gloo: the same code path as NCCL on GPUs."""
    pytest.importorskip("torch")
    result = allreduce_in_child(3, "gloo", nccl_sizes_bytes=(8 << 10, 64 << 10), nccl_iters=5, nccl_timeout_s=60)
    assert set(result["seconds"]) == {"2", "3"}
    assert all(t > 0 for sizes in result["seconds"].values() for t in sizes.values())
    assert set(result["seconds"]["3"]) == {str(8 << 10), str(64 << 10)}
    assert result["graphed_seconds"] == {}  # CUDA graphs only where the backend is NCCL


def test_graphed_allreduce_on_two_gpus(cuda_gpus):
    if cuda_gpus < 2:
        pytest.skip("needs 2 GPUs (NCCL)")
    result = allreduce_in_child(2, "nccl", nccl_sizes_bytes=(8 << 10, 1 << 20, 16 << 20), nccl_iters=20)
    graphed, eager = result["graphed_seconds"]["2"], result["seconds"]["2"]
    assert set(graphed) == {str(8 << 10), str(1 << 20)}  # latency-bound sizes only
    assert all(0 < graphed[s] < 1e-3 for s in graphed)
    assert min(graphed.values()) <= min(eager[s] for s in graphed) * 1.1  # a graph never adds host time
