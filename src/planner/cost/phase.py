"""The two phases of generation, as the cost terms need them: tokens per forward and attention context."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpi.planner.cost.inputs import Arrangement, Knobs


@dataclass(frozen=True)
class Phase:
    name: str  # "prefill" or "decode"
    sequences: np.ndarray  # (N,) sequences in one forward of one rank: the micro-batch
    tokens: np.ndarray  # (N,) tokens in that forward
    attn_ctx_tokens: float  # keys each query token attends to, on average
    kv_read_tokens: float  # cached tokens per sequence read from the KV cache by one forward

    @property
    def is_prefill(self) -> bool:
        return self.name == "prefill"


def micro_batch_size(arrangement: Arrangement, knobs: Knobs) -> np.ndarray:
    return knobs.batch_size / arrangement.dp / knobs.micro_batches


def prefill_phase(arrangement: Arrangement, knobs: Knobs) -> Phase:
    prompt = arrangement.workload.prompt_len_tokens
    mb = micro_batch_size(arrangement, knobs)
    # Causal attention: query i attends to i+1 keys, (S+1)/2 on average; K/V come from on-chip tiles.
    return Phase("prefill", mb, mb * prompt, (prompt + 1) / 2.0, 0.0)


def decode_phase(arrangement: Arrangement, knobs: Knobs) -> Phase:
    ctx = arrangement.workload.mean_decode_context_tokens + 1.0  # the new token attends to itself too
    mb = micro_batch_size(arrangement, knobs)
    return Phase("decode", mb, mb, ctx, ctx)
