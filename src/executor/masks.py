"""Attention masks a stage builds itself, in the shapes transformers' sdpa path takes.

A boolean mask is True where a query may attend. Three builders: ``causal_mask`` for unpadded batches over a
dynamic cache (None where sdpa's own causal rule is exact), ``padded_causal_mask`` for left-padded batches
(transformers' own builders, what the HF model's forward calls) and ``static_causal_mask`` for a static cache
inside a CUDA graph (built on the device only).
"""

from __future__ import annotations

import inspect

import torch

__all__ = ["causal_mask", "padded_causal_mask", "static_causal_mask"]


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
