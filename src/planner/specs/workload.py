"""What the user asks the model to do (prompt and generation lengths), and the run conditions outside the Plan's
search space that change what it costs: the compute dtype, how a ZeRO-3 fetch is waited for, and how the decode
step and the dequantization run.

- ``compute_dtype``: the 16-bit (or fp32) type activations and dequantized weights are computed in (the
  executor's ``--dtype``). It picks DeepSpeed's dequantization path for 8/4-bit weights (``cost.dequant``):
  fp16 has a fused CUDA kernel for 4-bit weights, bf16 and fp32 run a chain of torch element-wise ops.
  Tensor sizes follow the plan's weight bits and stay 16-bit elsewhere (``cost.inputs.COMPUTE_BYTES``).
- ``fetch_wait``: ``stream`` is hpi's stream-ordered ZeRO-3 fetch wait (the compute stream waits for the copy
  on the GPU; the host runs ahead: ``hpi.executor.zero3.stream_ordered_fetch``), ``host`` is DeepSpeed's stock
  wait, which synchronizes the host with the copy stream at every fetch (``cost.estimate`` says what that
  serializes). Both wait for every copy queued, the prefetches ahead included (``cost.prefetch_lag``). ``event``,
  the default, waits for each parameter's own copy only (``hpi.executor.zero3.copy_ordered_fetch``) where the
  partition group is one rank and the weights come from host memory, and is the stream wait elsewhere (dp > 1,
  NVMe: ``hpi.executor.zero3.copy_orders``, ``cost.streaming.copy_ordered``). Runs recorded
  before the executor had the field ran the host wait; runs before 2026-12-06's event wait, the stream wait.
- ``decode_graphs``: each decode step is replayed as a CUDA graph (``hpi.executor.graphs``) where the plan allows
  it (``Plan.graph_blocker``): the host launches one graph instead of every kernel, so the per-layer host
  time and TP's rank drift leave the decode step (``cost.overhead``). Runs recorded before the field ran
  eagerly.
- ``decode_compile``: the graphed decode step is compiled by ``torch.compile`` before it is captured
  (``hpi.executor.graphs``): fused element-wise kernels and tuned matrix-vector reductions, so a layer's fixed
  device time shrinks (``cost.overhead``). Only where the step is graphed; runs recorded before the field were not.
- ``fused_dequant``: 8/4-bit weights are dequantized by hpi's one fused kernel (``hpi.executor.dequant``) instead
  of DeepSpeed's chain of element-wise torch ops (``cost.dequant``). Runs recorded before the field ran DeepSpeed's.
- ``skinny_gemm``: the graphed decode step runs a layer's sibling products (q/k/v, gate/up) as one stacked product
  and its products of 2-16 rows in hpi's few-row kernel (``hpi.executor.skinny_gemm``), so a layer's fixed device
  time and its growth with the rows shrink (``cost.overhead``). Only where the step is graphed; runs recorded before
  the field did not, except those a manifest entry says did (``validation/fidelity_set.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PROMPT_LEN = 512
DEFAULT_GEN_LEN = 32
COMPUTE_DTYPES = ("bf16", "fp16", "fp32")
FETCH_WAITS = ("stream", "host", "event")
# The run conditions that are switches (on / off), in the order records and JSON documents list them.
SWITCHES = ("decode_graphs", "decode_compile", "fused_dequant", "skinny_gemm")


@dataclass(frozen=True)
class Workload:
    prompt_len_tokens: int = DEFAULT_PROMPT_LEN
    gen_len_tokens: int = DEFAULT_GEN_LEN
    compute_dtype: str = "bf16"
    fetch_wait: str = "event"
    decode_graphs: bool = False
    decode_compile: bool = False
    fused_dequant: bool = False
    skinny_gemm: bool = False

    def __post_init__(self) -> None:
        if self.prompt_len_tokens < 1:
            raise ValueError(f"prompt length {self.prompt_len_tokens} < 1: pass --prompt-len 1 or more")
        if self.gen_len_tokens < 1:
            raise ValueError(f"generation length {self.gen_len_tokens} < 1: pass --gen-len 1 or more")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute dtype {self.compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
        if self.fetch_wait not in FETCH_WAITS:
            raise ValueError(f"fetch wait {self.fetch_wait!r} is not one of {', '.join(FETCH_WAITS)}")
        for name in SWITCHES:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def context_len_tokens(self) -> int:
        """Tokens in the KV cache at the end of generation."""
        return self.prompt_len_tokens + self.gen_len_tokens

    @property
    def mean_decode_context_tokens(self) -> float:
        """Average cache length over the decode steps (step i attends to prompt + i tokens)."""
        return self.prompt_len_tokens + (self.gen_len_tokens - 1) / 2.0
