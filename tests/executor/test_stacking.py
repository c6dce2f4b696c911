"""hpi.executor.stacking: q, k and v as one matrix, the same numbers and tokens, one product under compile."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from torch import nn  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from hpi.executor.generate import PipelineGenerator, Sampler, left_pad  # noqa: E402
from hpi.executor.modeling import ShardSpec, build_stage  # noqa: E402
from hpi.executor.stacking import StackedPart, calls_qkv_in_order, stack_projections  # noqa: E402
from tests.executor.test_padding import _one_rank, _tiny  # noqa: E402

GEN = 6


def _stage(family: str):
    config = _tiny(family)
    return config, build_stage(config, ShardSpec.whole(config.num_hidden_layers), dtype=torch.float32, seed=0).eval()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_stacked_layers_give_the_same_logits(family):
    """Every layer's q, k, v stacked (qwen2: with its biases); the stage's logits equal the unstacked ones."""
    config, stage = _stage(family)
    ids = torch.randint(3, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = stage(ids, DynamicCache(), torch.arange(7))
        params = sum(p.numel() for p in stage.parameters())
        assert stack_projections(stage) == config.num_hidden_layers
        assert sum(p.numel() for p in stage.parameters()) == params  # the stack replaces, nothing is held twice
        after = stage(ids, DynamicCache(), torch.arange(7))
    attn = stage.layers[0].self_attn
    assert isinstance(attn.q_proj, StackedPart) and isinstance(attn.v_proj, StackedPart)
    assert (attn.qkv_stack.bias is not None) == (family == "qwen2")
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert stack_projections(stage) == 0  # already stacked: nothing left to stack


def test_only_classes_calling_q_k_v_in_order_are_stacked():
    class Reordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x):
            v = self.v_proj(x)
            return self.q_proj(x), self.k_proj(x), v

    assert not calls_qkv_in_order(Reordered)
    module = Reordered()
    assert stack_projections(module) == 0 and type(module.q_proj) is nn.Linear
    from transformers.models.llama.modeling_llama import LlamaAttention

    assert calls_qkv_in_order(LlamaAttention)


def _products(codes: list[str]) -> int:
    """Matrix products in inductor's generated code (on a CPU each is an extern mm/addmm call)."""
    return sum(c.count("extern_kernels.mm(") + c.count("extern_kernels.addmm(") for c in codes)


def test_compiled_stacked_step_gives_the_eager_tokens_with_one_product_for_q_k_v():
    """compiled_step stacks, then compiles: every token of the unstacked eager static path, no graph break, and
    two matrix products fewer a layer than the same step compiled unstacked (inductor's generated code)."""
    import copy

    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    from hpi.executor.graphs import COMPILE_OPTIONS

    config, stage = _stage("llama")
    plain = copy.deepcopy(stage)
    g = torch.Generator().manual_seed(5)
    ids, padding = left_pad([torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in (9, 4)], 0)

    def generate(step_stage, compiled: bool) -> list[list[int]]:
        gen = PipelineGenerator(stage=step_stage, groups=_one_rank(), new_cache=DynamicCache, hidden_size=0,
                                dtype=torch.float32, device=torch.device("cpu"), micro_batches=1, sampler=Sampler(),
                                decode_graphs=True, decode_compile=compiled)
        return torch.cat(gen.run(ids, 2, 9, GEN, chat=False, padding=padding)).tolist()

    eager = generate(stage, False)
    counters.clear()
    compiled, stacked_codes = run_and_get_code(generate, stage, True)
    assert compiled == eager
    assert not counters["graph_break"]
    assert isinstance(stage.layers[0].self_attn.k_proj, StackedPart)
    _, plain_codes = run_and_get_code(
        lambda: torch.compile(plain, dynamic=False, options=COMPILE_OPTIONS)(
            ids[:, -1:], _static_cache_after_prompt(plain, ids), torch.tensor([9])))
    assert _products(plain_codes) - _products(stacked_codes) == 2 * config.num_hidden_layers


def _static_cache_after_prompt(stage, ids):
    from hpi.executor.graphs import StaticKVCache

    cache = StaticKVCache(ids.shape[1] + GEN)
    with torch.no_grad():
        stage(ids, cache, torch.arange(ids.shape[1]))
    return cache
