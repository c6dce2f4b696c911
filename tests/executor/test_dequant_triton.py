"""The hand-written Triton dequantization (``hpi.executor.dequant_triton``) against DeepSpeed's own, without a GPU.

The kernel's own code runs on CPU tensors in Triton's interpreter (the module's interpreted copy of the same
function) and must give DeepSpeed's torch-op result (``dequant.deepspeed_torch_ops``) bit for bit: 4 and 8 bits,
fp32, bf16 and fp16, 2-D and 3-D weights, row counts that are not a multiple of the block, subnormal results.
What the interpreter cannot show (it divides and adds with numpy, always correctly rounded and never flushing)
is read from the kernel compiled for the H200 (sm_90) here on the CPU: its PTX must divide with ``div.rn.f32``
and flush nothing. The device run's ``dequant.warm_up`` checks the compiled kernel's numbers on the GPU.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")
pytest.importorskip("triton", reason="hpi's Triton kernels need triton (scripts/dev-setup.sh installs 3.6.0)")

from deepspeed.inference.quantization.utils import DeQuantizer, Quantizer  # noqa: E402

from hpi.executor import dequant, dequant_triton  # noqa: E402
from tests.executor.sm90 import Launches, compile_for_sm90, opcodes  # noqa: E402

GROUP = 64
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# rows of one group: 14, 99, 15, 24 and 160 (5 programs of 32 rows, the last one partly masked)
SHAPES = [(7, 128), (33, 192), (3, 5, 64), (2, 3, 256), (40, 256)]


def config(bits: int, ndim: int, group: int = GROUP) -> dict:
    return {"num_bits": bits, "group_size": group, "group_dim": ndim - 1, "symmetric": False}


def quantized(weight: torch.Tensor, bits: int, group: int = GROUP):
    """(packed, scale, min) by DeepSpeed's Quantizer, and DeepSpeed's torch-op dequantization of them."""
    cfg = config(bits, weight.dim(), group)
    packed, scale, minimum = Quantizer(cfg).quantize(weight)
    return packed, scale, minimum, dequant.deepspeed_torch_ops(DeQuantizer(cfg, weight.dtype), packed, scale, minimum)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (``torch.equal`` calls -0 equal to +0)."""
    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(ints), b.view(ints))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_bit_for_bit_equal_to_deepspeed(bits, dtype):
    for i, shape in enumerate(SHAPES):
        weight = torch.randn(shape, generator=torch.Generator().manual_seed(i)).to(dtype)
        packed, scale, minimum, expected = quantized(weight, bits)
        out = dequant.triton_dequantize(packed, scale, minimum, bits=bits, group_size=GROUP)
        differ = (out != expected).sum().item() if out.shape == expected.shape else "all"
        assert same_bits(out, expected), f"{shape}: {differ} of {expected.numel()} elements differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_subnormal_results_are_kept(bits, dtype):
    """``dequant.check_weight`` (the warm-up's weight) gives DeepSpeed results below the dtype's smallest normal
    number; they must come out the same, not flushed to zero."""
    packed, scale, minimum, expected = quantized(dequant.check_weight(dtype), bits)
    subnormal = (expected != 0) & (expected.abs() < torch.finfo(dtype).tiny)
    assert subnormal.sum() >= 30  # the case is there to check
    out = dequant.triton_dequantize(packed, scale, minimum, bits=bits, group_size=GROUP)
    assert same_bits(out, expected), f"{(out != expected).sum()} differ, {(out[subnormal] == 0).sum()} flushed"


def test_the_nibble_order_is_high_first():
    """Byte 0x3A holds 3 then 10: with scale 1 and min 0 the first weights are 3, 10, 3, 10."""
    packed = torch.full((3, GROUP // 2), 0x3A, dtype=torch.uint8)
    one, zero = torch.ones(3, 1, dtype=torch.bfloat16), torch.zeros(3, 1, dtype=torch.bfloat16)
    out = dequant.triton_dequantize(packed, one, zero, bits=4, group_size=GROUP)
    assert out.dtype == torch.bfloat16 and out[2, :4].tolist() == [3.0, 10.0, 3.0, 10.0]


@pytest.mark.parametrize("group", [2, 16, 128, 4096])
def test_other_power_of_two_groups(group):
    """Group 128 and 16 change the rows a program takes (16 and 128); 4096 is one row a program, larger than the
    block; 2 is one byte a row at 4 bits."""
    for bits in (4, 8):
        weight = torch.randn(3, 2 * 4096, generator=torch.Generator().manual_seed(group)).to(torch.bfloat16)
        packed, scale, minimum, expected = quantized(weight, bits, group)
        assert same_bits(dequant.triton_dequantize(packed, scale, minimum, bits=bits, group_size=group), expected)


def test_other_group_sizes_and_dtypes_are_refused_and_stay_on_inductor():
    groups = (1, 2, 3, 48, 64, 96, 1 << 16, 1 << 17)
    assert [g for g in groups if dequant_triton.covers(g, torch.bfloat16)] == [2, 64, 1 << 16]
    assert not dequant_triton.covers(64, torch.float64)  # fp32 arithmetic would not be eager's fp64
    packed, scale, minimum, expected = quantized(torch.randn(4, 96), 8, 48)
    with pytest.raises(ValueError, match=r"group_size\(48\) must be a power of two.*inductor_dequantize"):
        dequant.triton_dequantize(packed, scale, minimum, bits=8, group_size=48)
    assert same_bits(dequant.inductor_dequantize(packed, scale, minimum, bits=8, group_size=48), expected)


def test_cuda_tensors_take_the_triton_kernel_where_it_covers_them():
    assert dequant.kernel_for(True, GROUP, torch.bfloat16) == "triton"
    assert dequant.kernel_for(True, GROUP, torch.float16) == dequant.kernel_for(True, 16, torch.float32) == "triton"
    assert dequant.kernel_for(True, 48, torch.bfloat16) == "inductor"  # not a power of two
    assert dequant.kernel_for(True, GROUP, torch.float64) == "inductor"
    assert dequant.kernel_for(False, GROUP, torch.bfloat16) == "inductor"


def test_fused_dequantize_keeps_cpu_tensors_on_inductor(monkeypatch):
    """The interpreter is for tests: a CPU run (where triton may not even be installed) never reaches Triton."""
    monkeypatch.setattr(dequant, "_triton", lambda: pytest.fail("a CPU tensor went to the Triton kernel"))
    packed, scale, minimum, expected = quantized(torch.randn(5, 128), 4)
    assert same_bits(dequant.fused_dequantize(packed, scale, minimum, bits=4, group_size=GROUP), expected)


def test_non_contiguous_inputs_are_read_as_their_values():
    weight = torch.randn(6, 256, generator=torch.Generator().manual_seed(3))
    packed, scale, minimum, expected = quantized(weight, 8)
    wide = torch.zeros(6, 512, dtype=torch.uint8)
    wide[:, ::2] = packed  # a strided view with packed's values
    out = dequant_triton.dequantize(wide[:, ::2], scale, minimum, bits=8, group_size=GROUP)
    assert same_bits(out, expected)


# ---- the compiled kernel, read without a GPU ------------------------------------------------------------
def h200_ptx(monkeypatch, dtype: torch.dtype, bits: int) -> str:
    """PTX of what a launch from ``dequantize`` compiles for sm_90: its own arguments and options bound and
    specialized the way ``JITFunction.run`` does, then compiled (``tests/executor/sm90.py``); only the CUDA driver
    is missing."""
    launches = Launches()
    monkeypatch.setattr(dequant_triton, "_interpreted", lambda: launches)
    weight = torch.randn(40, 256, generator=torch.Generator().manual_seed(0)).to(dtype)
    packed, scale, minimum, _ = quantized(weight, bits)
    dequant_triton.dequantize(packed, scale, minimum, bits=bits, group_size=GROUP)
    assert launches.grid == (5,)  # 160 rows, 32 a program

    kernel = dequant_triton._KERNEL
    assert type(kernel).__name__ == "JITFunction"  # the compiled kernel, not the interpreted copy
    ptx, options = compile_for_sm90(kernel, launches)  # KeyError on an option the backend lacks (LAUNCH_OPTIONS)
    assert options.enable_reflect_ftz is False and options.num_warps == dequant_triton.NUM_WARPS
    return ptx


@pytest.mark.parametrize("dtype, bits", [(torch.bfloat16, 4), (torch.float16, 8), (torch.float32, 4)])
def test_the_h200_kernel_divides_correctly_rounded_and_keeps_denormals(monkeypatch, dtype, bits):
    ptx = h200_ptx(monkeypatch, dtype, bits)
    ops = set(opcodes(ptx))
    assert "div.rn.f32" in ops and not [op for op in ops if op.startswith("div.") and op != "div.rn.f32"]
    assert ".ftz" not in ptx  # no flush-to-zero variant of any instruction
    assert "st.global.v4.b32" in ops  # 16-byte stores of the output: the row block vectorizes
