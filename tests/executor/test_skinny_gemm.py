"""hpi.executor.skinny_gemm: the few-row product kernel against float64 products, its dispatch and its configs.

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton decorates a
kernel: each such test runs in its own process) in fp32; on a GPU (skipped without CUDA; its numbers come from
``benchmarks/skinny_gemm_bench.py`` device runs) in bf16 against cuBLAS.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

from hpi.executor import dependent_launch  # noqa: E402
from hpi.executor import skinny_gemm as sg  # noqa: E402
from tests.executor.test_decode_attention import _interpreted  # noqa: E402

# (rows, columns N, K, bias, config or None for the default): splits that divide K and ones that leave a tail,
# column counts that are and are not a multiple of the tile, every row count the kernel takes
CASES = [
    (2, 96, 256, False, sg.Config(32, 128, 1)),      # even tiles, one split: the direct store
    (16, 100, 300, True, sg.Config(32, 128, 2)),     # ragged N and K (masked W), two splits summed, a bias
    (5, 64, 1000, False, sg.Config(16, 128, 4)),     # four splits, the last one short
    (3, 40, 64, True, sg.Config(64, 128, 1)),        # K shorter than one tile, N shorter than one tile
    (9, 128, 512, True, None),                       # the default config (the interpreter's fallback)
]


def _inputs(case, dtype=torch.float32, device="cpu"):
    m, n, k, bias, _ = case
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    w = torch.randn(n, k, generator=g).to(device, dtype) / k ** 0.5
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    return x, w, b


def _reference(x, w, b):
    out = x.double() @ w.double().T
    return out + b.double() if b is not None else out


def test_splits_fill_the_sms_but_never_split_below_a_tile():
    # 8B shapes on 132 SMs with 32-column tiles: k_proj's 1,024 columns are 32 programs, so K splits 8 ways (256
    # programs... the least power of two reaching 132 is 8: 32 x 8 = 256 >= 132, 32 x 4 = 128 < 132)
    assert sg._splits_to_fill(1024, 4096, 32, 256, 132) == 8
    assert sg._splits_to_fill(14336, 4096, 32, 256, 132) == 1  # 448 column tiles fill alone
    assert sg._splits_to_fill(4096, 14336, 32, 256, 132) == 2  # 128 tiles: one short of 132
    assert sg._splits_to_fill(1024, 256, 32, 256, 132) == 1  # one tile of K: no split
    assert sg.Config(32, 256, 8).k_per_split(4096) == 512 and sg.Config(16, 128, 4).k_per_split(1000) == 256
    assert sg.Config(32, 256, 8).programs(1024) == 256


def test_the_l2_warm_up_before_the_dependent_wait_doubles_within_its_bytes_and_split():
    # bf16 (2 bytes): 16 columns x 1,024 = 32 KiB, the most; 128 columns keep one 256 tile (64 KiB: a tile is least)
    assert sg.Config(16, 256, 1).pre_k(4096, 2) == 1024 and sg.Config(32, 256, 1).pre_k(4096, 2) == 512
    assert sg.Config(64, 256, 1).pre_k(4096, 2) == 256 and sg.Config(128, 256, 1).pre_k(4096, 2) == 256
    # never past the split's share: 4 splits of 1,000 give 256 each; fp32 halves what fits
    assert sg.Config(16, 128, 4).pre_k(1000, 2) == 256 and sg.Config(16, 128, 8).pre_k(1000, 2) == 128
    assert sg.Config(16, 128, 1).pre_k(4096, 4) == 512
    assert sg.PREFETCH_BYTES % sg.LINE_BYTES == 0


def test_candidates_time_each_tile_with_the_filling_split_and_twice_it():
    configs = sg.candidates(1024, 4096, 132)
    # 3 column tiles x 2 K tiles x 2 splits, less one: 64 x 256 fills at 16 splits, and 32 would cut K below a tile
    assert len(configs) == len(set(configs)) == 11 and sg.Config(64, 256, 32) not in configs
    assert sg.Config(32, 256, 8) in configs and sg.Config(32, 256, 16) in configs
    assert all(4096 // c.split_k >= c.block_k for c in configs)
    assert all(c.programs(1024) >= 132 for c in configs)
    assert sg.default_config(1024, 4096, 132) == sg.Config(32, 256, 8)
    assert {c.split_k for c in sg.candidates(14336, 4096, 132)} == {1, 2}


def test_without_a_gpu_linear_is_f_linear():
    x, w, b = _inputs(CASES[1])
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert not sg.covers(x, w)
    assert torch.equal(sg.linear(x, w, b), torch.nn.functional.linear(x, w, b))
    w.requires_grad_(True)
    assert not sg.covers(x, w)  # a product autograd would need to differentiate stays with F.linear


def test_kernel_equals_float64_products_in_fp32():
    """Each case (one split and several, ragged tiles, a bias, 2-16 rows, a non-contiguous x): every output within
    1e-5 of the float64 product, dependent launches asked for or not (the interpreter has none: the plain kernel
    either way); the dispatch covers 2-16 rows and leaves 1 and 17 to F.linear."""
    result = _interpreted("""
import json, torch
from hpi.executor import dependent_launch, skinny_gemm as sg
from tests.executor.test_skinny_gemm import CASES, _inputs, _reference
errors = []
for pdl in (False, True):
    dependent_launch.use(pdl)
    for case in CASES:
        x, w, b = _inputs(case)
        config = case[4] or sg.default_config(w.shape[0], w.shape[1], sms=8)
        errors.append(float((sg.triton_linear(x, w, b, config).double() - _reference(x, w, b)).abs().max()))
x, w, b = _inputs(CASES[2])
strided = torch.cat([x, x], dim=1)[:, ::2]  # a view with stride 2 along K
errors.append(float((sg.linear(strided, w, b).double() - _reference(strided, w, b)).abs().max()))
covers = {m: sg.covers(torch.zeros(m, 64), torch.zeros(32, 64)) for m in (1, 2, 16, 17)}
print(json.dumps({"errors": errors, "covers": covers}))
""")
    assert len(result["errors"]) == 2 * len(CASES) + 1
    assert max(result["errors"]) < 1e-5, result["errors"]
    assert result["covers"] == {"1": False, "2": True, "16": True, "17": False}


def test_installed_stage_decodes_the_same_tokens_and_compiles_as_one_op():
    """The tiny Llama with every plain Linear switched to the kernel's dispatch: a 4-row decode in two micro-batches
    over the static cache (the graphed path, run without capture on a CPU) generates the tokens of the same stages
    without it, the products went through the kernel, and the prompt's forwards (2 x 9 rows each) did not;
    ``torch.compile`` (fullgraph) traces the op as one call and returns its numbers."""
    result = _interpreted("""
import json, torch
from hpi.executor import skinny_gemm as sg
from hpi.executor.generate import left_pad
from hpi.executor.modeling import ShardSpec, build_stage
from tests.executor.test_graphs import _generate
from tests.executor.test_padding import _tiny
rows, widths = [], []
original = sg.triton_linear
def counted(x2d, weight, *a):
    rows.append(x2d.shape[0])
    widths.append(weight.shape[0])
    return original(x2d, weight, *a)
sg.triton_linear = counted
config = _tiny("llama")
g = torch.Generator().manual_seed(5)
ids, padding = left_pad([torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in (9, 3, 5, 6)], 0)
n = config.num_hidden_layers
stages = [build_stage(config, ShardSpec.for_stage([1, n - 1], i), dtype=torch.float32, seed=0) for i in range(2)]
plain = _generate(stages, ids, padding, graphs=True)
installed = sum(sg.install(s) for s in stages)
skinny = _generate(stages, ids, padding, graphs=True, skinny=True)  # the run asks for it (RunSpec.skinny_gemm)
lin = torch.nn.Linear(64, 48)
sg.install(lin)
x = torch.randn(4, 64)
compiled = torch.compile(lambda x: lin(x) * 2, fullgraph=True, backend="aot_eager")
with torch.no_grad():
    got = compiled(x)
error = float((got.double() / 2 - (x.double() @ lin.weight.double().T + lin.bias.double())).abs().max())
attn, mlp = config.num_attention_heads * config.head_dim + 2 * config.num_key_value_heads * config.head_dim, \
    2 * config.intermediate_size
others = [config.hidden_size, config.vocab_size]
print(json.dumps({"same": skinny == plain, "installed": installed, "rows": sorted(set(rows)), "compiled": error,
                  "widths": sorted(set(widths)), "stacked": [attn, mlp], "others": others}))
""")
    assert result["same"]
    assert result["installed"] == 7 * _tiny_layers() + 1  # seven products a layer and the LM head
    assert result["rows"] == [2, 4]  # the decode steps (2 rows) and the compiled call (4); never the prompt's 18
    assert result["compiled"] < 1e-5
    # q/k/v and gate/up ran as one product each (their stacked widths), o/down and the head as their own
    assert result["widths"] == sorted({*result["stacked"], *result["others"], 48})  # 48: the compiled Linear


def _tiny_layers() -> int:
    from tests.executor.test_padding import _tiny

    return _tiny("llama").num_hidden_layers


def test_install_leaves_subclasses_and_state_alone():
    class Other(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(torch.nn.Linear(8, 4), Other(4, 4), torch.nn.ReLU())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert sg.install(model) == 1
    assert type(model[0]) is sg.SkinnyLinear and type(model[1]) is Other
    assert sg.install(model) == 0  # already installed
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_float64_in_bf16_on_a_gpu(case):
    x, w, b = _inputs(case, torch.bfloat16, "cuda")
    config = case[4] or sg.config_for(x, w, b)
    got = sg.triton_linear(x, w, b, config)
    assert (got.double() - _reference(x, w, b)).abs().max().item() < 3e-2  # bf16 output: ~3 significant digits


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_dependent_launch_in_a_graph_gives_the_same_bits_after_the_kernel_that_writes_x():
    """Captured behind a kernel that writes x, the dependent launch (L2 warm-up, then the wait) waits for it: the same
    bits as a plain launch, for a split and an unsplit config, ragged and even tiles."""
    assert dependent_launch.capable(torch.device("cuda")) == (torch.cuda.get_device_capability()[0] >= 9)
    for shape, config in (((16, 4096, 4096, True, None), sg.Config(16, 256, 1)),
                          ((7, 1000, 1000, False, None), sg.Config(32, 128, 4))):
        x, w, b = _inputs(shape, torch.bfloat16, "cuda")
        outs = {}
        for pdl in (False, True):
            dependent_launch.use(pdl)
            try:
                source = torch.zeros_like(x)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    source.copy_(x).mul_(2.0)  # the kernel before writes the product's input
                    outs[pdl] = sg.triton_linear(source, w, b, config)
                graph.replay()
                torch.cuda.synchronize()
            finally:
                dependent_launch.use(False)
        assert torch.equal(outs[True], outs[False])
        assert (outs[True].double() - _reference(2 * x, w, b)).abs().max().item() < 6e-2


def test_siblings_stack_into_one_product_that_compiles_without_a_break():
    """q/k/v of one input become views of one stacked weight; under torch.compile(fullgraph) one kernel launch gives
    all three (each within 1e-5 of float64); called out of order a sibling before the first is its own product.
    Either way the stack holds no tensor after the forward."""
    result = _interpreted("""
import json, torch
from hpi.executor import skinny_gemm as sg
class Block(torch.nn.Module):
    def __init__(self, order):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(64, n, bias=True) for n in (32, 16, 16))
        self.order = order
    def forward(self, x):
        out = {name: getattr(self, name)(x) for name in self.order}
        return torch.cat([out["q_proj"], out["k_proj"] * 2, out["v_proj"] * 3], -1)
launches = []
original = sg.triton_linear
def counted(x2d, weight, *a):
    launches.append(weight.shape[0])
    return original(x2d, weight, *a)
sg.triton_linear = counted
x = torch.randn(3, 5, 64)
result = {}
for order in (("q_proj", "k_proj", "v_proj"), ("k_proj", "q_proj", "v_proj")):
    block = Block(order)
    scale = torch.tensor([1.0] * 32 + [2.0] * 16 + [3.0] * 16, dtype=torch.float64)
    want = torch.cat([x.double() @ m.weight.double().T + m.bias.double()
                      for m in (block.q_proj, block.k_proj, block.v_proj)], -1) * scale
    installed = sg.install(block)
    views = block.q_proj.weight.data_ptr() + 32 * 64 * 4 == block.k_proj.weight.data_ptr()
    launches.clear()
    with torch.no_grad():
        got = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    result[order[0]] = {"installed": installed, "views": views, "launches": list(launches),
                        "error": float((got.double() - want).abs().max()), "held": block.q_proj._stack.input is None}
print(json.dumps(result))
""")
    stacked, unordered = result["q_proj"], result["k_proj"]
    assert stacked == {"installed": 3, "views": True, "launches": [64], "error": stacked["error"], "held": True}
    assert stacked["error"] < 1e-5
    # k before q: k is its own product, then q's stack, from which v takes its part (same input)
    assert unordered["launches"] == [16, 64] and unordered["error"] < 1e-5


def test_stacked_siblings_on_the_cpu_are_one_f_linear_and_switch_off_with_the_kernel():
    """Without the kernel the stack is one F.linear of the stacked weight (columns equal to the siblings' own
    products); ``use_skinny(False)`` gives each sibling its own F.linear, bit for bit the un-installed module."""
    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = torch.nn.Linear(32, 48, bias=False), torch.nn.Linear(32, 48, bias=False)

        def forward(self, x):
            return torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)

    torch.manual_seed(3)
    mlp, x = MLP(), torch.randn(2, 7, 32)
    before = mlp(x)
    assert sg.install(mlp) == 2 and mlp.up_proj._stack.weight.shape == (96, 32)
    assert mlp.up_proj.weight.data_ptr() == mlp.gate_proj.weight.data_ptr() + 48 * 32 * 4  # a view of the stack
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), before, atol=1e-6, rtol=1e-6)
        assert mlp.gate_proj._stack.input is None  # the last sibling let go of the input
        try:
            sg.use_skinny(False)
            assert torch.equal(mlp(x), before)
        finally:
            sg.use_skinny(True)
