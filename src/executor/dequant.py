"""Fused dequantization of DeepSpeed's 8/4-bit weights: one kernel instead of a chain of torch ops.

Why: DeepSpeed's quantized initialization wraps ``F.linear`` / ``F.embedding`` so that every call first
dequantizes the *whole* weight (``deepspeed/inference/quantization/utils.py``: ``wrap_quantized_functional``
calls ``DeQuantizer.dequantize``). Its fused CUDA kernel covers fp16 compute only (and needs DeepSpeed's
compiled ``QuantizerBuilder`` op); for bf16 and fp32 it runs torch element-wise ops: for 4-bit the unpack
(shift, strided store, and, strided store), then ``zeros_like``, ``copy_`` uint8 -> dtype, ``div_(scale)``,
``add_(min)``. That is ~17 bytes of HBM traffic per element in bf16 (25 for 8-bit fp32, 29 for 4-bit fp32)
and 8 kernel launches per tensor, as ``src/planner/cost/dequant.py`` prices it; a 70B model with 4-bit
weights, ZeRO-3 CPU offload, pinned, on one H200 decoded at 0.974 s/step, 0.74 of the PCIe ceiling, where
16-bit weights reach 1.00. A fused kernel reads the packed byte and the group's scale and minimum and
writes the 16-bit weight once: 0.5 + 2c/64 + c bytes per element for 4-bit (c = 2: ~2.6), one launch.

Two fused kernels, one per device kind (``fused_dequantize`` dispatches):
- CUDA: a hand-written Triton kernel (``hpi.executor.dequant_triton``). The ``torch.compile``'d kernel below ran
  as fast on one H200 but cost 151-334 µs of host time per call against DeepSpeed's own 78-283 µs
  (``benchmarks/dequant_bench.py``, ``benchmarks/results/2026-12-04-h200-fused/call2/dequant-bench.jsonl``):
  dynamo's guards, ``mark_dynamic``, the reshapes and the compiled wrapper. A 70B decode step makes 560 calls,
  and a host-bound ZeRO-3 fetch queue lost 5-30% of the PCIe ceiling in some measured sets (SUMMARY.md there).
  The Triton kernel's host time is 65-144 µs a call, median 107 (``benchmarks/results/2026-12-04-h200-split``,
  call 2), and it is 5.0x DeepSpeed's chain in total. Group sizes that are not powers of two, and dtypes other than
  fp32/bf16/fp16 (its arithmetic is fp32), stay on inductor.
- CPU (and anything else): that inductor kernel (``inductor_dequantize``), which compiles to C++ there.

Exactly DeepSpeed's numbers: eager rounds after each op (``q.to(dtype)``, then ``/ scale`` rounded to the
dtype, then ``+ min`` rounded to the dtype). Inductor fuses pointwise ops in fp32 and drops the rounding in
between unless ``emulate_precision_casts`` is set (in bf16/fp16, about one element in ten then differs by an
ulp: ``tests/executor/test_dequant.py``), and Triton's ``/`` is the approximate ``div.full`` unless
``eager_numerics.division_rounding`` asks for ``div_rn`` (``torch/_inductor/config.py``, ``eager_numerics``);
denormals are kept (``disable_ftz``) as eager CUDA keeps them. ``EXACT_OPTIONS`` sets all three; the Triton
kernel does the same by hand (its module docstring). ``warm_up`` checks the path of the run's device.

Layout (``Quantizer.quantize`` / ``DeQuantizer.dequantize`` in the same DeepSpeed file): groups of
``group_size`` consecutive elements along the last dimension (``group_dim`` last), asymmetric, one scale and
one minimum per group in the weight dtype; 4-bit packs two values a byte, the even element in the high
nibble (``data[..., 0::2] = t >> 4``, ``data[..., 1::2] = t & 0xF``). So a contiguous weight is G rows of
one group each; both kernels work on (G, packed group). The inductor one is compiled with G dynamic, once per
bit width and dtype, not once per weight shape; the Triton one once per bit width, dtype and group size.

``install()`` patches ``DeQuantizer.dequantize`` (the class, so every quantized parameter of the process
uses it), keeps DeepSpeed's own fp16 CUDA-kernel branch wherever that branch would run and its op is built,
and hands anything the fused kernels do not cover (another ``group_dim``, bits, or a scale in another dtype) to
DeepSpeed's original.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator

import torch

# Inductor settings that make the compiled kernel round like eager (module docstring).
EXACT_OPTIONS = {
    "emulate_precision_casts": True,
    "eager_numerics.division_rounding": True,
    "eager_numerics.disable_ftz": True,
}
BITS = (4, 8)


def _unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """(G, n) bytes -> (G, 2n) values 0..15, the high nibble first (DeepSpeed's ``_decompress_uint4_to_uint8``).

    Written as one broadcast shift (byte i, nibble k -> byte >> (4 - 4k) & 0xF) rather than ``torch.stack`` of
    the two nibbles: inductor lowers a stack to its own kernel and buffer, a broadcast fuses into the next op.
    """
    shifts = (1 - torch.arange(2, device=packed.device, dtype=torch.uint8)) * 4
    return ((packed.unsqueeze(-1) >> shifts) & 0xF).reshape(packed.shape[0], -1)


def _dequant_rows_4bit(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """(G, group/2) uint8, (G, 1) scale and minimum -> (G, group) in the scale's dtype."""
    return _unpack_4bit(packed).to(scale.dtype) / scale + minimum


def _dequant_rows_8bit(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """(G, group) uint8, (G, 1) scale and minimum -> (G, group) in the scale's dtype."""
    return packed.to(scale.dtype) / scale + minimum


@functools.cache
def _kernel(bits: int):
    """The compiled row kernel of one bit width. Only the row count G is a symbol (``_rows``): the group size
    stays a constant, so the kernel finds a weight's group by a shift, not by a division by a runtime value."""
    fn = _dequant_rows_4bit if bits == 4 else _dequant_rows_8bit
    return torch.compile(fn, dynamic=False, options=EXACT_OPTIONS)


def _rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` as (G, -1), no view (dynamo guards a view's base, its sizes and strides, which would recompile
    per weight shape), its row count marked dynamic (sizes 0 and 1 cannot be: they compile apart)."""
    out = t.reshape(rows, -1).detach()
    if rows > 1:
        torch._dynamo.mark_dynamic(out, 0)
    return out


def check(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, *, bits: int, group_size: int) -> None:
    """Refuse what neither fused kernel computes: the arguments of ``fused_dequantize``."""
    if bits not in BITS:
        raise ValueError(f"bits({bits}) must be one of {BITS}: DeepSpeed quantizes to 4 or 8 bits only")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed weights are {packed.dtype}, expected torch.uint8: pass tensor.view(torch.uint8)")
    last = packed.shape[-1] * 8 // bits
    groups = last // group_size if group_size > 0 else 0
    if group_size <= 0 or last % group_size or scale.numel() != minimum.numel() or \
            scale.numel() * group_size * bits != packed.numel() * 8:
        raise ValueError(f"last dimension {last} = groups({groups}) x group_size({group_size}) and scale "
                         f"({scale.numel()}) = minimum ({minimum.numel()}) = packed elements({packed.numel()}) "
                         f"x 8 / bits({bits}) / group_size must hold: quantize with group_dim last")
    if scale.dtype != minimum.dtype or not scale.dtype.is_floating_point:
        raise ValueError(f"scale ({scale.dtype}) and minimum ({minimum.dtype}) must share one floating dtype")
    if not packed.get_device() == scale.get_device() == minimum.get_device():  # ints: cheaper than .device
        raise ValueError(f"packed ({packed.device}), scale ({scale.device}) and minimum ({minimum.device}) must be on "
                         f"one device: move them together")


def inductor_dequantize(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, *, bits: int,
                        group_size: int) -> torch.Tensor:
    """The ``torch.compile``'d kernel on any device (the CPU path of ``fused_dequantize``), checked."""
    check(packed, scale, minimum, bits=bits, group_size=group_size)
    return _inductor(packed, scale, minimum, bits)


def _inductor(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int) -> torch.Tensor:
    shape = list(packed.shape)
    shape[-1] = shape[-1] * 8 // bits
    rows = scale.numel()
    return _kernel(bits)(_rows(packed, rows), _rows(scale, rows), _rows(minimum, rows)).view(shape)


@functools.cache
def _triton():
    """``hpi.executor.dequant_triton``, imported on the first CUDA call: Triton is needed only there."""
    from hpi.executor import dequant_triton

    return dequant_triton


def triton_dequantize(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, *, bits: int,
                      group_size: int) -> torch.Tensor:
    """The hand-written Triton kernel (the CUDA path of ``fused_dequantize``), checked; on CPU tensors it runs in
    Triton's interpreter (tests only: slow)."""
    check(packed, scale, minimum, bits=bits, group_size=group_size)
    if not _triton().covers(group_size, scale.dtype):
        raise ValueError(f"group_size({group_size}) must be a power of two from 2 to {_triton().MAX_GROUP} and the "
                         f"dtype ({scale.dtype}) one of {_triton().DTYPES} for the Triton kernel: use "
                         f"inductor_dequantize (fused_dequantize does)")
    return _triton().dequantize(packed, scale, minimum, bits=bits, group_size=group_size)


def kernel_for(is_cuda: bool, group_size: int, dtype: torch.dtype) -> str:
    """Which fused kernel ``fused_dequantize`` runs: "triton" for CUDA tensors it covers, else "inductor"."""
    return "triton" if is_cuda and _triton().covers(group_size, dtype) else "inductor"


def fused_dequantize(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, *, bits: int,
                     group_size: int) -> torch.Tensor:
    """DeepSpeed's dequantization of one weight (group_dim last) in one kernel, bit for bit: the Triton kernel on
    CUDA tensors (a group size that is a power of two, a 16- or 32-bit dtype), the inductor kernel elsewhere.

    packed: uint8, the weight's shape with the last dimension halved for 4-bit; scale, minimum: one per
    group (any shape with that many elements), in the dtype of the result.
    """
    check(packed, scale, minimum, bits=bits, group_size=group_size)
    if kernel_for(packed.is_cuda, group_size, scale.dtype) == "triton":
        return _triton().dequantize(packed, scale, minimum, bits=bits, group_size=group_size)
    return _inductor(packed, scale, minimum, bits)


def _grouped_last(dequantizer, tensor: torch.Tensor) -> bool:
    """The layout both fused paths (ours and DeepSpeed's fp16 kernel) take: 4 or 8 bits, groups along the last
    dimension."""
    cfg = dequantizer.config
    return cfg["num_bits"] in BITS and cfg["group_dim"] == tensor.dim() - 1


def covers(dequantizer, tensor: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether ``fused_dequantize`` computes what this DeepSpeed ``DeQuantizer`` would."""
    return (_grouped_last(dequantizer, tensor) and not dequantizer.config.get("symmetric", False)
            and tensor.dtype == torch.uint8 and scale.dtype == dequantizer.dtype)


@functools.cache
def _deepspeed_kernel_built() -> bool:
    """Whether DeepSpeed's quantizer op (its fp16 CUDA dequantization) is built: already loaded, or installed
    prebuilt and loads. Not JIT-built here: that takes minutes and a CUDA toolkit, and the fused kernel is there."""
    from deepspeed.git_version_info import installed_ops
    from deepspeed.inference.quantization import utils

    if utils.quantizer_module is not None:
        return True
    if not installed_ops.get("quantizer", False):
        return False
    try:
        utils.get_quantizer_module()
    except Exception:  # noqa: BLE001 - any failure to load the op means: use ours
        return False
    return True


def uses_deepspeed_kernel(dequantizer, tensor: torch.Tensor) -> bool:
    """DeepSpeed's own fused branch of ``DeQuantizer.dequantize`` (fp16, a CUDA tensor, group size a multiple
    of 8, group_dim last), kept where its op is built."""
    return (dequantizer.dtype == torch.float16 and tensor.is_cuda and dequantizer.config["group_size"] % 8 == 0
            and _grouped_last(dequantizer, tensor) and _deepspeed_kernel_built())


# Dequantizations the patch has served while switched on: by the fused kernel, and by DeepSpeed's own code
# (its fp16 CUDA kernel, or a case the fused one does not cover). The worker checks that a run asked to fuse did.
_CALLS = {"fused": 0, "deepspeed": 0}
_ENABLED = [False]


def _patched(original):
    @functools.wraps(original)
    def dequantize(self, tensor: torch.Tensor, quant_scale: torch.Tensor, quant_min: torch.Tensor) -> torch.Tensor:
        if not _ENABLED[0]:
            return original(self, tensor, quant_scale, quant_min)
        if uses_deepspeed_kernel(self, tensor) or not covers(self, tensor, quant_scale):
            _CALLS["deepspeed"] += 1
            return original(self, tensor, quant_scale, quant_min)
        _CALLS["fused"] += 1
        return fused_dequantize(tensor, quant_scale, quant_min, bits=self.config["num_bits"],
                                group_size=self.config["group_size"])

    dequantize.hpi_original = original
    return dequantize


def calls() -> dict[str, int]:
    """Dequantizations served while switched on so far: {"fused": ..., "deepspeed": ...}."""
    return dict(_CALLS)


def install() -> None:
    """Make every DeepSpeed dequantization of this process use the fused kernel. Idempotent."""
    from deepspeed.inference.quantization.utils import DeQuantizer

    if not hasattr(DeQuantizer.dequantize, "hpi_original"):
        DeQuantizer.dequantize = _patched(DeQuantizer.dequantize)
    _ENABLED[0] = True


def uninstall() -> None:
    """DeepSpeed's own dequantization again (the patch stays, switched off). Idempotent."""
    _ENABLED[0] = False


def installed() -> bool:
    return _ENABLED[0]


def use_fused(enabled: bool) -> None:
    """``install()`` or ``uninstall()``: the per-process switch a run condition sets."""
    if enabled:
        install()
    else:
        uninstall()


@contextlib.contextmanager
def fused_dequant(enabled: bool = True) -> Iterator[None]:
    """The fused kernel on (or off) inside the block, the previous setting after it."""
    before = installed()
    use_fused(enabled)
    try:
        yield
    finally:
        use_fused(before)


def deepspeed_torch_ops(dequantizer, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's torch-op branch of ``DeQuantizer.dequantize`` (group_dim last), called through its own private
    steps so that neither its fp16 CUDA kernel nor this module's patch answers: the reference ours must equal."""
    cfg = dequantizer.config
    values = dequantizer._decompress_uint4_to_uint8(packed) if cfg["num_bits"] == 4 else packed
    shape = values.shape
    grouped = values.view(shape[:-1] + (shape[-1] // cfg["group_size"], cfg["group_size"]))
    return dequantizer._dequantize_int8(grouped, scale, minimum).view(shape)


def check_weight(dtype: torch.dtype, rows: int = 256, cols: int = 256) -> torch.Tensor:
    """The weight ``warm_up`` quantizes: seeded normal values, its last sixteenth of rows scaled down to 32x the
    dtype's smallest normal number, so that some quotients and sums are subnormal: a kernel that flushes them to
    zero (where eager keeps them) differs from DeepSpeed there."""
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    weight[rows - rows // 16:] *= torch.finfo(dtype).tiny * 32
    return weight.to(dtype)


def warm_up(bits: int, dtype: torch.dtype, device: torch.device | str, group_size: int = 64) -> float:
    """Compile the kernel of ``bits`` and ``dtype`` that ``fused_dequantize`` runs on ``device`` (Triton on CUDA,
    inductor elsewhere) now, so that the first forward does not pay for it, and check it there: a 256 x 256
    weight (``check_weight``: 1024 groups, some with subnormal results) quantized by DeepSpeed must dequantize to
    exactly what DeepSpeed's torch ops give (``deepspeed_torch_ops``), or this raises. Skipped where DeepSpeed's
    fp16 kernel serves instead. Returns the seconds it took."""
    from deepspeed.inference.quantization.utils import DeQuantizer, Quantizer

    device = torch.device(device)
    if dtype == torch.float16 and device.type == "cuda" and _deepspeed_kernel_built():
        return 0.0
    t0 = time.perf_counter()
    cfg = {"num_bits": bits, "group_size": group_size, "group_dim": 1, "symmetric": False}
    packed, scale, minimum = Quantizer(cfg).quantize(check_weight(dtype).to(device))
    ours = fused_dequantize(packed, scale, minimum, bits=bits, group_size=group_size)
    theirs = deepspeed_torch_ops(DeQuantizer(cfg, dtype), packed, scale, minimum)
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[ours.element_size()]
    differ = int((ours.view(ints) != theirs.view(ints)).sum())  # bits: -0 is not +0
    if differ:
        kernel = kernel_for(device.type == "cuda", group_size, dtype)
        raise RuntimeError(f"the fused dequantization ({kernel}) differs from DeepSpeed's on {differ} of "
                           f"{ours.numel()} elements ({bits}-bit, {dtype}, {device}): it does not keep eager's "
                           f"rounding (hpi.executor.dequant's docstring); run with --no-fused-dequant and report this")
    return time.perf_counter() - t0
