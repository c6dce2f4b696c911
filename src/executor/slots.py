"""The serving KV cache: a fixed number of slots, each one request's keys and values, and the attention that
reads it for a step that mixes prompt chunks with decode tokens.

Why not transformers' caches: one ``DynamicCache`` holds one batch whose rows share a length, so a request
could not join or leave a running batch, and left padding would make a row's tokens depend on its batch
mates. Here slot ``s`` holds one sequence at cache positions 0, 1, ... (position = RoPE position = slot
column), each layer's keys and values live in one [slots, kv_heads, max_len, head_dim] tensor allocated once,
and a step writes each new token at its own (slot, position).

A step reaches the stage in one of two layouts, each described by the object passed where transformers'
layers carry the attention mask (they hand it to the attention function untouched; ``hpi.executor.attention``
dispatches on it):

- ``RaggedStep`` (eager): the step's tokens flattened into one row, [1, T] ids / [1, T, h] hidden states,
  any mix of prompt chunks and decode tokens (``hpi.executor.scheduler.Segment``). The linear layers see
  only real tokens; attention runs once for all decode tokens (each over its own slot) and once per prompt
  chunk (causal inside the chunk, over everything cached before it).
- ``DenseDecode`` (what a CUDA graph replays): one token for every slot, [slots, 1], inactive slots
  included and masked; shapes never change, and the mask is built on the device from a positions buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hpi.executor.decode_attention import grouped_sdpa


@dataclass
class RaggedStep:
    """One eager step's tokens: ``slots`` / ``positions`` [T] on the device; ``chunks`` the multi-token
    segments as (slot, first token index, token count, first position); ``decode`` the single-token ones as
    token indices (device) with their host-known longest key span."""

    slots: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    chunks: tuple[tuple[int, int, int, int], ...]
    decode_index: torch.Tensor  # [n_decode] int64: which of the T tokens are decode tokens
    decode_slots: torch.Tensor  # [n_decode] int64
    decode_positions: torch.Tensor  # [n_decode] int64
    decode_span: int  # keys the decode tokens read at most: max(position) + 1
    window: int | None = None  # sliding window of the layers this object is handed to (None: full)

    @classmethod
    def build(cls, segments, device: torch.device) -> "RaggedStep":
        """From scheduler segments (``slot``, ``start_pos``, ``n_tokens``), in their order."""
        slots, positions, chunks, decode = [], [], [], []
        for seg in segments:
            first = len(slots)
            n = seg.n_tokens
            slots += [seg.slot] * n
            positions += range(seg.start_pos, seg.start_pos + n)
            if n == 1:
                decode.append(first)
            else:
                chunks.append((seg.slot, first, n, seg.start_pos))
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        return cls(as_long(slots), as_long(positions), tuple(chunks), as_long(decode),
                   as_long([slots[i] for i in decode]), as_long([positions[i] for i in decode]),
                   max((positions[i] for i in decode), default=-1) + 1)

    def with_window(self, window: int | None) -> "RaggedStep":
        return RaggedStep(self.slots, self.positions, self.chunks, self.decode_index, self.decode_slots,
                          self.decode_positions, self.decode_span, window)

    @property
    def position_ids(self) -> torch.Tensor:
        return self.positions[None, :]


@dataclass
class DenseDecode:
    """One token for each of the slots ``slot_offset ..``: ``positions`` [rows] (a graph's input buffer). An
    inactive row writes at the cache's last position, which its slot's sequence (if one is mid-prompt there)
    writes for real only with its very last token, in the same forward that reads it."""

    positions: torch.Tensor
    window: int | None = None
    slot_offset: int = 0
    span: int | None = None  # keys read per slot (None: all max_len): a graph per span bucket reads no more

    def with_window(self, window: int | None) -> "DenseDecode":
        return DenseDecode(self.positions, window, self.slot_offset, self.span)

    @property
    def position_ids(self) -> torch.Tensor:
        return self.positions[:, None]


class SlotKVCache:
    """Keys and values of ``n_slots`` sequences of up to ``max_len`` tokens, per layer, written in place.

    Duck-types ``update(keys, values, layer_idx, ...)``, the one cache method decoder layers call. The stage
    ``bind``s the step (``RaggedStep`` or ``DenseDecode``) before each forward; ``update`` writes the new
    tokens at their (slot, position) and returns the layer's whole key and value tensors, which the attention
    (``ragged_attention``) reads slot by slot.
    """

    def __init__(self, n_slots: int, max_len: int) -> None:
        if n_slots < 1 or max_len < 2:
            raise ValueError(f"n_slots({n_slots}) >= 1 and max_len({max_len}) >= 2 are needed")
        self.n_slots, self.max_len = n_slots, max_len
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.step: RaggedStep | DenseDecode | None = None

    def bind(self, step: RaggedStep | DenseDecode) -> None:
        self.step = step

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.step is None:
            raise RuntimeError("SlotKVCache.update before bind(step): the stage must bind the step")
        if layer_idx == len(self.keys):
            _, heads, _, d = key_states.shape
            self.keys.append(key_states.new_zeros(self.n_slots, heads, self.max_len, d))
            self.values.append(value_states.new_zeros(self.n_slots, heads, self.max_len, value_states.shape[-1]))
        elif layer_idx > len(self.keys):
            raise RuntimeError(f"layer {layer_idx} wrote before layer {len(self.keys)}: layers must run in order")
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if isinstance(self.step, RaggedStep):  # [1, heads, T, d]: token t -> (slots[t], positions[t])
            slots, positions = self.step.slots, self.step.positions
            keys[slots, :, positions] = key_states[0].transpose(0, 1)
            values[slots, :, positions] = value_states[0].transpose(0, 1)
        else:  # [rows, heads, 1, d]: row r -> slot offset + r, position positions[r]
            rows = self.step.slot_offset + torch.arange(key_states.shape[0], device=keys.device)
            keys[rows, :, self.step.positions] = key_states[:, :, 0]
            values[rows, :, self.step.positions] = value_states[:, :, 0]
            rows = slice(self.step.slot_offset, self.step.slot_offset + key_states.shape[0])
            cols = slice(0, self.step.span or self.max_len)
            return keys[rows, :, cols], values[rows, :, cols]
        return keys, values

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def _window_ok(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & ((q_pos - k_pos) < window)
    return allowed


def changing_shape_backends():
    """sdpa's kernels wherever attention's shapes change from call to call: flash, memory-efficient and math, not
    cuDNN. cuDNN builds an execution plan for every new (query, key) length pair. A serving step's lengths change
    with every request: on one H200 each first step of a new mix of prompt chunks stalled 0.7-1.1 s
    (benchmarks/results/2026-12-02-h200-serve, call A). An eager decode step's key length grows by one every
    step: there cuDNN's attention took 2.1 ms of host time a call and 59% of the run's host time, in a profiled
    eager Llama-3-8B decode of 78 ms a step whose kernels were busy 7 ms of it
    (benchmarks/results/2026-12-05-h200-issue20, call 2, r8/profile-rank0.txt). A CUDA graph's shapes are fixed
    and its plan is built once, at capture (``hpi.executor.attention`` keeps the default there)."""
    from torch.nn.attention import SDPBackend

    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def ragged_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     step: RaggedStep | DenseDecode, scaling: float | None) -> torch.Tensor:
    """Attention of a step's queries over their own slots. ``keys``/``values``: the whole cache layer
    [slots, kv, max_len, d]. Returns transformers' attention output layout: [b, s, heads, d]."""
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(changing_shape_backends()):
        return _ragged_attention(query, keys, values, step, scaling)


def _ragged_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      step: RaggedStep | DenseDecode, scaling: float | None) -> torch.Tensor:
    if isinstance(step, DenseDecode):  # query [rows, H, 1, d], keys/values: those rows' slots
        k_pos = torch.arange(keys.shape[2], device=keys.device)[None, :]
        allowed = _window_ok(step.positions[:, None], k_pos, step.window)
        # sdpa, as before the split-KV kernel: serving's graphs per row and span bucket would each compile the
        # kernel's variant, and that path is not yet measured on a GPU (decode_attention's docstring)
        return grouped_sdpa(query[:, :, 0], keys, values, allowed, scaling)[:, None]
    _, heads, total, d = query.shape  # [1, H, T, d]
    out = query.new_empty(total, heads, d)
    if step.decode_index.numel():
        span = step.decode_span
        q = query[0].transpose(0, 1).index_select(0, step.decode_index)  # [n, H, d]
        k = keys.index_select(0, step.decode_slots)[:, :, :span]
        v = values.index_select(0, step.decode_slots)[:, :, :span]
        k_pos = torch.arange(span, device=keys.device)[None, :]
        allowed = _window_ok(step.decode_positions[:, None], k_pos, step.window)
        # sdpa, not the Triton kernel: a ragged step's span changes every step, and the kernel compiles per span
        out.index_copy_(0, step.decode_index, grouped_sdpa(q, k, v, allowed, scaling))
    for slot, first, n, start in step.chunks:
        end = start + n
        q = query[:, :, first : first + n]  # [1, H, n, d]
        k, v = keys[slot : slot + 1, :, :end], values[slot : slot + 1, :, :end]
        if start == 0 and step.window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            q_pos = torch.arange(start, end, device=keys.device)[:, None]
            allowed = _window_ok(q_pos, torch.arange(end, device=keys.device)[None, :], step.window)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[None, None], scale=scaling, enable_gqa=True)
        out[first : first + n] = o[0].transpose(0, 1)
    return out[None]
