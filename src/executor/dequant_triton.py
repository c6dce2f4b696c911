"""DeepSpeed's 8/4-bit dequantization as one hand-written Triton kernel: the CUDA path of ``hpi.executor.dequant``.

Why by hand: the ``torch.compile``'d kernel (``dequant.inductor_dequantize``) runs fast on the device (4.1x
DeepSpeed's chain in total over the 70B's weights), but each call pays dynamo's guards, ``mark_dynamic``, reshapes
and the compiled wrapper: 151-334 µs of host time per call on one H200 against 78-283 µs for DeepSpeed's own torch
ops (``benchmarks/dequant_bench.py``, 70B shapes, ``benchmarks/results/2026-12-04-h200-fused/call2/``
``dequant-bench.jsonl``). A 70B decode step makes 560 such calls, and a host-bound ZeRO-3 fetch queue lost 5-30% of
the PCIe ceiling in some measured sets (SUMMARY.md there). ``dequantize`` below allocates the output, computes the grid
with integer math and launches; nothing else. Measured on the same H200 (``benchmarks/results/2026-12-04-h200-split``,
call 2): 65-144 µs of host a call (median 107) against DeepSpeed's 85-252 (161) and inductor's 168-310 (249), and
5.0x DeepSpeed's chain in total, bit-identical. The 70B's slow sets stayed (call 3 there): the host time per call
is not what bounds them.

The numbers are DeepSpeed's eager ones (``DeQuantizer._dequantize_int8``: ``copy_`` uint8 -> dtype, ``div_(scale)``,
``add_(min)``): eager CUDA computes each op in fp32 (opmath) and rounds to the dtype after it, so the kernel does

    v = round_dtype(div_rn(float(q), float(scale)));  out = round_dtype(v + float(min))

- ``tl.div_rn``: the correctly rounded ``div.rn.f32``; Triton's ``/`` is the approximate ``div.full.f32``.
- Rounding to bf16 is written as integer round-to-nearest-even on the fp32 bits (c10's ``round_to_nearest_even``),
  not as ``.to(tl.bfloat16)``: Triton's interpreter, which runs this same kernel on the CPU for the tests,
  truncates on that cast and flushes subnormals (``triton/runtime/interpreter.py``: ``cast_impl`` passes no
  rounding mode to ``_convert_float``). On the device it equals ``cvt.rn.bf16.f32``, subnormals included (bf16
  has fp32's exponent, so the integer carry is exact). A NaN stays a NaN, as 0x7FC0 (c10's CPU pattern; CUDA's
  cvt gives 0x7FFF, so a NaN's payload bits may differ from eager's there; DeepSpeed's groups give none).
  fp16 uses ``.to(tl.float16)`` (the interpreter's numpy cast and ``cvt.rn.f16.f32`` both round to nearest even).
- Denormals are kept, as eager CUDA keeps them: PTX ``add.f32`` / ``div.rn.f32`` without ``.ftz`` keep them. Triton
  3.6 emits ``div_rn`` inline, not through libdevice; ``enable_reflect_ftz=False`` (what inductor's ``disable_ftz``
  sets) would keep libdevice off its flushing variants should that change. ``tests/executor/test_dequant_triton.py``
  compiles what a launch compiles, for sm_90 on the CPU, and reads its PTX for both.

Layout: a contiguous packed weight is G rows of one group each (``group_dim`` last; the module docstring of
``hpi.executor.dequant``); one program handles ``ROWS`` rows (``BLOCK_ELEMS`` elements), so a 28672 x 8192 weight
launches 114,688 programs. 4-bit: two values a byte, the even element in the high nibble (``byte >> 4`` and
``byte & 0xF`` interleaved). Group sizes must be powers of two (``tl.arange``); ``covers`` says which.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK_ELEMS = 2048  # output elements per program, a power of two: 16 per thread at NUM_WARPS 4 (not tuned yet)
NUM_WARPS = 4
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_GROUP = 1 << 16  # tl.arange's block stays small; DeepSpeed's groups are 64 (hpi.planner.specs.plan)
# Compile options of every launch (tests compile the kernel with them for sm_90 and read the PTX): no libdevice
# flush-to-zero (the module docstring).
LAUNCH_OPTIONS = {"num_warps": NUM_WARPS, "enable_reflect_ftz": False}


def _dequant_rows(packed_ptr, scale_ptr, min_ptr, out_ptr, rows,
                  GROUP: tl.constexpr, ROWS: tl.constexpr, BITS: tl.constexpr):
    """``ROWS`` groups of ``GROUP`` output elements: packed bytes, one scale and one minimum per row.

    One function calling only Triton builtins, no ``@triton.jit`` helpers (``tl.interleave`` is one): the
    interpreted copy (``_interpreted``) cannot call a compiled function."""
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = row < rows
    if BITS == 4:
        byte = tl.load(packed_ptr + row[:, None] * (GROUP // 2) + tl.arange(0, GROUP // 2)[None, :],
                       mask=live[:, None])
        # element 2i is the high nibble of byte i: tl.interleave, spelled out (it is a jit helper, see above)
        q = tl.reshape(tl.join(byte >> 4, byte & 0xF), (ROWS, GROUP))
    else:
        q = tl.load(packed_ptr + row[:, None] * GROUP + tl.arange(0, GROUP)[None, :], mask=live[:, None])
    scale = tl.load(scale_ptr + row, mask=live, other=1.0).to(tl.float32)
    minimum = tl.load(min_ptr + row, mask=live, other=0.0).to(tl.float32)
    dtype: tl.constexpr = out_ptr.dtype.element_ty

    value = tl.div_rn(q.to(tl.float32), scale[:, None])  # u8 -> float is exact
    if dtype == tl.bfloat16:  # round to nearest even on the bits (the module docstring); a NaN stays a NaN
        bits = value.to(tl.uint32, bitcast=True)
        bits = tl.where(value != value, 0x7FC00000, (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000)
        value = bits.to(tl.float32, bitcast=True)
    elif dtype == tl.float16:
        value = value.to(tl.float16).to(tl.float32)

    value = value + minimum[:, None]
    if dtype == tl.bfloat16:  # the same rounding after the add, stored as the high half of the bits (the
        bits = value.to(tl.uint32, bitcast=True)  # interpreter's fp32 -> bf16 cast flushes subnormals)
        bits = tl.where(value != value, 0x7FC00000, (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = value.to(dtype)  # fp16: the one rounding after the add; fp32: none
    tl.store(out_ptr + row[:, None] * GROUP + tl.arange(0, GROUP)[None, :], out, mask=live[:, None])


# The row count varies per weight; specializing on it (== 1, % 16) would compile per shape class. Scale and
# minimum sit at arbitrary offsets of zero.Init's compat tensor and are read once per row: no alignment variants.
_KERNEL = triton.jit(_dequant_rows, do_not_specialize=["rows"],
                     do_not_specialize_on_alignment=["scale_ptr", "min_ptr"])


@functools.cache
def _interpreted():
    """The same kernel run by Triton's interpreter (numpy, on the CPU), without ``TRITON_INTERPRET`` in the
    environment: for CPU tensors, which is how the tests run the kernel's own code without a GPU."""
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(_dequant_rows)


def covers(group_size: int, dtype: torch.dtype) -> bool:
    """Whether the kernel handles this group size (a power of two from 2 to ``MAX_GROUP``: ``tl.arange``) and
    dtype (``DTYPES``: its arithmetic is fp32, as eager's opmath is for these three)."""
    return 2 <= group_size <= MAX_GROUP and group_size & (group_size - 1) == 0 and dtype in DTYPES


def dequantize(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, *, bits: int,
               group_size: int) -> torch.Tensor:
    """The weight of ``packed`` (uint8, last dimension halved for 4-bit) in ``scale``'s dtype, one launch.

    No checks beyond contiguity: ``hpi.executor.dequant.fused_dequantize`` validates the shapes and dtypes
    before it dispatches here, and every check is host time per call. CUDA tensors run the compiled kernel on
    the current CUDA device, which must be theirs (Triton launches there; hpi's worker sets each rank's), CPU
    tensors the interpreter (slow: tests only)."""
    if not (packed.is_contiguous() and scale.is_contiguous() and minimum.is_contiguous()):
        packed, scale, minimum = packed.contiguous(), scale.contiguous(), minimum.contiguous()
    shape = list(packed.shape)
    shape[-1] = shape[-1] * 8 // bits
    out = torch.empty(shape, dtype=scale.dtype, device=packed.device)
    rows = scale.numel()
    block_rows = max(1, BLOCK_ELEMS // group_size)  # read per call: benchmarks/dequant_bench.py sets it
    kernel = _KERNEL if packed.is_cuda else _interpreted()
    kernel[((rows + block_rows - 1) // block_rows,)](
        packed, scale, minimum, out, rows, GROUP=group_size, ROWS=block_rows, BITS=bits, **LAUNCH_OPTIONS)
    return out
