"""The fused dequantization (``hpi.executor.dequant``) against DeepSpeed's own, on the CPU (inductor's C++ kernel).

Weights are quantized by DeepSpeed's ``Quantizer`` and dequantized by its ``DeQuantizer``; ours must give the
same tensor bit for bit (``torch.equal``), compile once per bit width and dtype whatever the weight shape,
and, installed, be what DeepSpeed's wrapped ``F.linear`` uses.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from deepspeed.inference.quantization.utils import (  # noqa: E402
    DeQuantizer,
    Quantizer,
    _quantize_param,
    wrap_quantized_functional,
)
from torch._dynamo.utils import counters  # noqa: E402

from hpi.executor import dequant  # noqa: E402

GROUP = 64
fused = dequant.fused_dequantize  # the real one, for tests that wrap the module's name
SHAPES = [(7, 128), (33, 192), (3, 5, 64), (2, 3, 256)]  # odd row counts; 3-D with group_dim last


def config(bits: int, ndim: int) -> dict:
    return {"num_bits": bits, "group_size": GROUP, "group_dim": ndim - 1, "symmetric": False}


def quantized(shape, bits: int, dtype: torch.dtype, seed: int = 0):
    """A random weight through DeepSpeed's Quantizer: (packed uint8, scale, min) and its DeQuantizer's result."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen).to(dtype)
    cfg = config(bits, len(shape))
    packed, scale, minimum = Quantizer(cfg).quantize(weight)
    return packed, scale, minimum, DeQuantizer(cfg, dtype).dequantize(packed, scale, minimum)


@pytest.fixture
def switched_off():
    """Tests that install the patch leave the process as they found it (switched off)."""
    yield
    dequant.uninstall()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
def test_bit_for_bit_equal_to_deepspeed(bits, dtype):
    for i, shape in enumerate(SHAPES):
        packed, scale, minimum, expected = quantized(shape, bits, dtype, seed=i)
        assert packed.shape[-1] == shape[-1] * bits // 8  # 4-bit: two values a byte
        out = dequant.fused_dequantize(packed, scale, minimum, bits=bits, group_size=GROUP)
        assert out.dtype == dtype and out.shape == shape
        assert torch.equal(out, expected), f"{shape}: {(out != expected).sum()} of {out.numel()} elements differ"


def test_the_nibble_order_is_high_first():
    """Byte 0x3A holds 3 then 10: with scale 1 and min 0 the first two weights are 3.0 and 10.0."""
    packed = torch.full((1, GROUP // 2), 0x3A, dtype=torch.uint8)
    one, zero = torch.ones(1, 1, 1), torch.zeros(1, 1, 1)
    out = dequant.fused_dequantize(packed, one, zero, bits=4, group_size=GROUP)
    assert out[0, :4].tolist() == [3.0, 10.0, 3.0, 10.0]
    assert torch.equal(out, DeQuantizer(config(4, 2), torch.float32).dequantize(packed, one, zero))


def test_bf16_needs_the_intermediate_rounding():
    """Why EXACT_OPTIONS: eager rounds q / scale to bf16 before adding min; one rounding at the end (what
    inductor fuses to without emulate_precision_casts) differs from DeepSpeed on a good share of elements,
    so the equality above could fail."""
    packed, scale, minimum, expected = quantized((64, 256), 8, torch.bfloat16)
    rows = scale.numel()
    q = packed.reshape(rows, -1).float()
    once = (q / scale.reshape(rows, 1).float() + minimum.reshape(rows, 1).float()).to(torch.bfloat16)
    differ = (once.reshape(expected.shape) != expected).float().mean().item()
    assert differ > 0.01
    loose = torch.compile(dequant._dequant_rows_8bit, dynamic=True)  # inductor's defaults: one rounding
    loose_out = loose(packed.reshape(rows, -1), scale.reshape(rows, 1), minimum.reshape(rows, 1))
    assert not torch.equal(loose_out.reshape(expected.shape), expected)
    exact = dequant.fused_dequantize(packed, scale, minimum, bits=8, group_size=GROUP)
    assert torch.equal(exact, expected)


def test_one_compile_for_every_shape():
    dequant.fused_dequantize(*quantized((5, 128), 4, torch.bfloat16)[:3], bits=4, group_size=GROUP)  # compiled
    before = counters["stats"]["unique_graphs"]
    for i, shape in enumerate([(9, 64), (11, 320), (4, 3, 128), (129, 64)]):
        packed, scale, minimum, expected = quantized(shape, 4, torch.bfloat16, seed=i)
        assert torch.equal(dequant.fused_dequantize(packed, scale, minimum, bits=4, group_size=GROUP), expected)
    assert counters["stats"]["unique_graphs"] == before


def test_bad_inputs_are_refused_with_the_fix():
    packed, scale, minimum, _ = quantized((4, 128), 4, torch.float32)
    with pytest.raises(ValueError, match="bits"):
        dequant.fused_dequantize(packed, scale, minimum, bits=2, group_size=GROUP)
    with pytest.raises(ValueError, match="view"):
        dequant.fused_dequantize(packed.float(), scale, minimum, bits=4, group_size=GROUP)
    with pytest.raises(ValueError, match="group_dim last"):
        dequant.fused_dequantize(packed, scale, minimum, bits=4, group_size=32)


def quantized_linear(bits: int, dtype: torch.dtype) -> torch.nn.Parameter:
    """A Linear weight quantized the way ``zero.Init`` does it (``_quantize_param``: one packed compat tensor)."""
    weight = torch.nn.Parameter(torch.randn(24, 128, generator=torch.Generator().manual_seed(1)).to(dtype),
                                requires_grad=False)
    _quantize_param(weight, config(bits, 2))
    return weight


@pytest.mark.parametrize("bits", [4, 8])
def test_installed_it_serves_deepspeeds_wrapped_linear(bits, switched_off, monkeypatch):
    weight = quantized_linear(bits, torch.bfloat16)
    x = torch.randn(3, 128).to(torch.bfloat16)
    linear = wrap_quantized_functional(torch.nn.functional.linear)
    expected = linear(x, weight)
    calls = []
    monkeypatch.setattr(dequant, "fused_dequantize", lambda *a, **k: calls.append(k) or fused(*a, **k))
    dequant.install()
    dequant.install()  # idempotent: one patch, not a patch of the patch
    assert not hasattr(DeQuantizer.dequantize.hpi_original, "hpi_original")
    assert torch.equal(linear(x, weight), expected) and calls == [{"bits": bits, "group_size": GROUP}]
    with dequant.fused_dequant(False):
        assert torch.equal(linear(x, weight), expected) and len(calls) == 1  # DeepSpeed's own ops
    assert dequant.installed()
    dequant.uninstall()
    linear(x, weight)
    assert len(calls) == 1


def test_the_compat_tensors_views_reuse_the_one_compile(switched_off):
    """zero.Init's params hand over views into one packed tensor (scale and min at offsets that vary with the
    weight's size): no recompile per weight."""
    linear = wrap_quantized_functional(torch.nn.functional.linear)
    dequant.install()
    linear(torch.randn(2, 128), quantized_linear(8, torch.float32))  # compiles, if nothing has yet
    before = counters["stats"]["unique_graphs"]
    for rows, cols in [(40, 256), (9, 64), (100, 192)]:
        weight = torch.nn.Parameter(torch.randn(rows, cols), requires_grad=False)
        _quantize_param(weight, config(8, 2))
        x = torch.randn(2, cols)
        with dequant.fused_dequant(False):
            expected = linear(x, weight)  # DeepSpeed's torch ops
        assert torch.equal(linear(x, weight), expected)
    assert counters["stats"]["unique_graphs"] == before and dequant.calls()["fused"] >= 4


def test_what_it_does_not_cover_goes_to_deepspeed(switched_off):
    """A group_dim other than the last is DeepSpeed's business; so is its fp16 CUDA kernel (not on a CPU)."""
    cfg = {"num_bits": 8, "group_size": 8, "group_dim": 0, "symmetric": False}
    weight = torch.randn(16, 4)
    packed, scale, minimum = Quantizer(cfg).quantize(weight)
    deq = DeQuantizer(cfg, torch.float32)
    assert not dequant.covers(deq, packed, scale)
    expected = deq.dequantize(packed, scale, minimum)
    dequant.install()
    assert torch.equal(deq.dequantize(packed, scale, minimum), expected)
    half = DeQuantizer(config(4, 2), torch.float16)
    assert not dequant.uses_deepspeed_kernel(half, torch.zeros(2, 32, dtype=torch.uint8))  # a CPU tensor


def test_deepspeeds_kernel_counts_as_built_only_when_loaded_or_installed(monkeypatch):
    """Not JIT-built on a first fp16 call (minutes, a CUDA toolkit): loaded already, or installed prebuilt."""
    from deepspeed.git_version_info import installed_ops
    from deepspeed.inference.quantization import utils

    monkeypatch.setitem(installed_ops, "quantizer", False)
    monkeypatch.setattr(utils, "quantizer_module", None)
    monkeypatch.setattr(utils, "get_quantizer_module", lambda: pytest.fail("would JIT-build DeepSpeed's op"))
    dequant._deepspeed_kernel_built.cache_clear()
    assert dequant._deepspeed_kernel_built() is False  # not prebuilt, not loaded
    dequant._deepspeed_kernel_built.cache_clear()
    monkeypatch.setitem(installed_ops, "quantizer", True)  # prebuilt, but fails to load: ours
    monkeypatch.setattr(utils, "get_quantizer_module", lambda: (_ for _ in ()).throw(ImportError("no op")))
    assert dequant._deepspeed_kernel_built() is False
    dequant._deepspeed_kernel_built.cache_clear()
    monkeypatch.setattr(utils, "quantizer_module", object())
    assert dequant._deepspeed_kernel_built() is True
    dequant._deepspeed_kernel_built.cache_clear()


def test_warm_up_compiles_the_kernel_that_later_weights_reuse():
    dequant.warm_up(8, torch.float32, "cpu")
    before = counters["stats"]["unique_graphs"]
    for i, shape in enumerate([(32, 64), (5, 192), (2, 2, 128)]):  # 32 rows of 64: two equal sizes
        packed, scale, minimum, expected = quantized(shape, 8, torch.float32, seed=i)
        assert torch.equal(dequant.fused_dequantize(packed, scale, minimum, bits=8, group_size=GROUP), expected)
    assert counters["stats"]["unique_graphs"] == before


def test_warm_up_refuses_a_kernel_that_differs_from_deepspeed(monkeypatch):
    """The device check the worker's build runs: one element off by an ulp is enough to refuse."""
    assert dequant.warm_up(4, torch.bfloat16, "cpu") > 0

    def one_ulp_off(*args, **kwargs):
        out = fused(*args, **kwargs)
        out.view(-1)[7] = torch.nextafter(out.view(-1)[7], torch.tensor(float("inf"), dtype=out.dtype))
        return out

    monkeypatch.setattr(dequant, "fused_dequantize", one_ulp_off)
    refused = r"\(inductor\) differs from DeepSpeed's on 1 of 65536 elements.*--no-fused-dequant"
    with pytest.raises(RuntimeError, match=refused):
        dequant.warm_up(4, torch.bfloat16, "cpu")


def test_the_reference_is_deepspeeds_torch_path():
    for bits in (4, 8):
        packed, scale, minimum, expected = quantized((6, 128), bits, torch.bfloat16)
        got = dequant.deepspeed_torch_ops(DeQuantizer(config(bits, 2), torch.bfloat16), packed, scale, minimum)
        assert torch.equal(got, expected)


# ---- through hpi's executor ----------------------------------------------------------------------------
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
         "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
         "initializer_range": 0.02, "hidden_act": "silu"}  # every input width a multiple of 64 (the group)


def test_a_4bit_run_decodes_the_same_tokens_fused_and_unfused(tmp_path):
    """One quantized build (ZeRO-3 CPU offload, fp32), measured with DeepSpeed's dequantization and then, as a
    variant on the same weights, with the fused kernel (the worker refuses a fused run that did not go through
    the patch: ``check_dequant``)."""
    import json

    from hpi.executor.launch import launch
    from hpi.executor.spec import RunSpec
    from hpi.planner.specs.plan import Plan
    from hpi.planner.specs.workload import Workload

    model = tmp_path / "config.json"
    model.write_text(json.dumps(LLAMA))
    plan = Plan(offload="cpu", pin_memory=False, batch_size=2, persistence_threshold_elems=0, weight_bits=4)
    spec = RunSpec(plan=plan, model=str(model), workload=Workload(8, 6), device="cpu", dtype="fp32",
                   out_dir=str(tmp_path / "run"), variants=({"fused_dequant": True},))
    unfused = launch(spec, timeout_s=300).to_json()
    fused_doc = json.loads((tmp_path / "run" / unfused["variant_records"][0]).read_text())
    assert unfused["spec"]["fused_dequant"] is False and fused_doc["spec"]["fused_dequant"] is True
    assert fused_doc["spec"]["workload"]["fused_dequant"] is True
    assert len(unfused["tokens"]) == 2 and all(len(t) == 6 for t in unfused["tokens"])
    assert fused_doc["tokens"] == unfused["tokens"]
