"""BLOOM in the executor: ALiBi attention biases, and the layer loop transformers' ``BloomModel.forward`` runs.

``BloomBlock`` does not go through transformers' attention interface: it takes an ALiBi tensor
[b * heads, 1, keys] and an additive float mask [b, 1, queries, keys] and computes ``baddbmm`` + softmax
itself (transformers/models/bloom/modeling_bloom.py). So a BLOOM stage builds both here:

- the slopes are those of the *global* head index (BLOOM's ALiBi slopes of n_head heads): a TP rank holding heads
  [r * H / tp, (r + 1) * H / tp) takes exactly those heads' slopes;
- the key positions are ``arange(keys)`` without padding, and ``(cumsum(mask) - 1) * mask`` with a left-padding
  mask, what ``build_alibi_tensor`` computes (the bias is by key position only: softmax is invariant to the
  per-query constant that makes it relative);
- the mask is causal over cache slots with pads masked, 0 where a query attends and the dtype's minimum
  elsewhere, as transformers' eager mask.

The fused ``query_key_value`` [3H, H] is laid out per head ([heads, 3, head_dim], ``BloomAttention._reshape``),
so the even cut of dim 0 that ``hpi.executor.tp.shard_index`` makes for a column-parallel Linear holds whole
heads, each with its q, k and v rows.

Serving's ``SlotKVCache`` (``hpi.executor.slots``) holds each sequence unpadded at positions 0, 1, ..., so a key's
ALiBi position is its cache column; ``slot_block`` runs a ``BloomBlock``'s own submodules around
``alibi_slot_attention``, which reads the slots as ``ragged_attention`` does with the ALiBi bias in sdpa's float
mask (``softmax(scale * q.k + slope * key_position)``, masked keys at -inf), for a ragged step and for the
all-slots decode alike. The ``StaticKVCache`` of CUDA-graphed decode (``hpi.executor.graphs``) takes the prompt
as an empty dynamic cache would, then one token per step over all its slots, the mask and the ALiBi positions
built on the device from the slot mask (``static_causal_mask``): nothing synchronizes the host, so the step can
be captured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpi.executor.graphs import StaticKVCache
from hpi.executor.masks import static_causal_mask
from hpi.executor.slots import DenseDecode, RaggedStep, SlotKVCache

__all__ = ["additive_causal_mask", "alibi_bias", "alibi_layers", "alibi_slopes", "alibi_slot_attention",
           "check_config", "key_positions", "slot_block"]


def check_config(config) -> None:
    """Refuse a BLOOM config whose forward reads a row-parallel weight whole."""
    if getattr(config, "slow_but_exact", False) and getattr(config, "pretraining_tp", 1) > 1:
        raise NotImplementedError(
            f"BLOOM with slow_but_exact and pretraining_tp({config.pretraining_tp}) > 1 slices dense weights by "
            "hand in its forward, which tensor parallelism cannot shard: set slow_but_exact false")


def alibi_slopes(n_heads: int, tp_rank: int, tp_size: int, device) -> torch.Tensor:
    """float32 [n_heads / tp_size]: the ALiBi slopes of the heads TP rank ``tp_rank`` holds."""
    # Read through the public ``build_alibi_tensor``: its bias at key position 1 is each head's slope times 1, in
    # float32. The private ``_get_alibi_slopes`` behind it is not in every transformers (the GPU image's lacks it).
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    # contiguous: a strided view would give the bias built from it (``alibi_bias``) another memory layout, and the
    # score kernels another summation order (test_mixed_slot_steps_and_dense_decode_equal_each_sequence_alone)
    two_keys = torch.ones(1, 2, dtype=torch.long, device=device)
    slopes = build_alibi_tensor(two_keys, n_heads, torch.float32)[:, 0, 1].contiguous()
    per_rank = n_heads // tp_size
    return slopes[tp_rank * per_rank:(tp_rank + 1) * per_rank]


def key_positions(attention_mask: torch.Tensor | None, n_keys: int, device) -> torch.Tensor:
    """[b or 1, n_keys] position of each key: its slot, or with a padding mask [b, n_keys] its count of real
    tokens before it (pads at 0), as ``build_alibi_tensor``."""
    if attention_mask is None:
        return torch.arange(n_keys, device=device)[None]
    mask = attention_mask.to(device)
    return (mask.cumsum(dim=-1) - 1) * mask


def alibi_bias(slopes: torch.Tensor, positions: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """[batch * heads, 1, n_keys] in ``dtype``, the layout ``BloomAttention`` adds to its scores."""
    alibi = slopes[None, :, None] * positions[:, None, :]  # float32 [b or 1, heads, keys]
    alibi = alibi.expand(batch, -1, -1)
    return alibi.reshape(batch * slopes.shape[0], 1, positions.shape[-1]).to(dtype)


def additive_causal_mask(cache_position: torch.Tensor, n_keys: int, attention_mask: torch.Tensor | None,
                         dtype: torch.dtype) -> torch.Tensor:
    """[b or 1, 1, s, n_keys]: 0 where the query at slot ``cache_position[i]`` may attend (an earlier or its own
    slot, a real token), the dtype's minimum elsewhere."""
    q = cache_position.to(torch.long)[:, None]
    k = torch.arange(n_keys, device=cache_position.device)[None, :]
    allowed = (k <= q)[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(cache_position.device)[:, None, None, :].bool()
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=cache_position.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)


def alibi_layers(stage, hidden: torch.Tensor, cache, cache_position: torch.Tensor,
                 attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Run ``stage.layers`` (``BloomBlock``s, this rank's heads) over ``hidden`` [b, s, h] with ``cache``: a
    ``DynamicCache`` or None (``attention_mask`` [b, past + s] the left-padding mask or None), or a bound
    ``SlotKVCache`` (serving: ``hidden`` [1, T, h] of a ragged step or [slots, 1, h] of an all-slots decode)."""
    from transformers import DynamicCache

    shard = stage.shard
    slopes = alibi_slopes(stage.full_config.n_head, shard.tp_rank, shard.tp_size, hidden.device)
    if isinstance(cache, SlotKVCache):
        for layer in stage.layers:
            hidden = slot_block(layer, hidden, cache, slopes)
        return hidden
    batch, seq = hidden.shape[:2]
    if isinstance(cache, StaticKVCache):
        attention_mask, mask = _bind_static(cache, seq, cache_position, attention_mask, hidden.dtype)
        n_keys = mask.shape[-1]
    elif cache is None or isinstance(cache, DynamicCache):
        n_keys = (cache.get_seq_length() if cache is not None else 0) + seq
        if attention_mask is not None and attention_mask.shape[-1] != n_keys:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} keys, the cache and input "
                             f"{n_keys}: give the padding mask of every cached and new token")
        mask = additive_causal_mask(cache_position.to(hidden.device), n_keys, attention_mask, hidden.dtype)
    else:
        raise NotImplementedError(f"BLOOM's ALiBi attention has no path for a {type(cache).__name__}")
    alibi = alibi_bias(slopes, key_positions(attention_mask, n_keys, hidden.device), batch, hidden.dtype)
    for layer in stage.layers:
        out = layer(hidden, alibi=alibi, attention_mask=mask, layer_past=cache, use_cache=cache is not None)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _bind_static(cache: StaticKVCache, seq: int, cache_position: torch.Tensor, slot_mask: torch.Tensor | None,
                 dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Bind a static cache's slots for this forward; returns the padding mask over the keys it reads (None: no
    padding) and the additive mask. The prompt (several tokens, from slot 0) reads only the slots it writes; a
    one-token step reads every slot behind ``static_causal_mask`` (``slot_mask`` [b, max_len]: 1 for a real
    token's slot)."""
    if seq > 1 and not cache.is_empty:
        raise ValueError("a StaticKVCache takes the prompt in one forward from slot 0, then one token per step")
    cache.bind(cache_position, visible=seq if seq > 1 else None)
    n_keys = seq if seq > 1 else cache.max_len
    padding = None if slot_mask is None else slot_mask[:, :n_keys]
    allowed = static_causal_mask(cache_position, n_keys, None, padding)
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return padding, zeros.masked_fill(~allowed, torch.finfo(dtype).min)


# ---- serving: the slot cache -----------------------------------------------------------------------------------
def slot_block(layer, hidden: torch.Tensor, cache: SlotKVCache, slopes: torch.Tensor) -> torch.Tensor:
    """``BloomBlock.forward`` (inference: dropout off) over the slot cache: the block's own norms, projections and
    MLP, called module by module (so ZeRO-3 gathers each in its hooks), around ``alibi_slot_attention``."""
    attn = layer.self_attention
    normed = layer.input_layernorm(hidden)
    residual = normed if layer.apply_residual_connection_post_layernorm else hidden
    query, key, value = attn._reshape(attn.query_key_value(normed))  # [b, heads, s, d] each
    keys, values = cache.update(key, value, attn.layer_idx)
    context = alibi_slot_attention(query, keys, values, cache.step, slopes, attn.inv_norm_factor)
    attended = attn.dense(context.reshape(*hidden.shape[:2], -1)) + residual
    normed = layer.post_attention_layernorm(attended)
    return layer.mlp(normed, normed if layer.apply_residual_connection_post_layernorm else attended)


def _bias(slopes: torch.Tensor, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sdpa's float mask [n, heads, q, L] from ``allowed`` [n, q, L]: ``slope * key_position`` where a query may
    attend, -inf elsewhere (every query attends at least to its own slot)."""
    k_pos = torch.arange(allowed.shape[-1], device=allowed.device, dtype=torch.float32)
    bias = (slopes[:, None, None] * k_pos).to(dtype)  # [heads, 1, L]
    return bias.masked_fill(~allowed[:, None], float("-inf"))


def alibi_slot_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         step: RaggedStep | DenseDecode, slopes: torch.Tensor, scale: float) -> torch.Tensor:
    """Each query over its own slot's keys with ALiBi (``hpi.executor.slots.ragged_attention``'s reads). ``keys`` /
    ``values``: the cache layer (a ``DenseDecode``: its rows' slots); returns [b, s, heads, d]."""
    if step.window is not None:
        raise ValueError("BLOOM has no sliding window; the step carries one")
    if isinstance(step, DenseDecode):  # query [rows, H, 1, d]
        k_pos = torch.arange(keys.shape[2], device=keys.device)
        allowed = (k_pos[None, :] <= step.positions[:, None])[:, None]  # [rows, 1, L]
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=_bias(slopes, allowed, query.dtype),
                                             scale=scale)
        return out.transpose(1, 2)
    _, heads, total, d = query.shape  # [1, H, T, d]
    out = query.new_empty(total, heads, d)
    if step.decode_index.numel():
        span = step.decode_span
        q = query[0].transpose(0, 1).index_select(0, step.decode_index)[:, :, None]  # [n, H, 1, d]
        k = keys.index_select(0, step.decode_slots)[:, :, :span]
        v = values.index_select(0, step.decode_slots)[:, :, :span]
        allowed = (torch.arange(span, device=keys.device)[None, :] <= step.decode_positions[:, None])[:, None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=_bias(slopes, allowed, q.dtype), scale=scale)
        out.index_copy_(0, step.decode_index, o[:, :, 0])
    for slot, first, n, start in step.chunks:
        end = start + n
        q = query[:, :, first:first + n]  # [1, H, n, d]
        k, v = keys[slot:slot + 1, :, :end], values[slot:slot + 1, :, :end]
        q_pos = torch.arange(start, end, device=keys.device)[:, None]
        allowed = (torch.arange(end, device=keys.device)[None, :] <= q_pos)[None]  # [1, n, end]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=_bias(slopes, allowed, q.dtype), scale=scale)
        out[first:first + n] = o[0].transpose(0, 1)
    return out[None]
