"""The element-wise bytes the planner prices for prefill (``hpi.planner.cost.activations``) against what the
executor's own decoder layers move, counted op by op on the CPU (``hpi.executor.traffic``)."""

from __future__ import annotations

import pytest
import torch

from hpi.executor.modeling import load_hf_config
from hpi.executor.traffic import count_layer_traffic, op_bytes
from hpi.planner.catalog import model_from_hf_config
from hpi.planner.cost.activations import bytes_per_token
from hpi.planner.cost.shape import DENSE, MOE

SMALL_MOE = {"num_local_experts": 4}  # the routing bytes depend on the experts a token uses, not how many exist
SMALL_DEEPSEEK = {"n_routed_experts": 16, "n_group": 1, "topk_group": 1}


@pytest.mark.parametrize("name, tp, overrides, kind, tokens, rel", [
    ("llama-3-8b", 1, {}, DENSE, 32, 0.02),
    ("llama-3-70b", 4, {}, DENSE, 32, 0.02),  # norms and residuals stay whole at tp 4, the rest splits
    ("mixtral-8x7b", 1, SMALL_MOE, MOE, 32, 0.02),
    ("deepseek-v3", 1, {"first_k_dense_replace": 1}, DENSE, 32, 0.02),  # MLA
    ("deepseek-v3", 8, {"first_k_dense_replace": 0, **SMALL_DEEPSEEK}, MOE, 32, 0.02),  # MLA, shared + 8 routed experts
    ("opt-30b", 1, {}, DENSE, 32, 0.02),  # LayerNorm, learned positions, ReLU
    # BLOOM's attention is its own (not sdpa): its softmax and casts (counted, 2.5 KB a token at 8 tokens) are
    # attention's, which the formula leaves to cost.compute
    ("bloom-176b", 1, {"hidden_size": 1024, "n_head": 16}, DENSE, 8, 0.03),
])
def test_the_planners_bytes_a_token_match_the_executors_layer(name, tp, overrides, kind, tokens, rel):
    config = load_hf_config(name)
    for key, value in overrides.items():
        setattr(config, key, value)
    counted = count_layer_traffic(config, tp=tp, tokens=tokens)
    priced = bytes_per_token(model_from_hf_config(config.to_dict(), name), tp)[kind]
    assert priced == pytest.approx(counted.bytes_per_token, rel=rel), sorted(counted.bytes_by_op.items())


def test_rmsnorm_moves_36_bytes_an_element_in_five_kernels_and_a_scale():
    """The chain the planner's RMSNORM_BYTES names, counted alone on transformers' LlamaRMSNorm."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from hpi.executor import traffic

    norm = LlamaRMSNorm(4096).to(torch.bfloat16)
    x = torch.randn(1, 8, 4096, dtype=torch.bfloat16)
    counter = traffic._Counter()
    counter.counting = True
    with torch.no_grad(), counter:
        norm(x)
    per_element = sum(counter.by_op.values()) / x.numel()
    assert per_element == pytest.approx(36.0, rel=0.01)
    assert set(counter.by_op) == {"_to_copy", "pow", "mean", "add", "rsqrt", "mul"}


def test_gathers_scatters_and_copies_count_only_what_they_move():
    x = torch.zeros(32, 64, dtype=torch.bfloat16)
    idx = torch.tensor([1, 5, 7])
    rows = x[idx]
    assert op_bytes("index", (x, [idx]), {}, rows) == 2 * rows.numel() * 2 + idx.numel() * 8
    src = torch.ones(3, 64, dtype=torch.bfloat16)
    assert op_bytes("index_add_", (x, 0, idx, src), {}, x) == 3 * src.numel() * 2 + idx.numel() * 8
    dst = torch.empty(4, 64, dtype=torch.bfloat16)
    broadcast = torch.ones(1, 64, dtype=torch.bfloat16).expand(4, 64)
    assert op_bytes("copy_", (dst, broadcast), {}, dst) == dst.numel() * 2 + 64 * 2
    assert op_bytes("zeros_like", (x,), {}, torch.zeros_like(x)) == x.numel() * 2
