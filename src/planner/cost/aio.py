"""NVMe reads through DeepSpeed's aio: the read rate a plan's ``aio_*`` knobs reach, from the probe's grid.

DeepSpeed 0.19.8 reads each swapped partition of P bytes with ``aio_threads`` threads, each taking its P/threads
slice and submitting it in ``aio_block_size_bytes`` requests, ``aio_queue_depth`` of them in flight
(ops/csrc/aio/py_lib/deepspeed_cpu_op.cpp: ``_num_bytes_per_thread`` per thread; common/deepspeed_aio_common.cpp
``_do_io_submit_blocks``). So one partition's read is ``threads x min(depth, blocks per thread)`` requests of
``min(block, P / threads)`` bytes each: a 32 MiB partition with 8 threads and 16 MiB blocks is 8 requests of
4 MiB, whatever the queue depth.

The probe times O_DIRECT reads of the drive at a small grid of (request bytes, requests in flight)
(``hpi.executor.probe.disk.measure_read_grid``, kept in the profile as ``nvme.read_grid``). A plan's rate is
the grid's, interpolated in log space (rates grow roughly with the log of the request size and of the queue
depth until the drive saturates; beyond the grid's edges the edge value holds), harmonically averaged over the
partitions of each module kind a rank swaps (each read in turn). The cost model scales the topology's NVMe
rate (the profile's sequential ``read_bytes_s``, shared among the ranks reading at once) by that rate over
``read_bytes_s``, and by the share of it DeepSpeed reaches (``aio_read_efficiency``): all of it with one aio thread,
``Efficiency.nvme_read_multithread`` with more. A profile without a grid prices every aio setting at
``read_bytes_s`` x ``Efficiency.nvme_read``, as before the grid existed.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from hpi.planner.cost.inputs import COMPUTE_BYTES, Arrangement, Knobs
from hpi.planner.cost.shape import KIND_NAMES, N_KINDS, swapped_partitions
from hpi.planner.specs.hardware import AioReadPoint, NvmeSpec
from hpi.planner.specs.model import ModelSpec

__all__ = ["grid_read_rate", "aio_requests", "aio_read_rate", "aio_read_factor", "aio_read_efficiency"]


def grid_read_rate(grid: tuple[AioReadPoint, ...], request_bytes: float, in_flight: float) -> float:
    """The read rate at (``request_bytes``, ``in_flight``): per measured request size, log-log interpolation
    over the requests in flight; then log-log interpolation between the request sizes; edge values beyond."""
    sizes = sorted({p.request_bytes for p in grid})
    at_size = []
    for size in sizes:
        row = sorted((p.in_flight, p.read_bytes_s) for p in grid if p.request_bytes == size)
        at_size.append(np.interp(math.log(in_flight), [math.log(q) for q, _ in row], [math.log(r) for _, r in row]))
    return float(math.exp(np.interp(math.log(request_bytes), [math.log(s) for s in sizes], at_size)))


def aio_requests(partition_bytes: float, block_bytes: float, queue_depth: float,
                 threads: float) -> tuple[float, float]:
    """(bytes per request, requests in flight) of DeepSpeed's read of one partition (module docstring)."""
    per_thread = partition_bytes / threads
    blocks_per_thread = math.ceil(per_thread / block_bytes)
    return min(block_bytes, per_thread), threads * min(queue_depth, blocks_per_thread)


@lru_cache(maxsize=4096)
def aio_read_rate(model: ModelSpec, tp: int, dp: int, nvme: NvmeSpec, block_bytes: float, queue_depth: float,
                  threads: float) -> tuple[float, ...]:
    """Bytes/s one rank reads each module kind's swapped partitions at (``shape.swapped_partitions``, 16-bit), one
    after the other, each at the grid's rate for its requests: a kind's bytes over the sum of its reads' times;
    ``read_bytes_s`` for a kind that swaps nothing, and for every kind without a grid."""
    rates = []
    for kind in KIND_NAMES:
        sizes = [elems * COMPUTE_BYTES for module, elems in swapped_partitions(model, tp, dp)
                 if module.startswith(f"{kind}.")]
        if not nvme.read_grid or not sizes:
            rates.append(nvme.read_bytes_s)
            continue
        seconds = sum(size / grid_read_rate(nvme.read_grid, *aio_requests(size, block_bytes, queue_depth, threads))
                      for size in sizes)
        rates.append(sum(sizes) / seconds)
    return tuple(rates)


def aio_read_factor(arrangement: Arrangement, knobs: Knobs) -> np.ndarray:
    """(N, kinds) each plan's aio read rate per module kind over the profile's sequential ``read_bytes_s`` (1
    without a grid, and where the plan does not offload to NVMe)."""
    a, nvme = arrangement, arrangement.hardware.nvme
    if nvme is None or not nvme.read_grid:
        return np.ones((knobs.n, N_KINDS))
    settings = np.stack([knobs.aio_block_size_bytes, knobs.aio_queue_depth, knobs.aio_threads], axis=1)
    unique, inverse = np.unique(settings, axis=0, return_inverse=True)
    rates = np.array([aio_read_rate(a.model, a.tp, a.dp, nvme, *map(float, row)) for row in unique])
    return np.where(knobs.offload_nvme[:, None], rates[inverse.ravel()] / nvme.read_bytes_s, 1.0)


def aio_read_efficiency(arrangement: Arrangement, knobs: Knobs) -> np.ndarray:
    """(N,) the share of the rate ``aio_read_factor`` prices that each plan's aio reads reach.

    With the probe's grid, one aio thread reads at the grid's rate for its requests: on one H200's disk DeepSpeed's
    defaults (1 MiB blocks, depth 8, one thread) read the Llama-3-8B at 1.23 GB/s where the grid's (1 MiB, 8 in
    flight) read 1.23, 4 MiB blocks at 1.28 against the grid's 1.27 (benchmarks/results/2026-12-05-h200-issue20,
    SUMMARY.md "NVMe", call3/aio/records.json and aio_probe.json). More threads read below it
    (``Efficiency.nvme_read_multithread``: eight threads at depth 64 read 0.75-0.85 of the grid, 2026-12-03). The
    five runs cannot tell the thread count from the requests in flight (the eight threads kept 32-64 in flight, the
    one thread at most 8); the rule keys on the thread count, the knob the two days' runs changed. Without a grid,
    ``Efficiency.nvme_read`` of the sequential rate, whatever the settings."""
    eff, nvme = arrangement.hardware.efficiency, arrangement.hardware.nvme
    if nvme is None or not nvme.read_grid:
        return np.full(knobs.n, eff.nvme_read)
    return np.where(knobs.aio_threads > 1, eff.nvme_read_multithread, 1.0)
