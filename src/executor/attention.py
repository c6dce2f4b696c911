"""The attention function the stages run: transformers' sdpa, with grouped-query decode kept grouped.

transformers' sdpa path gives PyTorch ``enable_gqa`` only when there is no mask; with a mask (padded rows,
a sliding window past its end, and every step over a static cache, ``hpi.executor.graphs``) transformers 5.17
repeats each KV head for its query heads first (``repeat_kv``), which copies the whole cache every layer
and step: on the 1x H100 the graphed 8B decode took 9.4 ms at batch 1 but 16.7 / 36.9 ms at 16 / 64, where
the bytes it must read grow by 7% / 26% (benchmarks/results/2026-11-22-h100/run8). For one query token per
row the copy is not needed: the G query heads that share a KV head become G query rows of that KV head
(``[b, kv, G, d]``), the row's key mask broadcasts over them, and one sdpa call over the unrepeated cache
gives the same numbers (transformers 5.23 does this itself, as ``pack_gqa``). On CUDA that step goes to hpi's
split-KV Triton kernel (``hpi.executor.decode_attention``), whose work follows the slots the mask allows rather
than the static cache's length. Every sdpa call outside a CUDA graph's capture (prefill, eager decode over a
growing cache) runs without cuDNN, whose plan per new length cost 2.1 ms of host time a call in eager decode
(``slots.changing_shape_backends``). A serving step (its
``RaggedStep`` / ``DenseDecode`` arrives where the mask would) goes to ``hpi.executor.slots.ragged_attention``.
Every other case goes to transformers' own function unchanged.

Registered under its own name (``ATTENTION``) in transformers' attention and mask interfaces, so the
stage's configs select it and transformers' mask builders treat it as sdpa.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import sdpa_kernel

from hpi.executor.decode_attention import decode_attention
from hpi.executor.slots import DenseDecode, RaggedStep, changing_shape_backends, ragged_attention

ATTENTION = "hpi_sdpa"


def grouped_decode_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-interface signature; returns ([b, s, heads, d], None) as its sdpa does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if isinstance(attention_mask, (RaggedStep, DenseDecode)):  # serving over the slot cache
        return ragged_attention(query, key, value, attention_mask, scaling), None
    groups = getattr(module, "num_key_value_groups", 1)
    b, heads, q_len, d = query.shape
    if attention_mask is None or groups == 1 or q_len != 1 or dropout or kwargs.get("position_bias") is not None:
        # Not cuDNN, whose plan per new length costs ms of host time (slots.py), but in a graph's capture: its
        # shapes are fixed and the plan is built once.
        capturing = query.is_cuda and torch.cuda.is_current_stream_capturing()
        with contextlib.nullcontext() if capturing else sdpa_kernel(changing_shape_backends()):
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
    allowed = attention_mask[:, 0, 0, : key.shape[-2]]  # [b|1, L]: one row's mask for all its G queries
    return decode_attention(query[:, :, 0], key, value, allowed, scaling)[:, None], None


def register() -> str:
    """Make ``ATTENTION`` a name transformers' layers and mask builders accept; returns it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION, grouped_decode_sdpa)
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return ATTENTION
