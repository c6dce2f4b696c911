"""Attention masks a stage builds itself, in the shapes transformers' sdpa path takes.

A boolean mask is True where a query may attend. Three builders: ``causal_mask`` for unpadded batches over a
dynamic cache (None where sdpa's own causal rule is exact), ``padded_causal_mask`` for left-padded batches
(transformers' own builders, what the HF model's forward calls) and ``static_causal_mask`` for a static cache
inside a CUDA graph (built on the device only). ``built_once`` keeps a compiled step from building a mask again
in every layer.
"""

from __future__ import annotations

import inspect

import torch

__all__ = ["built_once", "causal_mask", "padded_causal_mask", "static_causal_mask"]


def static_causal_mask(cache_position: torch.Tensor, max_len: int, window: int | None,
                       slot_mask: torch.Tensor | None) -> torch.Tensor:
    """Boolean [1 or b, 1, s, max_len] (True: attend) for queries at the slots ``cache_position`` [s] over a
    static cache of ``max_len`` slots: causal, inside ``window`` slots when given, and only real tokens'
    slots when ``slot_mask`` [b, max_len] is given. Every query may attend to its own slot, so a pad's query
    row is never empty (sdpa would return NaN for it, and a NaN in a pad's cached value would reach real
    tokens through a zero attention weight: 0 * NaN). Built on the device only: graph-capturable."""
    q = cache_position[:, None]
    k = torch.arange(max_len, device=cache_position.device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & ((q - k) < window)
    allowed = allowed[None, None]
    if slot_mask is not None:
        allowed = allowed & slot_mask[:, None, None, :].bool()
    return allowed | (k == q)[None, None]


# Off by default: measured on one H100, its saving was smaller than a compile's spread (``use_built_once``).
_ONCE = [False]


@torch.library.custom_op("hpi::built_once", mutates_args=())
def _built_once(mask: torch.Tensor) -> torch.Tensor:
    return mask.clone()


@_built_once.register_fake
def _(mask):
    return torch.empty_like(mask)


def built_once(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` itself, except while torch.compile traces with the switch on (``use_built_once``): then a copy
    inductor cannot see into, so that the mask is one buffer built once a step. Why: a mask is a few cheap pointwise
    ops of the cache slots, and inductor inlines such a computation into each of its consumers instead of storing it;
    a consumer that is not inductor's own code (hpi's decode attention, ``hpi::decode_attention``) then gets the mask
    computed again for it in every layer of the step (a compiled two-layer Llama's C++ code built it twice,
    tests/executor/test_masks.py; the H100 kernel tables of the compiled step show ``arange_bitwise_or`` in two
    kernels of every layer, benchmarks/results/2026-12-06-skinny/call2/kernels-b16.txt)."""
    return _built_once(mask) if _ONCE[0] and torch.compiler.is_compiling() else mask


def use_built_once(enabled: bool) -> None:
    """Switch ``built_once`` on or off for this process (off, the default: inductor inlines the mask into each layer).
    On one H100 it saved ~30 µs of kernel time in the 8B's compiled step, less than a compile's tuning moves the step
    (benchmarks/results/2026-12-07-fewer-kernels). A compiled step keeps the choice it was traced with: reset dynamo
    after switching."""
    _ONCE[0] = enabled


def causal_mask(past: int, seq: int, window: int | None, device) -> torch.Tensor | None:
    """A boolean [1, 1, seq, past + seq] mask (True: attend) for ``seq`` new tokens after ``past`` cached
    ones, or None where sdpa's own rule is exact (a one-go prefill or a one-token step inside the window)."""
    total = past + seq
    if not ((seq > 1 and past > 0) or (window is not None and total > window)):
        return None
    q = torch.arange(past, total, device=device)[:, None]
    k = torch.arange(total, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= (q - k) < window
    return allowed[None, None]


def padded_causal_mask(config, hidden: torch.Tensor, attention_mask: torch.Tensor, cache,
                       cache_position: torch.Tensor, position_ids: torch.Tensor,
                       window: int | None) -> torch.Tensor | None:
    """The 4D mask transformers' model forward would give its layers for this 2D padding mask
    [b, past + s] (a 4D one passes through unchanged): causal, pads masked, and a sliding window of
    ``window`` cache slots (slot distance = position distance between real tokens, so a window on slots is
    a window on positions). ``config`` is the stage's (sdpa) config; None where sdpa's own rule is exact."""
    from transformers import masking_utils

    if window is None:
        builder = masking_utils.create_causal_mask
    elif config.sliding_window != window:  # the builder reads the window from the config
        raise ValueError(f"layer window {window} != config.sliding_window({config.sliding_window}): "
                         f"the executor supports one sliding window per model")
    else:
        builder = masking_utils.create_sliding_window_causal_mask
    params = inspect.signature(builder).parameters
    args = dict(config=config, attention_mask=attention_mask, past_key_values=cache, position_ids=position_ids)
    args["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = hidden  # 5.x / 4.x name
    if "cache_position" in params:  # transformers 4.x sizes the mask from it
        args["cache_position"] = cache_position
    return builder(**args)
