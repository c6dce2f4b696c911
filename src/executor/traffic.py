"""The bytes a decoder layer's element-wise kernels move per prompt token, counted on the executor's own layer.

``hpi.planner.cost.activations`` prices prefill's element-wise chains (norms, rotary, residual adds, the FFN's
activation, MoE routing) from a formula over the model's widths. This counts the same thing on the real layer:
one decoder layer of the stage ``hpi.executor.modeling.build_stage`` builds (transformers' own classes, the
per-rank widths of ``shard_config``), a prefill of ``tokens`` tokens in bf16 on the CPU under a
``TorchDispatchMode`` that sees every aten op the layer runs, as eager CUDA runs them one kernel each. Per op it
adds the bytes its tensor inputs are read and its outputs written, except:

- GEMMs (their time is FLOPs, ``cost.compute``) and attention (``F.scaled_dot_product_attention`` and what it
  decomposes into: its FLOPs are ``cost.compute``'s too; on the CPU a head width the fused kernel refuses runs
  as the math path's ops);
- views (an output aliasing an input, not written in place) and allocations (``new_empty``, ``empty``: nothing
  read or written);
- gathers and scatters by index read and write only the rows they move (``index``, ``index_add_``), a copy
  into a buffer reads only its source (``copy_``), and a ``zeros_like`` only writes.

Broadcast inputs (a stride of 0, such as rotary's cos and sin over heads) count their distinct elements.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GEMMS = frozenset({"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"})
ALLOCATIONS = frozenset({"new_empty", "empty", "empty_like", "new_empty_strided", "empty_strided"})
VIEWS = frozenset({"_unsafe_view"})  # a view whose schema does not say so
WRITE_ONLY = frozenset({"zeros_like", "new_zeros", "zeros", "fill_", "zero_"})


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``t`` (a broadcast dimension, stride 0, counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(tree) -> list[torch.Tensor]:
    return [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]


def op_bytes(name: str, args: tuple, kwargs: dict, out) -> int:
    """Bytes one aten op reads plus writes (module docstring for what counts)."""
    written = sum(distinct_bytes(t) for t in _tensors(out))
    if name in WRITE_ONLY:
        return written
    if name == "index":  # out = x[indices]: the gathered rows, read then written, and the indices
        return 2 * written + sum(distinct_bytes(t) for t in _tensors(args[1:]))
    if name == "copy_":  # dst.copy_(src): src read, dst written (not read)
        return written + distinct_bytes(args[1])
    if name == "index_add_":  # x.index_add_(dim, index, src): src read, x's rows read and written
        src = distinct_bytes(args[3])
        return 3 * src + distinct_bytes(args[2])
    return written + sum(distinct_bytes(t) for t in _tensors((args, kwargs)))


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.by_op: collections.Counter[str] = collections.Counter()
        self.counting = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.counting:
            return out
        name = func._schema.name.split("::", 1)[1]
        aliases = any(r.alias_info is not None for r in func._schema.returns) and not func._schema.is_mutable
        if name in GEMMS or name in ALLOCATIONS or name in VIEWS or aliases or "scaled_dot_product" in name:
            return out
        self.by_op[name] += op_bytes(name, args, kwargs, out)
        return out


@dataclass(frozen=True)
class LayerTraffic:
    """What one decoder layer's element-wise kernels moved for a prefill of ``tokens`` tokens."""

    tokens: int
    bytes_by_op: dict[str, int]

    @property
    def bytes_per_token(self) -> float:
        return sum(self.bytes_by_op.values()) / self.tokens


def count_layer_traffic(config, tp: int = 1, layer: int = 0, tokens: int = 32) -> LayerTraffic:
    """Count decoder layer ``layer`` of ``config`` (a HF config; its per-rank widths at ``tp``) in a prefill of
    ``tokens`` seeded random tokens, bf16 on the CPU. TP's all-reduce is not an element-wise kernel: the layer
    is built as one rank's widths without a process group."""
    import torch.nn.functional as F

    from hpi.executor.modeling import ShardSpec, build_stage, shard_config

    cfg = shard_config(config, tp)
    cfg.vocab_size = 256  # the embedding and head are not counted: a small table keeps the build small
    cfg.num_hidden_layers = layer + 1
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[: layer + 1]
    stage = build_stage(cfg, ShardSpec.whole(layer + 1), dtype=torch.bfloat16, device="cpu", seed=0)
    counter = _Counter()
    target = stage.layers[layer]
    target.register_forward_pre_hook(lambda *_: setattr(counter, "counting", True))
    target.register_forward_hook(lambda *_: setattr(counter, "counting", False))
    sdpa = F.scaled_dot_product_attention

    def attention_uncounted(*args, **kwargs):
        was, counter.counting = counter.counting, False
        try:
            return sdpa(*args, **kwargs)
        finally:
            counter.counting = was

    ids = torch.randint(3, cfg.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    F.scaled_dot_product_attention = attention_uncounted
    try:
        with torch.no_grad(), counter:
            stage(ids, None, torch.arange(tokens))
    finally:
        F.scaled_dot_product_attention = sdpa
    return LayerTraffic(tokens, dict(counter.by_op))
