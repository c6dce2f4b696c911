"""cost.aio: the NVMe read rate a plan's aio knobs reach, from the probe's read grid.

The grid below: 1 MiB requests read at 1 GB/s one at a time and 4 GB/s sixteen at a time; 4 MiB requests at 2 and
8 GB/s. toy_dense (tp 1, dp 1) swaps q and o (2 MiB each), gate, up and down (8 MiB each) per layer and the
embedding and head (62.5 MiB each); k and v (512 KiB) stay in CPU memory (under DeepSpeed's 1 MiB floor).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from hpi.planner.cost.aio import aio_read_factor, aio_read_rate, aio_requests, grid_read_rate
from hpi.planner.cost.inputs import Knobs
from hpi.planner.cost.phase import decode_phase
from hpi.planner.cost.shape import DENSE, EMBED, HEAD, MOE, smallest_swapped_partition
from hpi.planner.cost.streaming import weight_stream_bytes, weight_stream_time
from hpi.planner.specs.hardware import AioReadPoint
from hpi.planner.specs.plan import Plan

MIB = 1 << 20
GRID = (AioReadPoint(MIB, 1, 1e9), AioReadPoint(MIB, 16, 4e9), AioReadPoint(4 * MIB, 1, 2e9),
        AioReadPoint(4 * MIB, 16, 8e9))


def stream_bytes(lay, k):
    return weight_stream_bytes(lay, k, decode_phase(lay, k), k.bytes_per_weight(lay.table.fetch_matrix_fraction))


def with_grid(kit, grid=GRID):
    hw = kit.make_hardware()
    return replace(hw, nvme=replace(hw.nvme, read_grid=grid))


def test_grid_interpolates_in_log_space_and_holds_its_edges() -> None:
    assert grid_read_rate(GRID, MIB, 1) == pytest.approx(1e9)
    assert grid_read_rate(GRID, MIB, 4) == pytest.approx(2e9)  # halfway from 1 to 16 in log: the geometric mean
    assert grid_read_rate(GRID, 2 * MIB, 4) == pytest.approx(math.sqrt(2e9 * 4e9))  # then halfway 1 -> 4 MiB
    assert grid_read_rate(GRID, MIB, 128) == pytest.approx(4e9)  # beyond the queue depths measured: the edge
    assert grid_read_rate(GRID, 64 * MIB, 1) == pytest.approx(2e9)  # beyond the request sizes measured


def test_requests_follow_deepspeeds_split_of_a_read() -> None:
    """Each thread reads partition / threads in blocks, queue depth of them at once."""
    assert aio_requests(8 * MIB, MIB, 8, 8) == (MIB, 8)  # 1 MiB per thread: one block each
    assert aio_requests(32 * MIB, 16 * MIB, 64, 8) == (4 * MIB, 8)  # a block larger than a thread's slice
    assert aio_requests(64 * MIB, MIB, 4, 2) == (MIB, 8)  # 32 blocks per thread, 4 in flight each
    assert aio_requests(64 * MIB, MIB, 64, 2) == (MIB, 64)  # the depth is bounded by the blocks


def test_plan_rate_is_the_grid_rate_over_each_kinds_swapped_partitions(kit) -> None:
    model, hw = kit.toy_dense(), with_grid(kit)
    assert smallest_swapped_partition(model, 1, 1) * 2 == 2 * MIB  # q and o
    # one thread, depth 1, 1 MiB blocks: every request reads at the grid's (1 MiB, 1), 1 GB/s
    assert aio_read_rate(model, 1, 1, hw.nvme, MIB, 1, 1)[DENSE] == pytest.approx(1e9)
    # 8 threads, depth 64: a layer's q and o are 8 requests of 256 KiB each, gate/up/down 8 of 1 MiB: all at the
    # 1 MiB row's 8 in flight, 2^(3/4) GB/s; the embedding 8 threads x min(64, 8 blocks) of 1 MiB: 64 in flight,
    # beyond the grid: its 4 GB/s edge. The MoE kind swaps nothing here: the sequential figure.
    rates = aio_read_rate(model, 1, 1, hw.nvme, MIB, 64, 8)
    assert rates[DENSE] == pytest.approx(2 ** 1.5 * 1e9)
    assert rates[EMBED] == rates[HEAD] == pytest.approx(4e9)
    assert rates[MOE] == kit.NVME_READ
    # a 4 MiB block, depth 1, 1 thread: q/o read in one 2 MiB request (1 -> 4 MiB halfway: sqrt(2) GB/s),
    # gate/up/down in two 4 MiB requests, one at a time (2 GB/s): bytes over summed times
    sizes = [(2 * MIB, math.sqrt(2) * 1e9)] * 2 + [(8 * MIB, 2e9)] * 3
    expected = sum(s for s, _ in sizes) / sum(s / r for s, r in sizes)
    assert aio_read_rate(model, 1, 1, hw.nvme, 4 * MIB, 1, 1)[DENSE] == pytest.approx(expected)


def test_nvme_time_scales_with_the_grid_and_not_without_it(kit) -> None:
    model = kit.toy_dense()
    plans = [Plan(offload="nvme"), Plan(offload="nvme", aio_queue_depth=1, aio_threads=1), Plan(offload="cpu")]
    k = Knobs.from_plans(plans)
    plain = kit.arrangement(model)
    np.testing.assert_array_equal(aio_read_factor(plain, k), np.ones((3, 4)))  # no grid: today's figures
    gridded = kit.arrangement(model, hardware=with_grid(kit))
    factor = aio_read_factor(gridded, k)
    np.testing.assert_allclose(factor[1], [0.5, 1.0, 0.5, 0.5])  # 1 GB/s of the 2 GB/s sequential; MoE swaps nothing
    np.testing.assert_array_equal(factor[2], np.ones(4))  # CPU offload reads no NVMe
    _, t_plain = weight_stream_time(plain, k, stream_bytes(plain, k))
    _, t_grid = weight_stream_time(gridded, k, stream_bytes(gridded, k))
    np.testing.assert_allclose(t_grid[:2], t_plain[:2] / factor[:2])
    assert t_grid[1, DENSE] == pytest.approx(2 * t_plain[1, DENSE]) and t_grid[1, DENSE] > 0
