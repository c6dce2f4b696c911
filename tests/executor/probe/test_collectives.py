"""hpi.executor.probe.collectives: the all-reduce schedule (group sizes 2..N in one spawned job) on gloo here,
and its CUDA-graphed figures where there are two GPUs."""

from __future__ import annotations

import pytest

from hpi.executor.probe import ProbeSettings


def test_allreduce_schedule_runs_on_cpu_with_gloo():
    """The spawned all-reduce job (group sizes 2..N, rank 0 reports) on gloo: the same code path as NCCL on GPUs."""
    pytest.importorskip("torch")
    from dataclasses import replace

    from hpi.executor.probe import measure_allreduce

    settings = replace(ProbeSettings.small(), nccl_sizes_bytes=(8 << 10, 64 << 10), nccl_iters=5, nccl_timeout_s=60)
    result = measure_allreduce(3, settings, backend="gloo")
    assert set(result["seconds"]) == {"2", "3"}
    assert all(t > 0 for sizes in result["seconds"].values() for t in sizes.values())
    assert set(result["seconds"]["3"]) == {str(8 << 10), str(64 << 10)}
    assert result["graphed_seconds"] == {}  # CUDA graphs only where the backend is NCCL


def test_graphed_allreduce_on_two_gpus(cuda_gpus):
    if cuda_gpus < 2:
        pytest.skip("needs 2 GPUs (NCCL)")
    from dataclasses import replace

    from hpi.executor.probe import measure_allreduce

    settings = replace(ProbeSettings.small(), nccl_sizes_bytes=(8 << 10, 1 << 20, 16 << 20), nccl_iters=20)
    result = measure_allreduce(2, settings)
    graphed, eager = result["graphed_seconds"]["2"], result["seconds"]["2"]
    assert set(graphed) == {str(8 << 10), str(1 << 20)}  # latency-bound sizes only
    assert all(0 < graphed[s] < 1e-3 for s in graphed)
    assert min(graphed.values()) <= min(eager[s] for s in graphed) * 1.1  # a graph never adds host time
