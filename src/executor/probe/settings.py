"""How hard ``hpi probe`` measures (``ProbeSettings``) and the version of the document it writes."""

from __future__ import annotations

from dataclasses import dataclass

from hpi.executor.probe.disk import ReadGrid

__all__ = ["PROBE_VERSION", "GIB", "MIB", "ProbeSettings"]

PROBE_VERSION = 1
GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class ProbeSettings:
    """How hard to measure. ``full()`` aims at < 120 s on a 4-GPU machine; ``small()`` (--quick) at seconds on CPU."""

    quick: bool
    copy_bytes: int  # host<->device buffer per GPU
    copy_repeats: int
    matmul_n: int  # n of the n^3 matmul
    matmul_iters: int
    hbm_bytes: int  # device-to-device copy buffer
    nccl_sizes_bytes: tuple[int, ...]
    nccl_iters: int
    nccl_timeout_s: float
    disk_file_bytes: int
    disk_block_bytes: int
    pin_trial_bytes: int  # upper bound of the trial pin (also bounded by 10% of DRAM)
    # O_DIRECT reads by request size and requests in flight (disk.measure_read_grid): 1/4/16 MiB requests (the aio
    # block sizes the planner offers, hpi.planner.search.AIO_BLOCK_SIZES) at 1 to 128 at once, up to 256 MiB in
    # flight, 128 MiB a point: ~1.5 GB read, about a second at the 1.28 GB/s of the slowest disk we measured.
    disk_read_grid: ReadGrid | None = None
    gemv_shape: tuple[int, int] = (28672, 8192)  # a 70B MLP projection, 470 MB in bf16 (rows, columns)
    # Real decoder layers timed in graphed decode (measure_decoder_layers): each model's shape built with each
    # layer count; two shapes of different bytes separate a layer's fixed device time from its read rate.
    layer_models: tuple[str, ...] = ("llama-3-8b", "llama-3-70b")
    layer_counts: tuple[int, int] = (2, 6)
    layer_prompt_len: int = 128
    layer_gen_len: int = 32
    layer_reps: int = 3

    @classmethod
    def full(cls) -> "ProbeSettings":
        return cls(quick=False, copy_bytes=GIB, copy_repeats=5, matmul_n=8192, matmul_iters=20, hbm_bytes=GIB,
                   nccl_sizes_bytes=(8 << 10, 1 << 20, 16 << 20, 256 << 20), nccl_iters=20, nccl_timeout_s=150.0,
                   disk_file_bytes=2 * GIB, disk_block_bytes=4 * MIB, pin_trial_bytes=8 * GIB,
                   disk_read_grid=ReadGrid((MIB, 4 * MIB, 16 * MIB), (1, 8, 32, 128), 128 * MIB, 256 * MIB))

    @classmethod
    def small(cls) -> "ProbeSettings":
        return cls(quick=True, copy_bytes=64 * MIB, copy_repeats=2, matmul_n=2048, matmul_iters=3, hbm_bytes=64 * MIB,
                   nccl_sizes_bytes=(8 << 10, 1 << 20), nccl_iters=5, nccl_timeout_s=90.0,
                   disk_file_bytes=16 * MIB, disk_block_bytes=1 * MIB, pin_trial_bytes=64 * MIB,
                   disk_read_grid=ReadGrid((MIB, 4 * MIB), (1, 4), 8 * MIB, 16 * MIB),
                   gemv_shape=(4096, 4096), layer_models=("llama-3-8b",), layer_counts=(1, 3), layer_gen_len=16,
                   layer_reps=1)
