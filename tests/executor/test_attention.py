"""hpi.executor.attention: transformers' sdpa calls of the stages run without cuDNN (a plan per new length: 2.1 ms
of host time a call in eager decode on one H200), with the same numbers as plain sdpa."""

from types import SimpleNamespace

import pytest
import torch

from hpi.executor.attention import grouped_decode_sdpa


def _flags():
    cuda = torch.backends.cuda
    return {"cudnn": cuda.cudnn_sdp_enabled(), "flash": cuda.flash_sdp_enabled(),
            "efficient": cuda.mem_efficient_sdp_enabled(), "math": cuda.math_sdp_enabled()}


@pytest.mark.parametrize("q_len, masked", [(1, False), (5, False), (5, True)], ids=["decode", "prefill", "padded"])
def test_transformers_sdpa_runs_without_cudnn_and_gives_sdpas_numbers(q_len, masked, monkeypatch):
    from transformers.integrations import sdpa_attention

    seen = []
    real = sdpa_attention.sdpa_attention_forward

    def spy(*args, **kwargs):
        seen.append(_flags())
        return real(*args, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy)
    before = _flags()
    g = torch.Generator().manual_seed(0)
    b, heads, length, d = 2, 4, 7, 8
    q = torch.randn(b, heads, q_len, d, generator=g)
    k, v = torch.randn(b, heads, length, d, generator=g), torch.randn(b, heads, length, d, generator=g)
    mask = (torch.rand(b, 1, q_len, length, generator=g) > 0.3) if masked else None
    if masked:
        mask[..., -1] = True  # every query keeps a key
    module = SimpleNamespace(num_key_value_groups=1, is_causal=False)
    got, _ = grouped_decode_sdpa(module, q, k, v, mask, scaling=0.5)
    assert seen == [{"cudnn": False, "flash": True, "efficient": True, "math": True}]
    assert _flags() == before  # restored after the call
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5).transpose(1, 2)
    torch.testing.assert_close(got, want)
