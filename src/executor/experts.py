"""Routed experts held one ``nn.Linear`` per projection per expert, in place of transformers' fused 3-D tensors.

transformers >= 5 stores a layer's routed experts as two parameters over all experts (``gate_up_proj``
[E, 2f, h], ``down_proj`` [E, h, f]). Two things break on that layout for hpi:

- DeepSpeed's weight quantization touches only ``nn.Linear`` / ``nn.Embedding`` weights
  (``deepspeed.inference.quantization.utils.WEIGHT_QUANTIZATION_LAYERS``, matched by ``type(module)``), so
  a "4-bit" Mixtral kept every expert in 16 bits: Mixtral-8x22B's 135 B expert weights alone are 270 GB,
  which is how its build on one H200 (125 GB of host memory) was OOM-killed while the planner, which
  quantizes every matrix, said 83 GB.
- Real checkpoints store experts one by one (Mixtral ``block_sparse_moe.experts.<e>.w1``, DeepSeek
  ``mlp.experts.<e>.gate_proj``): with one parameter per expert projection each rank reads its slice of
  each stored tensor directly (``hpi.executor.checkpoint.CheckpointReader``), never a fused copy.

Each ``ExpertMLP`` is flagged a ZeRO-3 leaf module (``_z3_leaf``, DeepSpeed's
``deepspeed.utils.set_z3_leaf_modules``): entering it gathers its three projections at once and no hooks
sit inside. Under ZeRO-3 every expert is entered on every forward, routed-to or not, so the module trace
ZeRO-3 prefetches from is the same whatever the router picks (a changed trace makes DeepSpeed drop it and
stop prefetching: ``partitioned_param_coordinator.py``, "Invalidate trace cache") and a layer's experts are
all gathered, one expert at a time (``hpi.planner.cost.shape`` ``EXPERTS_GATHERED_WHOLE``); an expert no
token was routed to returns at once, so only routed experts compute (and, quantized, dequantize), in
increasing expert order as transformers' own loop adds them. One leaf per expert, rather than one for the
layer, keeps what one fetch swaps in from NVMe at three partitions (one staging buffer each). Mixtral's MoE block
is itself a leaf (DeepSpeed's default ``leaf_module.classes`` names ``MixtralSparseMoeBlock``), so there the router
and every expert are gathered at once on entering the block, and an NVMe fetch swaps in all of them
(``hpi.planner.cost.shape.MOE_BLOCK_LEAF_FAMILIES``).

Under TP every expert holds ``f / tp`` of its FFN width (gate/up column-parallel, down row-parallel without
its own all-reduce); the MoE block's output is all-reduced once (``hpi.executor.tp.all_reduce_output``).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["ExpertMLP", "RoutedExperts", "per_expert_modules"]


class ExpertMLP(nn.Module):
    """One routed expert: ``down(act(gate(x)) * up(x))``, the SwiGLU MLP of Mixtral and DeepSeek."""

    def __init__(self, hidden: int, width: int, act: str) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.act_fn = ACT2FN[act]
        self._z3_leaf = True  # ZeRO-3 gathers the three projections on entry and hooks none inside

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.shape[0]:  # entered only so ZeRO-3 sees the same modules every forward (see the module doc)
            return x
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class RoutedExperts(nn.ModuleList):
    """A layer's routed experts, ``experts.<e>.{gate,up,down}_proj``; called as transformers calls its fused
    experts: ``(hidden [t, h], top_k_index [t, k], top_k_weights [t, k]) -> [t, h]``."""

    def __init__(self, n_experts: int, hidden: int, width: int, act: str) -> None:
        super().__init__(ExpertMLP(hidden, width, act) for _ in range(n_experts))

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        tokens_per_expert, slot_token = _routes(top_k_index, len(self))
        enter_all = _under_zero3(self)
        n_tokens = top_k_index.shape[0]
        for e, expert in enumerate(self):
            if not tokens_per_expert[e]:
                if enter_all:
                    expert(hidden[:0])
                continue
            slot, token = slot_token[e] // n_tokens, slot_token[e] % n_tokens
            routed = expert(hidden[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, routed.to(out.dtype))
        return out


def _routes(top_k_index: torch.Tensor, n_experts: int) -> tuple[list[int], tuple[torch.Tensor, ...]]:
    """(tokens routed to each expert, read to the host; each expert's routes as ``slot * tokens + token``
    on the device), with ONE device-to-host read for the whole layer.

    The routes come in transformers' order (``torch.where(top_k_index.T == e)``: by top-k slot, then token):
    a stable sort of the slot-major flattened choices by expert keeps that order within each expert. Asking
    ``torch.where`` per expert instead synchronizes the host with the device once per routed expert, and under
    ZeRO-3 the host issues the next experts' prefetches only after it returns: every expert of a step that
    touches them all (a batch, a prefill) waited for its own copy, dequantization and compute in series."""
    choices = top_k_index.T.reshape(-1)  # slot-major: index slot * tokens + token
    counts = torch.bincount(choices, minlength=n_experts).tolist()  # the one host read
    order = torch.sort(choices, stable=True).indices
    return counts, order.split(counts)


def _under_zero3(module: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 manages ``module``'s parameters (they carry a ``ds_id``)."""
    return hasattr(next(module.parameters()), "ds_id")


def _experts_factory(width_attr: str):
    """A stand-in for transformers' fused experts class: built from the config as that class is."""

    def build(config) -> RoutedExperts:
        return RoutedExperts(config.num_local_experts, config.hidden_size, getattr(config, width_attr),
                             config.hidden_act)

    return build


@contextlib.contextmanager
def per_expert_modules(module: str, fused_cls: str, width_attr: str) -> Iterator[None]:
    """While open, ``transformers.models.<module>.modeling_<module>.<fused_cls>`` builds ``RoutedExperts``:
    the MoE block constructs its experts by that module-level name, so the fused 3-D tensors are never
    allocated (inside DeepSpeed's ``zero.Init`` they would be partitioned, unquantized, before any swap)."""
    mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    original = getattr(mod, fused_cls)
    setattr(mod, fused_cls, _experts_factory(width_attr))
    try:
        yield
    finally:
        setattr(mod, fused_cls, original)
