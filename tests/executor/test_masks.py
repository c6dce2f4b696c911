"""hpi.executor.masks.built_once: a compiled decode step builds its mask once, not once per layer.

The step is compiled on the CPU (inductor's C++) with every layer's attention going to hpi's decode-attention op, as
on a GPU; the op's body is sdpa over the grouped query here (its reference, ``grouped_sdpa``), so the test needs no
Triton.
"""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

from hpi.executor import decode_attention, masks  # noqa: E402
from hpi.executor.generate import PipelineGenerator, Sampler, left_pad  # noqa: E402
from hpi.executor.masks import built_once, static_causal_mask  # noqa: E402
from hpi.executor.modeling import ShardSpec, build_stage  # noqa: E402
from tests.executor.test_padding import _one_rank, _tiny  # noqa: E402

LAYERS = 2
# the decode-attention op's mask argument (its fourth) in inductor's generated code: a buffer, or a view of one
MASK_ARG = re.compile(r"hpi\.decode_attention\.default\((?:[^,]+, ){3}(?:reinterpret_tensor\()?(buf\d+)")


def test_outside_a_compile_the_mask_is_the_same_tensor():
    mask = static_causal_mask(torch.tensor([3]), 6, None, None)
    assert built_once(mask) is mask


def test_the_copy_a_compile_sees_is_the_mask():
    mask = static_causal_mask(torch.arange(2, 5), 7, 3, torch.tensor([[0, 1, 1, 1, 1, 1, 1]]))
    copy = torch.ops.hpi.built_once(mask)
    assert copy.dtype == torch.bool and copy.data_ptr() != mask.data_ptr() and torch.equal(copy, mask)


def _compiled_decode(monkeypatch, once: bool) -> tuple[list[list[int]], str]:
    """Tokens of a compiled static-cache decode of tiny-llama cut to ``LAYERS`` layers and the step's generated code."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(decode_attention, "covers", lambda *args: True)  # the op, not sdpa, as on a GPU
    monkeypatch.setattr(decode_attention, "triton_decode_attention", decode_attention.grouped_sdpa)
    torch._dynamo.reset()
    config = _tiny("llama")
    config.num_hidden_layers = LAYERS
    stage = build_stage(config, ShardSpec.whole(config.num_hidden_layers), dtype=torch.float32, seed=0).eval()
    ids, padding = left_pad([[5, 9, 11, 7, 3], [4, 8, 6]], 0)
    gen = PipelineGenerator(stage=stage, groups=_one_rank(), new_cache=DynamicCache, hidden_size=0,
                            dtype=torch.float32, device=torch.device("cpu"), micro_batches=1, sampler=Sampler(),
                            decode_graphs=True, decode_compile=True)
    masks.use_built_once(once)
    try:
        out, codes = run_and_get_code(lambda: gen.run(ids, 2, ids.shape[1], 3, chat=False, padding=padding))
    finally:
        masks.use_built_once(False)
    (step,) = [code for code in codes if "hpi.decode_attention" in code]
    return torch.cat(out).tolist(), step


def test_a_compiled_step_reads_one_mask_in_every_layer(monkeypatch):
    """With ``built_once`` switched on (``use_built_once``) every layer's attention reads the one mask buffer; off (the
    default), inductor built one per layer. The tokens are the same either way."""
    tokens, code = _compiled_decode(monkeypatch, once=True)
    assert len(MASK_ARG.findall(code)) == LAYERS and len(set(MASK_ARG.findall(code))) == 1
    assert code.count("torch.ops.hpi.built_once.default(") == 1
    inlined_tokens, inlined = _compiled_decode(monkeypatch, once=False)
    assert len(set(MASK_ARG.findall(inlined))) == LAYERS and "built_once" not in inlined
    assert tokens == inlined_tokens
