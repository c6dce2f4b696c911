"""A machine or cluster as the cost model sees it: components, ceilings and efficiency coefficients.

Every number in a profile YAML carries its provenance (``datasheet``, ``probed``, ``measured``,
``published``, ``calibrated`` or ``assumed``) in ``HardwareProfile.provenance``, keyed by the dotted field
path (``gpu.memory_bytes``, ``efficiency.h2d_stream_pinned`` ...). The dataclasses themselves hold plain
floats so the cost model can do arithmetic (and numpy broadcasting) on them directly.

Links and how they are shared live in the topology graph (``hpi.planner.topology``), built from the profile's
``node.links`` and ``cluster`` sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

PROVENANCE_KINDS = ("datasheet", "probed", "measured", "published", "calibrated", "assumed")
OS_KINDS = ("linux", "windows", "wsl2")


@dataclass(frozen=True)
class Provenance:
    source: str  # one of PROVENANCE_KINDS
    note: str = ""  # where the number comes from: a datasheet, a command and date, a paper


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: float
    bf16_flops: float  # dense peak FLOP/s for 16-bit matmuls
    hbm_bandwidth_bytes_s: float
    int8_flops: float = 0.0  # 0: same as bf16 (weight-only quantization computes in 16 bit anyway)


@dataclass(frozen=True)
class HostSpec:
    dram_bytes: float
    pinnable_bytes: float  # how much page-locked memory the OS lets us take (a scarcer budget than DRAM)
    cpu_cores: int
    sockets: int = 1
    h2d_pageable_bytes_s: float = 0.0  # per stream, pageable (staged through a bounce buffer by the driver)
    d2h_pageable_bytes_s: float = 0.0


@dataclass(frozen=True)
class AioReadPoint:
    """One point of the probe's O_DIRECT read grid (``hpi.executor.probe.disk.measure_read_grid``): the read
    rate of the node's array with ``in_flight`` requests of ``request_bytes`` each outstanding at once."""

    request_bytes: float
    in_flight: float
    read_bytes_s: float


@dataclass(frozen=True)
class NvmeSpec:
    capacity_bytes: float
    read_bytes_s: float  # sequential O_DIRECT read of the whole array (all devices of a node together)
    write_bytes_s: float
    devices: int = 1
    # The probe's read rates by request size and requests in flight (cost.aio prices a plan's aio knobs from
    # it); empty for a profile written before the probe measured it: every aio setting then reads at
    # read_bytes_s.
    read_grid: tuple[AioReadPoint, ...] = ()


@dataclass(frozen=True)
class Efficiency:
    """Fractions of a ceiling that real runs reach, and fixed overheads.

    A fraction applies to the ceiling the profile states, whatever its provenance: a datasheet peak
    (where the fraction carries the whole gap) or a probed rate such as a measured 8192^3 matmul (where
    it carries only what a real model's kernels lose beyond that); calibration fits it either way.

    Defaults are where no better number is known; profiles override them with measured or calibrated
    values (``hpi calibrate`` writes the ``calibrated`` ones). Each is used in exactly one cost module.
    """

    # Prefill's GEMMs and attention, of a measured 8192^3 matmul rate (what ``hpi probe`` writes as bf16_flops);
    # prefill's element-wise chains are their own term (cost.activations). Fitted to the 157 prefills of
    # validation/fidelity_set.yaml (1x H100, 1x/2x/4x H200; 8B-70B, tp 1-4, resident and streamed): median |error|
    # 6.6% at 0.84-0.85 (0.80: 8.5%, 0.90: 9.2%); 0.60 before that term, 13.9%. A profile whose bf16_flops is a
    # datasheet peak states its own (0.66: 0.85 x the H100's measured 775 over its datasheet 989 TFLOP/s).
    matmul_prefill: float = 0.85  # (cost.compute)
    matmul_decode: float = 0.50  # of the bf16 ceiling, skinny decode GEMMs when compute-bound (cost.compute)
    hbm: float = 0.80  # of the HBM ceiling, decode GEMV/attention reads (cost.compute)
    # ZeRO-3 parameter fetch over the pinned PCIe ceiling (cost.streaming). The copies are back-to-back DMA
    # of whole partitions (tens to hundreds of MB), the kind of copy the probe times, so they run near its
    # rate; what DeepSpeed's stock fetch wait loses (0.62 of pinned on the H100, docs/measured-facts.md) is host time
    # in series with the copies, priced by the fetch-wait rule in cost.estimate, not a slower link.
    h2d_stream_pinned: float = 0.95
    h2d_stream_pageable: float = 0.80  # over the pageable ceiling (already a slow staged copy)
    # DeepSpeed aio over the O_DIRECT sequential ceiling, where the profile has no read grid (cost.aio).
    nvme_read: float = 0.80
    # DeepSpeed aio with more than one thread over the probe's read grid at the same requests (cost.aio; one
    # thread reads at the grid's rate). Eight threads, depth 64, 1 and 4 MiB blocks read the 8B at 1.19 GB/s,
    # 0.75-0.85 of the grid's 1.40-1.58 GB/s (benchmarks/results/2026-12-03-h200-aio/aio/records.json, SUMMARY.md).
    nvme_read_multithread: float = 0.80
    collective_bandwidth: float = 0.80  # of the link's bandwidth, ring all-reduce bus bandwidth (cost.collectives)
    # alpha of one collective on the GPU stream, NCCL's small-message time
    allreduce_latency_s: float = 20e-6  # (cost.collectives)
    # host time to issue one collective through torch.distributed
    collective_host_overhead_s: float = 50e-6  # (cost.collectives)
    # Host-bound TP decode: the ranks' launch streams drift apart and every all-reduce waits for the slowest;
    # the wait per collective, in units of the host time between two collectives (half an eager layer's
    # launches) at tp 2, growing with tp as the expected maximum of tp drifts (cost.collectives).
    collective_drift_factor: float = 1.0
    p2p_latency_s: float = 15e-6  # alpha of one stage-to-stage send (cost.pipeline)
    # share of the shorter of busy and fetch time hidden, per ZeRO-3 leaf, whatever the bucket (cost.estimate)
    prefetch_overlap: float = 1.0
    # Host (CPU) time; it runs ahead of the GPU asynchronously, so it shows only where it exceeds the GPU's
    # work (cost.estimate). Eager PyTorch issues ~40 kernels per HF Llama decoder layer (two RMSNorms ~14,
    # rotary ~10, 7 GEMMs, SDPA, cache update, activation, residuals) at ~10 us of dispatch each.
    layer_overhead_s: float = 450e-6  # host time per decoder layer per forward: kernel launches, Python (cost.overhead)
    # ZeRO-3's pre/post-forward hooks run on every module (~14 per Llama decoder layer: the layer, attention,
    # MLP, 7 linears, 2 norms, rotary, activation), each a few hundred us of Python (trace, status checks,
    # prefetch walk, release): 3 ms per layer. The 1x H100 (docs/measured-facts.md, DeepSpeed's host wait: copies and
    # hooks in series) gave 0.483 s per 8B step = 0.30 s of copies + 32 x 5.7 ms of host per layer.
    offload_layer_overhead_s: float = 3.0e-3  # ZeRO-3 hook/fetch bookkeeping per layer per forward (cost.overhead)
    # The share of offload_layer_overhead_s left where each decoder layer is one ZeRO-3 leaf (Plan.zero3_leaf layer:
    # one hook pair a layer instead of 13 for a Llama layer, all its parameters gathered by one fetch). DeepSpeed
    # 0.19.8 on a 2-core CPU, 16 Llama-shaped layers offloaded to CPU, every parameter gathered: 2.44 ms of ZeRO-3 host
    # time a layer per module, 0.93 ms as layer leaves, 0.38 (benchmarks/results/2026-12-05-cpu-zero3-leaf/SUMMARY.md).
    # What stays (a fetch and a release per parameter, the trace) is not per hook; no GPU record yet (cost.overhead).
    offload_layer_leaf_share: float = 0.38
    # Device time per decoder layer per forward that no roofline sees: ~40 kernels a layer (KERNELS_PER_LAYER),
    # each with a fixed cost beyond its bytes and FLOPs (the gap between two kernels of a stream or graph, a
    # kernel's ramp and tail; the norms, rotary, residual adds and cache writes are nothing else). ~2.5 us a
    # kernel on Hopper in a CUDA graph; ``hpi probe`` times it (a graph of tiny kernels).
    layer_device_overhead_s: float = 100e-6  # (cost.overhead)
    # The same in a compiled graphed decode step (Workload.decode_compile): inductor fuses the element-wise
    # chains, so fewer, larger kernels. One H200 left 49 us a layer of the 8B's 111 (h200-1gpu.yaml); other
    # GPUs are assumed to keep the same share until a record says otherwise (cost.overhead).
    compiled_layer_device_overhead_s: float = 45e-6  # (cost.overhead)
    # Decode's device time per layer grows with the rows of the forward beyond what the roofline adds: this much per
    # doubling of rows (cost.overhead.decode_row_growth). Fitted to the 22 graphed decode records at batch 8-64 of
    # validation/fidelity_set.yaml (1x H100 8B b16/b64; 2x H200 8B tp1/tp2/pp2; 4x H200 70B tp1-4/pp2-4 b8/b32; 1x
    # H200 8B b16/b64, compiled and not): without it each is under-predicted (median -9.9%, worst -20%; the same
    # runs at batch 1 within 1-8%); 5.5 us a doubling leaves a signed median of -0.2%, worst -13% (2x H200 pp2 b16).
    # Fitted per machine the value spreads: 5 us on the H100 and the 4x H200 (70B), 8 us and more on the 1x and
    # 2x H200 (8B), whose batch-16/64 steps grow most. The sweep (--profiles for one machine):
    # benchmarks/fidelity_sweep.py layer_device_s_per_row_doubling 0 2e-6 4e-6 5.5e-6 8e-6.
    layer_device_s_per_row_doubling: float = 5.5e-6  # (cost.overhead)
    # Device time a layer saves with hpi's stacked few-row products in a graphed step (Workload.skinny_gemm;
    # hpi.executor.skinny_gemm; cost.overhead.skinny_saving). Two H100s, the 8B in hpi run with torch's products and
    # with hpi's on one build each (benchmarks/results/2026-12-06-skinny-switch, calls 1 and 3): eager graph batch 1
    # 8.532 -> 8.100 and 8.571 -> 8.110 ms (13.5 and 14.4 us a layer: the stacking alone, against cuBLAS's
    # matrix-vector kernels), compiled batch 1 5.909 -> 5.838 and 5.873 -> 5.824 (2.2 and 1.5 us: inductor's
    # reductions were good already; 5.5 us in graph replays, 2026-12-06-skinny/call3), batch 16 eager graph 9.794 ->
    # 9.263 and 9.794 -> 9.265, compiled 7.444 -> 6.847 and 7.520 -> 6.863 ms (16.6, 16.5, 18.7, 20.5 us: the same
    # kernel against the same cuBLAS products in both modes). Each the mean of its measurements; other GPUs are
    # assumed to save the same until a record says otherwise.
    stacked_layer_device_saving_s: float = 14.0e-6  # (cost.overhead)
    compiled_stacked_layer_device_saving_s: float = 1.9e-6  # (cost.overhead)
    skinny_layer_device_saving_s: float = 18.1e-6  # at 16 rows (cost.overhead)
    # Per stage forward: the executor's device synchronize, sampling and input preparation, ~20 small
    # kernels (embedding, final norm, head, argmax, token and position bookkeeping) at ~10 us each plus the
    # loop's Python.
    step_overhead_s: float = 0.5e-3  # per forward of each stage outside layers (cost.overhead)
    # A decode step replayed as a CUDA graph: the graph's launch, the step's input copies, sampling and the
    # synchronization; the embedding, final norm and head run inside the graph, so none of their launches.
    # ``hpi probe`` times it (real layers in graphed decode, the step less its layers and head): 142-167 us
    # on the H100 and H200.
    graphed_step_overhead_s: float = 0.2e-3  # (cost.overhead)
    # DeepSpeed's dequantization of 8/4-bit weights (cost.dequant): its chain of torch element-wise ops (17 bytes an
    # element for 4-bit bf16, 13 for 8-bit) ran at 0.33 of the H200's HBM rate on the 70B's large weights, 4-bit and
    # 8-bit alike (benchmarks/dequant_bench.py: 28672 x 8192 4-bit in 2.86 ms, 8-bit in 2.21 ms; 2026-12-04,
    # benchmarks/results/2026-12-04-h200-fused/call2), far from a copy's rate. Other GPUs are assumed to keep the
    # same share until a record says otherwise; DeepSpeed's fp16 4-bit CUDA kernel (not built on our machines) is
    # assumed at it too.
    dequant_hbm: float = 0.33
    # hpi's fused dequantization kernel (Workload.fused_dequant; hpi.executor.dequant): 2.56 bytes an element of
    # a 4-bit bf16 weight at 0.22 of the H200's HBM rate (benchmarks/dequant_bench.py, 28672 x 8192: 0.633 ms,
    # 2026-12-04, benchmarks/results/2026-12-04-h200-fused/call2); it hides behind the copies (cost.estimate).
    fused_dequant_hbm: float = 0.22
    # CUDA context and allocator slack per GPU: outside torch's allocations
    gpu_reserved_bytes: float = 1.5e9  # (cost.memory)
    # cuBLAS/cuBLASLt workspace torch allocates per GPU: 8 chunks of 4096 KiB by default on Hopper
    # (PyTorch CUBLAS_WORKSPACE_CONFIG=:4096:8); the tiny-model records allocate 44 MB for 11 MB of tensors.
    gpu_workspace_bytes: float = 33_554_432.0  # (cost.memory)
    host_reserved_bytes: float = 4e9  # per rank process: torch/DeepSpeed libraries and runtime (cost.memory)
    gpu_memory_usable: float = 0.97  # fraction of the GPU's memory a run may plan to use (usable_gpu_bytes)
    dram_usable: float = 0.90  # fraction of DRAM a run may plan to use, the OS keeps the rest (usable_dram_bytes)


def is_fraction(name: str) -> bool:
    """Whether an Efficiency field is a fraction of a ceiling, in (0, 1]; the others are seconds (``_s``),
    bytes (``_bytes``) or dimensionless factors (``_factor``), any positive value."""
    return not name.endswith(("_s", "_bytes", "_factor"))


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    description: str
    os: str
    n_nodes: int
    gpus_per_node: int
    gpu: GpuSpec
    host: HostSpec  # per node
    nvme: NvmeSpec | None  # per node; None when there is no usable NVMe
    efficiency: Efficiency = Efficiency()
    provenance: Mapping[str, Provenance] = field(default_factory=dict, compare=False, hash=False)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def n_gpus(self) -> int:
        return self.n_nodes * self.gpus_per_node

    @property
    def has_nvme(self) -> bool:
        return self.nvme is not None and self.nvme.capacity_bytes > 0

    @property
    def usable_gpu_bytes(self) -> float:
        """GPU memory a plan may fill, per GPU: the rest is kept back (``Efficiency.gpu_memory_usable``)."""
        return self.gpu.memory_bytes * self.efficiency.gpu_memory_usable

    @property
    def usable_dram_bytes(self) -> float:
        """CPU RAM a plan may fill, per node: the OS keeps the rest (``Efficiency.dram_usable``)."""
        return self.host.dram_bytes * self.efficiency.dram_usable
