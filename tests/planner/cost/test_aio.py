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

from hpi.planner.catalog import load_model
from hpi.planner.cost.aio import (
    aio_read_efficiency,
    aio_read_factor,
    aio_read_rate,
    aio_requests,
    grid_read_rate,
)
from hpi.planner.cost.inputs import Knobs
from hpi.planner.cost.phase import decode_phase
from hpi.planner.cost.shape import DENSE, EMBED, HEAD, MOE, smallest_swapped_partition, swapped_partitions
from hpi.planner.cost.streaming import weight_stream_bytes, weight_stream_time
from hpi.planner.predict import predict
from hpi.planner.profiles import load_profile
from hpi.planner.search import nvme_buffer_elems_for
from hpi.planner.specs.hardware import AioReadPoint
from hpi.planner.specs.plan import Plan
from hpi.planner.specs.workload import Workload

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
    # without a grid every setting reads at nvme_read (0.5) of the sequential rate; with it 8 threads at
    # nvme_read_multithread (0.6) of the grid's rate, one thread at the grid's rate
    np.testing.assert_array_equal(aio_read_efficiency(plain, k), [0.5, 0.5, 0.5])
    np.testing.assert_array_equal(aio_read_efficiency(gridded, k)[:2], [0.6, 1.0])
    _, t_plain = weight_stream_time(plain, k, stream_bytes(plain, k))
    _, t_grid = weight_stream_time(gridded, k, stream_bytes(gridded, k))
    np.testing.assert_allclose(t_grid[0], t_plain[0] / factor[0] * 0.5 / 0.6)
    np.testing.assert_allclose(t_grid[1], t_plain[1] / factor[1] * 0.5)
    # one thread at 1 GB/s, where the sequential 2 GB/s x nvme_read 0.5 is 1 GB/s as well
    assert t_grid[1, DENSE] == pytest.approx(t_plain[1, DENSE]) and t_grid[1, DENSE] > 0


def test_one_thread_reads_at_the_grid_point_and_eight_at_its_multithread_share() -> None:
    """h200-1gpu's drive grid (2026-12-03): Llama-3-8B's every swapped partition (8-112 MiB, and the 1 GiB embedding
    and head) is read as 8 requests of 1 MiB in flight both by one thread at depth 8 (DeepSpeed's default) and by 8
    threads at depth 1, the grid's (1 MiB, 8) point, 1.292 GB/s: one thread reads the 16.06 GB a decode step swaps in
    at that rate (2026-12-05: one thread read at its grid point's), eight threads at 0.80 of it (2026-12-03)."""
    model, hw = load_model("llama-3-8b"), load_profile("h200-1gpu")
    assert hw.efficiency.nvme_read_multithread == 0.80
    assert grid_read_rate(hw.nvme.read_grid, MIB, 8) == pytest.approx(1.292e9)
    base = Plan(offload="nvme", nvme_buffer_elems=nvme_buffer_elems_for(model, 1, 1), aio_block_size_bytes=MIB)
    one, eight = base.with_(aio_queue_depth=8, aio_threads=1), base.with_(aio_queue_depth=1, aio_threads=8)
    workload = Workload(prompt_len_tokens=32, gen_len_tokens=3)
    swapped = sum(elems * (model.n_layers if module.startswith("dense_layer.") else 1)
                  for module, elems in swapped_partitions(model, 1, 1)) * 2  # 32 layers of 416 MiB, 2 x 1002 MiB
    assert swapped == 15316 * MIB
    nvme_s = {p.aio_threads: predict(model, hw, workload, p).decode_link["nvme_s"] for p in (one, eight)}
    assert nvme_s[1] == pytest.approx(swapped / 1.292e9, rel=1e-3)  # 12.43 s
    assert nvme_s[8] == pytest.approx(swapped / (0.80 * 1.292e9), rel=1e-3)  # 15.54 s
