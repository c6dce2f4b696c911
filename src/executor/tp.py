"""Megatron-style tensor parallelism for one decoder stage: which slice of each weight a TP rank holds, and
the two small modules that put the shards back together (row-parallel linear, vocab-parallel LM head).

The slicing rule is one pure function of the HF parameter name (``shard_index``), used both to cut a
freshly generated tensor and to read a slice from a safetensors checkpoint, so the two paths cannot
disagree. Column-parallel layers (q/k/v, gate/up, fc1) need no module of their own: they are plain
``nn.Linear`` of the sharded width. Row-parallel layers (o_proj, down_proj, out_proj, fc2) are a wrapper
that *calls* an inner bias-free ``nn.Linear`` (DeepSpeed ZeRO-3 gathers a module's parameters in that
module's forward hooks, so a shard must be used through its own module), all-reduces over the TP group,
then adds the full bias once.

With ``tp_size == 1`` nothing here touches ``torch.distributed``: the stage keeps plain ``nn.Linear``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hpi.executor.spans import COLLECTIVES

__all__ = [
    "COLUMN_PARALLEL",
    "ROW_PARALLEL",
    "RowParallelLinear",
    "Slice",
    "VocabParallelLMHead",
    "all_reduce_output",
    "check_tp",
    "kv_heads_per_rank",
    "shard_index",
    "tp_allreduce_seconds",
    "vocab_rows_per_rank",
]

# Module names (the last component before .weight/.bias) and how they are cut.
# Mixtral's stored expert names: w1 / w3 (gate / up) column-parallel, w2 (down) row-parallel (hpi.executor.experts).
# BLOOM: query_key_value is laid out per head ([heads, 3, head_dim]), so its even row cut holds whole heads.
# DeepSeek's MLA: q_b_proj and kv_b_proj give [heads, ...] outputs (cut by whole heads); q_a_proj and
# kv_a_proj_with_mqa make the latent every head reads, so no rule names them and every rank holds them whole.
COLUMN_PARALLEL = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "fc1", "w1", "w3", "query_key_value",
                             "dense_h_to_4h", "q_b_proj", "kv_b_proj"})
ROW_PARALLEL = frozenset({"o_proj", "down_proj", "out_proj", "fc2", "w2", "dense", "dense_4h_to_h"})
_KV = frozenset({"k_proj", "v_proj"})


def check_tp(n_heads: int, n_kv_heads: int, ffn: int, tp_size: int, where: str = "model") -> None:
    """Refuse a TP degree the sharding cannot honour, quoting the failing equation."""
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    if n_heads % tp_size:
        raise ValueError(f"{where}: num_attention_heads({n_heads}) % tp({tp_size}) != 0: heads cannot be split evenly")
    if n_kv_heads % tp_size and tp_size % n_kv_heads:
        raise ValueError(
            f"{where}: num_key_value_heads({n_kv_heads}) and tp({tp_size}) divide neither way: "
            "kv heads must be split (kv % tp == 0) or replicated (tp % kv == 0)"
        )
    if ffn % tp_size:
        raise ValueError(f"{where}: intermediate size({ffn}) % tp({tp_size}) != 0: the MLP cannot be split evenly")


def kv_heads_per_rank(n_kv_heads: int, tp_size: int) -> int:
    """KV heads each rank holds: split when tp <= kv, one replicated head when tp > kv."""
    return n_kv_heads // tp_size if n_kv_heads >= tp_size else 1


def vocab_rows_per_rank(vocab: int, tp_size: int) -> int:
    """LM-head rows per rank; the vocab is padded up to a multiple of tp (padding rows are zero)."""
    return -(-vocab // tp_size)


@dataclass(frozen=True)
class Slice:
    """This rank's part of one global tensor: ``[start, stop)`` along ``dim``, zero-padded to ``rows``
    entries along that dim (only the vocab-parallel LM head ever pads)."""

    dim: int
    start: int
    stop: int
    padded: int

    def index(self) -> tuple[slice, ...]:
        """The index expression for ``tensor[...]`` or safetensors' ``get_slice(name)[...]``."""
        return (slice(None),) * self.dim + (slice(self.start, self.stop),)

    def apply(self, full: torch.Tensor) -> torch.Tensor:
        """Cut (and pad) a full tensor; the result owns its storage, so the full one can be freed at once."""
        part = full[self.index()]
        if self.stop - self.start == self.padded:
            return part.clone(memory_format=torch.contiguous_format)
        return self.pad(part)

    def pad(self, part: torch.Tensor) -> torch.Tensor:
        """Zero-pad a cut part to ``padded`` entries along ``dim`` (a no-op when nothing is missing)."""
        n = self.stop - self.start
        if n == self.padded:
            return part
        shape = list(part.shape)
        shape[self.dim] = self.padded
        out = part.new_zeros(shape)
        out.narrow(self.dim, 0, n).copy_(part)
        return out


def shard_index(
    hf_name: str,
    shape: tuple[int, ...],
    *,
    tp_rank: int,
    tp_size: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
) -> Slice | None:
    """The slice of global parameter ``hf_name`` (of global ``shape``) that TP rank ``tp_rank`` holds,
    or None when every rank holds it whole (embeddings, norms, row-parallel biases)."""
    if tp_size == 1:
        return None
    parts = hf_name.split(".")
    module, leaf = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", parts[-1])
    if module == "lm_head" and leaf == "weight":
        rows = vocab_rows_per_rank(shape[0], tp_size)
        start = min(tp_rank * rows, shape[0])
        return Slice(0, start, min(start + rows, shape[0]), rows)
    if module in _KV and n_kv_heads < tp_size:
        # Replicate: the query heads of this rank [r*H/tp, (r+1)*H/tp) all read kv head r // (tp/kv).
        head = tp_rank // (tp_size // n_kv_heads)
        return Slice(0, head * head_dim, (head + 1) * head_dim, head_dim)
    if module in COLUMN_PARALLEL:  # weight [out, in] and bias [out]: split the output features
        return _even(0, shape[0], tp_rank, tp_size, hf_name)
    if module in ROW_PARALLEL and leaf == "weight":  # weight [out, in]: split the input features
        return _even(1, shape[1], tp_rank, tp_size, hf_name)
    return None


def _even(dim: int, n: int, rank: int, size: int, name: str) -> Slice:
    if n % size:
        raise ValueError(f"{name}: dim {dim} of size {n} % tp({size}) != 0")
    step = n // size
    return Slice(dim, rank * step, (rank + 1) * step, step)


def tp_allreduce_seconds(reset: bool = False) -> float:
    """Seconds this process spent in TP collectives so far: the row-parallel all-reduces and the LM head's
    all-gather (synchronizes CUDA once, to read the pending events). 0.0 at tp 1. Every collective of this
    process is timed in ``hpi.executor.spans.COLLECTIVES``; at tp > 1 these are its only collectives during
    ``hpi run``'s measured forwards (pipeline hand-offs are not timed there)."""
    return COLLECTIVES.total(reset)


TP_ALL_REDUCE, TP_ALL_GATHER = ("all_reduce", "tp"), ("all_gather", "tp")  # (op, group) keys of the timer


def timed_all_reduce(t: torch.Tensor, tp_group) -> None:
    """Sum ``t`` in place over the TP group, its time counted in ``tp_allreduce_seconds``."""
    token = COLLECTIVES.start(t)
    torch.distributed.all_reduce(t, group=tp_group)
    COLLECTIVES.stop(token, TP_ALL_REDUCE)


def all_reduce_output(module: nn.Module, tp_group) -> None:
    """Sum ``module``'s output over the TP group after its forward: for a block whose every rank computes a
    partial sum (a mixture of experts whose FFN width is split: each expert's down projection sees only
    this rank's slice of its hidden units, so the block output is one term of the sum). The router stays
    whole on every rank and sees the same input, so every rank picks the same experts."""

    def reduce(_module, _inputs, out):
        timed_all_reduce(out, tp_group)
        return out

    module.register_forward_hook(reduce)


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x_shard @ W_shard^T) + b``: the inner Linear holds ``W[:, in-slice]`` and no bias;
    the full bias (if any) lives here and is added once, after the reduction."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp_group, *, device=None, dtype=None):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        timed_all_reduce(out, self.tp_group)
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return f"bias={self.bias is not None}"


class VocabParallelLMHead(nn.Module):
    """Column-parallel LM head: each rank computes ``rows`` vocab entries (the last rank's tail is zero
    padding), the logits are all-gathered over the TP group and cut back to ``vocab``."""

    def __init__(self, hidden: int, vocab: int, tp_size: int, tp_group, *, device=None, dtype=None):
        super().__init__()
        self.vocab, self.tp_size, self.tp_group = vocab, tp_size, tp_group
        self.linear = nn.Linear(hidden, vocab_rows_per_rank(vocab, tp_size), bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.linear(x).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.tp_size)]
        token = COLLECTIVES.start(local)
        torch.distributed.all_gather(parts, local, group=self.tp_group)
        COLLECTIVES.stop(token, TP_ALL_GATHER)
        return torch.cat(parts, dim=-1)[..., : self.vocab]

    def extra_repr(self) -> str:
        return f"vocab={self.vocab}, tp={self.tp_size}"
