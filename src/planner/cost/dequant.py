"""Dequantization of 8/4-bit weights: DeepSpeed ZeRO-Inference dequantizes every quantized weight on each use.

DeepSpeed's ``weight_quantization.quantized_initialization`` stores the weight of every ``nn.Linear`` and
``nn.Embedding`` as packed uint8 with a 16-bit scale and minimum per group of 64, and wraps ``F.linear`` /
``F.embedding`` to dequantize the *whole* weight into a temporary 16-bit tensor before every call
(``deepspeed/inference/quantization/utils.py``: ``wrap_quantized_functional``, ``DeQuantizer.dequantize``):

- fp16 compute with 4-bit weights: one fused CUDA kernel (``dequantize_int4_to_half_experimental``) reads
  the packed half byte and the group's scale and minimum and writes the fp16 weight: 0.5 + 2c/64 + c bytes of
  HBM traffic per element (c = 2), like any fused kernel (below);
- any other case (bf16 or fp32 compute, or 8-bit weights): torch element-wise ops, per element read + written:
    ``zeros_like`` (c) + ``copy_`` uint8 -> dtype (1 + c) + ``div_(scale)`` (2c) + ``add_(min)`` (2c) = 1 + 6c,
    and for 4-bit first the unpack (``bitwise_right_shift``, a strided store, ``bitwise_and``, a strided
    store: 4 passes of half a byte read and half a byte written) = 4 more:
  bf16: 13 bytes per element for 8-bit, 17 for 4-bit; fp32: 25 and 29.
The GEMM then reads the 16-bit weight like an unquantized one (``cost.compute``).

Fused (``Workload.fused_dequant``): hpi's kernel (``hpi.executor.dequant``: a hand-written Triton kernel on CUDA, a
torch.compile one on the CPU, both bit-identical to the torch ops) replaces the chain for every bit width and dtype;
DeepSpeed's own fp16 kernel stays where it runs.
A fused kernel reads the packed weight (bits / 8 bytes), the group's scale and minimum (2c per group of
``QUANT_GROUP_SIZE``) and writes the weight once (c): 0.5 + 2c/64 + c bytes per element for 4-bit, 1 + 2c/64 + c
for 8-bit (bf16: 2.56 and 3.06 against 17 and 13), in one launch, and holds only its result.

Time: those bytes at ``Efficiency.dequant_hbm`` of the HBM ceiling (DeepSpeed's chain: 0.33 on one H200, 4-bit and
8-bit alike), hpi's kernel at ``fused_dequant_hbm`` (0.22; both measured by benchmarks/dequant_bench.py,
benchmarks/results/2026-12-04-h200-fused/call2). Either runs on the compute stream between the packed copy and the
GEMM, and ``cost.estimate`` counts it as busy time, hidden behind the copies of the next modules like the GEMMs
where those are the longer (its module docstring gives the measurements: one H200's 70B 4-bit step took the
chain's time, 0.97 s, not the copies' plus the chain's).
Host: each dequantization issues ``dequant_kernels`` extra kernels per quantized tensor, priced like the
decoder layer's own launches (``Efficiency.layer_overhead_s`` / ``KERNELS_PER_LAYER``).

Memory: the 16-bit result (and for 4-bit on the torch path the unpacked uint8 tensor) lives while its GEMM runs,
so the largest quantized tensor of a moment adds ``dequant_buffer_bytes`` per element to the GPU peak
(``cost.memory``; the 1x H100 records: 8-bit and 4-bit offload peaked 0.55 / 0.82 GB above the packed
working set of the 8B model, whose largest tensor, the 1.05 GB embedding, is 0.53 GB packed at 8 bits).
"""

from __future__ import annotations

import numpy as np

from hpi.planner.cost.compute import touched_elems_per_rank
from hpi.planner.cost.inputs import Arrangement, Knobs
from hpi.planner.cost.phase import Phase
from hpi.planner.specs.plan import QUANT_GROUP_SIZE

# Bytes of one element of the compute dtype.
DTYPE_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp32": 4.0}
# Kernels the eager HF Llama decoder layer launches per forward (Efficiency.layer_overhead_s prices them).
KERNELS_PER_LAYER = 40.0
UNPACK_BYTES_4BIT = 4.0  # shift, strided store, and, strided store: half a byte in and out each


def fused(bits: np.ndarray, compute_dtype: str, fused_dequant: bool) -> np.ndarray:
    """Whether one fused kernel dequantizes, (N,): hpi's (``Workload.fused_dequant``) for every bit width, else
    DeepSpeed's fused CUDA kernel, fp16 compute and 4-bit weights only."""
    return np.asarray(fused_dequant | ((bits == 4) & (compute_dtype == "fp16")))


def dequant_bytes_per_elem(bits: np.ndarray, compute_dtype: str, fused_dequant: bool) -> np.ndarray:
    """HBM bytes read + written per dequantized element, (N,); 0 for 16-bit weights."""
    c = DTYPE_BYTES[compute_dtype]
    torch_ops = 1.0 + 6.0 * c + np.where(bits == 4, UNPACK_BYTES_4BIT, 0.0)
    one_kernel = bits / 8.0 + 2.0 * c / QUANT_GROUP_SIZE + c  # packed in, scale + min per group, the weight out
    out = np.where(fused(bits, compute_dtype, fused_dequant), one_kernel, torch_ops)
    return np.where(bits < 16, out, 0.0)


def dequant_kernels(bits: np.ndarray, compute_dtype: str, fused_dequant: bool) -> np.ndarray:
    """Kernels one dequantization launches, (N,): 4 torch ops (+4 to unpack 4-bit), or the fused one."""
    out = np.where(fused(bits, compute_dtype, fused_dequant), 1.0, np.where(bits == 4, 8.0, 4.0))
    return np.where(bits < 16, out, 0.0)


def dequant_buffer_bytes(bits: np.ndarray, compute_dtype: str, fused_dequant: bool) -> np.ndarray:
    """Bytes per element alive while a dequantized weight is used, (N,): the 16-bit result, and for 4-bit
    on the torch path the unpacked uint8 tensor it was converted from (freed only after the call)."""
    c = DTYPE_BYTES[compute_dtype]
    out = c + np.where((bits == 4) & ~fused(bits, compute_dtype, fused_dequant), 1.0, 0.0)
    return np.where(bits < 16, out, 0.0)


def dequant_elems_per_rank(arrangement: Arrangement, knobs: Knobs, phase: Phase) -> np.ndarray:
    """(N, kinds) quantized elements one forward of each module dequantizes on one rank: every matrix it
    touches (an embedding table whole: ``F.embedding`` is wrapped like ``F.linear``)."""
    quantized = knobs.weight_bits[:, None] < 16
    touched = touched_elems_per_rank(arrangement, phase.tokens)
    return np.where(quantized, touched * arrangement.table.fetch_matrix_fraction, 0.0)


def dequant_time(arrangement: Arrangement, knobs: Knobs, phase: Phase) -> np.ndarray:
    """(N, kinds) device seconds of dequantization in one forward of one module on one rank."""
    gpu, eff = arrangement.hardware.gpu, arrangement.hardware.efficiency
    wl = arrangement.workload
    per_elem = dequant_bytes_per_elem(knobs.weight_bits, wl.compute_dtype, wl.fused_dequant)[:, None]
    # hpi's kernel at its own measured share of the HBM rate; DeepSpeed's paths at dequant_hbm
    share = np.where(wl.fused_dequant, eff.fused_dequant_hbm, eff.dequant_hbm)
    return dequant_elems_per_rank(arrangement, knobs, phase) * per_elem / (gpu.hbm_bandwidth_bytes_s * share)


def quantized_tensor_counts(arrangement: Arrangement) -> np.ndarray:
    """(kinds,) quantized matrices each module holds (routed experts' counted once per expert)."""
    return arrangement.table.matrix_counts


def dequant_host_time(arrangement: Arrangement, knobs: Knobs) -> np.ndarray:
    """(N, kinds) host seconds to launch one module's dequantization kernels."""
    per_kernel = arrangement.hardware.efficiency.layer_overhead_s / KERNELS_PER_LAYER
    wl = arrangement.workload
    kernels = dequant_kernels(knobs.weight_bits, wl.compute_dtype, wl.fused_dequant)[:, None]
    return kernels * quantized_tensor_counts(arrangement)[None, :] * per_kernel
