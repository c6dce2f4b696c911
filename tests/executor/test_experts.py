"""hpi.executor.experts: per-expert routed experts against transformers' own fused class, and the one host
read per layer that keeps ZeRO-3's prefetch running ahead of a step that routes to many experts."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from hpi.executor.experts import RoutedExperts, _routes


def _choices(tokens: int, top_k: int, n_experts: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n_experts, generator=gen)[:top_k] for _ in range(tokens)])


@pytest.mark.parametrize(("tokens", "top_k", "n_experts"), [(1, 2, 8), (16, 2, 8), (64, 8, 32), (7, 1, 4)])
def test_routes_keep_transformers_order(tokens, top_k, n_experts):
    index = _choices(tokens, top_k, n_experts, seed=tokens)
    counts, routes = _routes(index, n_experts)
    for e in range(n_experts):
        slot, token = torch.where(index.T == e)  # transformers' per-expert order: by top-k slot, then token
        assert counts[e] == len(slot)
        assert torch.equal(routes[e] // tokens, slot) and torch.equal(routes[e] % tokens, token)


def _pair(n_experts=8, hidden=16, width=24) -> tuple[RoutedExperts, MixtralExperts]:
    config = MixtralConfig(hidden_size=hidden, intermediate_size=width, num_local_experts=n_experts,
                           hidden_act="silu")
    ours = RoutedExperts(n_experts, hidden, width, "silu")
    fused = MixtralExperts(config)
    torch.manual_seed(0)
    for e, expert in enumerate(ours):
        for layer in (expert.gate_proj, expert.up_proj, expert.down_proj):
            torch.nn.init.normal_(layer.weight)
        fused.gate_up_proj.data[e] = torch.cat([expert.gate_proj.weight, expert.up_proj.weight])
        fused.down_proj.data[e] = expert.down_proj.weight
    return ours, fused


@pytest.mark.parametrize("tokens", [1, 16])
def test_forward_equals_transformers_fused_experts(tokens):
    ours, fused = _pair()
    hidden = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(1))
    index = _choices(tokens, 2, 8, seed=2)
    weights = torch.rand(tokens, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(hidden, index, weights), fused(hidden, index, weights), rtol=0, atol=1e-5)


class _DataDependentOps(TorchDispatchMode):
    """Counts the ops whose output shape depends on tensor values: each one reads the device on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("nonzero", "_local_scalar_dense", "masked_select", "unique_dim"):
            self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_a_step_routing_to_every_expert_reads_the_device_once():
    ours, fused = _pair()
    hidden, index = torch.randn(16, 16), _choices(16, 2, 8, seed=4)
    weights = torch.rand(16, 2)
    with torch.no_grad(), _DataDependentOps() as ops:
        ours(hidden, index, weights)
    assert ops.names == []  # the counts' tolist() is a plain copy on the CPU: no per-expert where()
    with torch.no_grad(), _DataDependentOps() as reference:
        fused(hidden, index, weights)
    assert len(reference.names) >= 8  # transformers' loop: a where() per expert hit (the check can fail)
