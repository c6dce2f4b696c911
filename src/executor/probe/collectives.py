"""All-reduce over the node's GPUs: NCCL (gloo on CPU, so CI runs the same schedule) for every group size
2..N in one spawned job, eager and, for the latency-bound sizes a decode step issues, captured in a CUDA
graph (the GPU's time per collective with no host in between)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from hpi import atomic
from hpi.executor.probe.settings import ProbeSettings

__all__ = ["GRAPHED_MAX_BYTES", "GRAPHED_CALLS", "measure_allreduce", "size_words"]


GRAPHED_MAX_BYTES = 1 << 20  # all-reduces this small are latency-bound: the ones a decode step issues
GRAPHED_CALLS = 20  # back-to-back all-reduces per captured graph


def _allreduce_worker(rank: int, world: int, backend: str, init_file: str, sizes: Sequence[int], iters: int,
                      out_path: str) -> None:
    """One rank: all-reduce bf16 of each size over ranks 0..k-1 for every k in 2..world; rank 0 writes seconds.

    backend "nccl" on GPU rank (the probe); "gloo" on CPU runs the same schedule so CI tests the machinery.
    On GPUs the latency-bound sizes are timed a second way, captured as a CUDA graph (``_graphed_seconds``):
    the eager loop's time per call is the larger of the GPU's and the host's (torch.distributed's dispatch
    and NCCL's enqueue), the graph's is the GPU's alone.
    """
    import torch
    import torch.distributed as dist

    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off on the lent machines
    cuda = backend == "nccl"
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    barrier_kw = {"device_ids": [rank]} if cuda else {}
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    seconds: dict[str, dict[str, float]] = {}
    graphed: dict[str, dict[str, float]] = {}

    def slowest(elapsed_s: float, group) -> float:
        t = torch.tensor([elapsed_s], device=device, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)  # the slowest rank sets the pace
        return float(t.item())

    for k in range(2, world + 1):
        group = dist.new_group(list(range(k)))  # every rank must enter new_group, members or not
        if rank < k:
            seconds[str(k)], graphed[str(k)] = {}, {}
            for size in sizes:
                buf = torch.zeros(size // 2, dtype=torch.bfloat16, device=device)  # zeros: no overflow to inf
                n_iters = max(5, iters if size <= (16 << 20) else iters // 2)
                for _ in range(5):
                    dist.all_reduce(buf, group=group)
                sync()
                dist.barrier(group=group, **barrier_kw)
                start = time.perf_counter()
                for _ in range(n_iters):
                    dist.all_reduce(buf, group=group)
                sync()
                seconds[str(k)][str(size)] = slowest((time.perf_counter() - start) / n_iters, group)
                if cuda and size <= GRAPHED_MAX_BYTES:
                    per_call = _graphed_seconds(torch, dist, buf, group, replays=max(3, iters // 4))
                    dist.barrier(group=group, **barrier_kw)
                    graphed[str(k)][str(size)] = slowest(per_call, group)
                del buf
        dist.barrier(**barrier_kw)
    if rank == 0:
        atomic.write_json(out_path, {"seconds": seconds, "graphed_seconds": graphed if cuda else {}}, indent=None)
    dist.destroy_process_group()


def _graphed_seconds(torch: Any, dist: Any, buf: Any, group: Any, replays: int) -> float:
    """Seconds per all-reduce of ``GRAPHED_CALLS`` back-to-back all-reduces captured as one CUDA graph and
    replayed: the GPU's time per collective with no host in between, as in a graphed decode step
    (hpi.executor.graphs). Warmed up on a side stream first, as the executor does before its capture."""
    from hpi.executor.graphs import capture

    def all_reduces() -> None:
        for _ in range(GRAPHED_CALLS):
            dist.all_reduce(buf, group=group)

    graph, _ = capture(all_reduces)
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / (replays * GRAPHED_CALLS)


def measure_allreduce(n_ranks: int, settings: ProbeSettings, backend: str = "nccl") -> dict[str, Any]:
    """All-reduce times for group sizes 2..n in ONE spawned job (a process group per size), killed at the timeout."""
    import torch.multiprocessing as mp

    os.environ["NCCL_NVLS_ENABLE"] = "0"  # inherited by the ranks; see _allreduce_worker
    with tempfile.TemporaryDirectory(prefix="hpi-probe-allreduce-") as folder:
        init_file, out_path = os.path.join(folder, "init"), os.path.join(folder, "seconds.json")
        args = (n_ranks, backend, init_file, settings.nccl_sizes_bytes, settings.nccl_iters, out_path)
        ctx = mp.start_processes(_allreduce_worker, args=args, nprocs=n_ranks, join=False, start_method="spawn")
        deadline = time.monotonic() + settings.nccl_timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{backend} all-reduce did not finish in {settings.nccl_timeout_s:.0f} s")
        finally:
            for proc in ctx.processes:  # only the ranks this function started
                if proc.is_alive():
                    proc.kill()
        measured = json.loads(Path(out_path).read_text())
    return {**measured, "graphed_calls": GRAPHED_CALLS, "backend": backend, "dtype": "bf16",
            "groups": "ranks (GPUs) 0..k-1 for k = 2..N", "env": {"NCCL_NVLS_ENABLE": "0"},
            "method": "torch.distributed all_reduce, wall time of the loop / "
            "iterations after 5 warm-ups, max over ranks; graphed_seconds: the same all-reduces (sizes up to "
            f"{size_words(GRAPHED_MAX_BYTES)}) captured {GRAPHED_CALLS} to a CUDA graph, replay time / calls"}


def size_words(size: int) -> str:
    return f"{size >> 20} MB" if size >= (1 << 20) else f"{size >> 10} KB"
