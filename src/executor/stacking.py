"""q, k and v projections stacked into one matrix for the compiled decode step.

Why: at batch 1 a decode step's matrix products are matrix-vector reductions, and a reduction over a small
matrix does not reach the HBM rate: on one H200 the compiled Llama-3-8B step spent 32 us a layer on q, k, v and
o (80 MB, 19 us at 4.26 TB/s), where inductor had fused gate and up, whose outputs have one size, into one
55.5 us reduction over their 235 MB, at the HBM rate (benchmarks/results/2026-12-04-h200-split, call 1 profile).
q (4096 outputs) and k, v (1024 each) have different output sizes, so inductor keeps them apart, and it does not
merge three products of one input by itself. One [q; k; v] matrix makes them one reduction of 48 MB.

How: the attention modules keep their code. Each ``q_proj``/``k_proj``/``v_proj`` becomes a ``StackedPart`` of one
``StackedLinear``; the q part computes ``x @ [Wq; Wk; Wv]^T`` (+ the stacked biases) once and keeps it in the
stack's box, and the k and v parts return their slices of it. That holds only where the attention calls q, k
and v in this order on the same input, as transformers' Llama, Mistral and Qwen2 attention do;
``calls_qkv_in_order`` reads the class's own ``forward`` source to check it, so another class (or a transformers
version that changes the order) keeps its three Linears. The stacked weight is new memory: stack before anything
captures the old weights (a CUDA graph keeps the addresses it recorded).
"""

from __future__ import annotations

import functools
import inspect
import re

import torch
import torch.nn.functional as F
from torch import nn

PARTS = ("q_proj", "k_proj", "v_proj")


class StackedLinear(nn.Module):
    """The stacked weight [sum of outputs, in] (and bias), and the box the first part fills each forward."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.cat([m.weight for m in linears]), requires_grad=False)
        biases = [m.bias for m in linears]
        self.bias = (nn.Parameter(torch.cat(biases), requires_grad=False) if all(b is not None for b in biases)
                     else None)
        self.box: dict[str, torch.Tensor] = {}


class StackedPart(nn.Module):
    """Outputs ``start .. stop`` of the stack. The first part computes the whole product; the others read it."""

    def __init__(self, stack: StackedLinear, start: int, stop: int, first: bool) -> None:
        super().__init__()
        self.stack = [stack]  # a list: the stack is not this module's child (its weight is counted once)
        self.start, self.stop, self.first = start, stop, first
        self.in_features, self.out_features = stack.weight.shape[1], stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stack = self.stack[0]
        if self.first:
            stack.box["out"] = F.linear(x, stack.weight, stack.bias)
        return stack.box["out"][..., self.start:self.stop]


@functools.cache
def calls_qkv_in_order(attention_cls: type) -> bool:
    """Whether ``attention_cls.forward`` calls ``self.q_proj``, ``self.k_proj``, ``self.v_proj`` each once, in this
    order, on one input, and nothing else between the first and the last of them."""
    try:
        source = inspect.getsource(attention_cls.forward)
    except (OSError, TypeError):
        return False
    calls = re.findall(r"self\.(q_proj|k_proj|v_proj)\((\w+)\)", source)
    return [c[0] for c in calls] == list(PARTS) and len({c[1] for c in calls}) == 1


def stack_projections(stage: nn.Module) -> int:
    """Stack q, k and v of every attention module of ``stage`` whose class ``calls_qkv_in_order`` and whose three
    projections are plain ``nn.Linear`` of one input size, dtype and device. Returns how many were stacked."""
    stacked = 0
    for module in stage.modules():
        linears = [getattr(module, name, None) for name in PARTS]
        if not all(type(m) is nn.Linear for m in linears) or not calls_qkv_in_order(type(module)):
            continue
        if len({(m.in_features, m.weight.dtype, m.weight.device) for m in linears}) != 1:
            continue
        if len({m.bias is None for m in linears}) != 1:
            continue
        stack = StackedLinear(linears)
        module.qkv_stack = stack
        start = 0
        for i, (name, linear) in enumerate(zip(PARTS, linears)):
            setattr(module, name, StackedPart(stack, start, start + linear.out_features, first=i == 0))
            start += linear.out_features
        stacked += 1
    return stacked
