"""CUDA-graphed decode (``hpi.executor.graphs``): the static KV cache, its device-built mask, and the tokens.

On the CPU there is nothing to capture, so these tests run the graphed path's static buffers and cache
eagerly and check every token against the dynamic-cache path and transformers' ``generate``: Llama,
Mistral past its sliding window, Qwen2 and OPT, padded and unpadded, two stages and two micro-batches in
one process, and ``hpi run``'s launched path under TP 2 and PP 2. The capture itself runs on a GPU only
(the last test, skipped without CUDA; its result is recorded from device runs).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

from hpi.executor.generate import PipelineGenerator, Sampler, StepTimes, left_pad  # noqa: E402
from hpi.executor.graphs import DecodeGraph, StaticKVCache, compiled_step  # noqa: E402
from hpi.executor.masks import static_causal_mask  # noqa: E402
from hpi.executor.modeling import ShardSpec, build_stage, load_hf_config  # noqa: E402
from hpi.executor.spec import RunSpec  # noqa: E402
from hpi.planner.specs.plan import Plan  # noqa: E402
from hpi.planner.specs.workload import Workload  # noqa: E402
from tests.executor.test_padding import _one_rank, _tiny  # noqa: E402

GEN = 6


# ---- the cache and the mask, pure --------------------------------------------------------------------
def test_static_cache_writes_in_place_at_the_bound_slots():
    cache = StaticKVCache(5)
    k = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).reshape(2, 1, 3, 2)
    with pytest.raises(RuntimeError, match="before bind"):
        cache.update(k, k, 0)
    cache.bind(torch.arange(0, 3))
    keys, values = cache.update(k, k + 100, 0)
    assert keys.shape == (2, 1, 5, 2) and torch.equal(keys[:, :, :3], k) and not keys[:, :, 3:].any()
    first = keys.data_ptr()
    cache.bind(torch.tensor([3]))
    keys, values = cache.update(k[:, :, :1] - 1, k[:, :, :1], 0)
    assert keys.data_ptr() == first  # the same tensor, written in place: a graph may keep its address
    assert torch.equal(keys[:, :, 3], k[:, :, 0] - 1) and torch.equal(values[:, :, :3], k + 100)
    assert cache.nbytes == 2 * (2 * 1 * 5 * 2) * 4
    cache.bind(torch.tensor([4]), visible=2)  # the prompt's forward reads only the slots it wrote
    keys, _ = cache.update(k[:, :, :1], k[:, :, :1], 0)
    assert keys.shape == (2, 1, 2, 2) and torch.equal(keys, k[:, :, :2])
    with pytest.raises(RuntimeError, match="layers must run in order"):
        cache.update(k, k, 2)
    with pytest.raises(ValueError, match="max_len"):
        StaticKVCache(0)


def test_static_mask_is_causal_windowed_and_hides_pads_but_never_empties_a_row():
    allowed = static_causal_mask(torch.arange(2, 5), 6, None, None)[0, 0]
    assert allowed.int().tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]
    windowed = static_causal_mask(torch.tensor([4]), 6, 2, None)[0, 0]
    assert windowed.int().tolist() == [[0, 0, 0, 1, 1, 0]]
    slots = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    padded = static_causal_mask(torch.arange(0, 3), 6, None, slots)
    assert padded.shape == (2, 1, 3, 6)
    # row 0: slots 0-1 are pads; a pad's query sees only itself, the real token at slot 2 not the pads
    assert padded[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]]
    assert padded[1, 0].int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]


def test_static_stage_takes_the_prompt_first_and_once():
    config = load_hf_config("tiny-llama")
    stage = build_stage(config, ShardSpec.whole(config.num_hidden_layers), dtype=torch.float32, seed=0).eval()
    cache = StaticKVCache(12)
    with torch.no_grad():
        stage(torch.tensor([[5, 6, 7]]), cache, torch.arange(0, 3))
        stage(torch.tensor([[8]]), cache, torch.tensor([3]))
        with pytest.raises(ValueError, match="prompt in one forward from slot 0"):
            stage(torch.tensor([[9, 10]]), cache, torch.arange(4, 6))


@pytest.mark.parametrize("q_len", [1, 3])
def test_grouped_decode_attention_equals_repeating_the_kv_heads(q_len):
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import repeat_kv

    from hpi.executor.attention import grouped_decode_sdpa

    g = torch.Generator().manual_seed(0)
    b, kv, groups, length, d = 3, 2, 4, 10, 8
    q = torch.randn(b, kv * groups, q_len, d, generator=g)
    k, v = torch.randn(b, kv, length, d, generator=g), torch.randn(b, kv, length, d, generator=g)
    mask = static_causal_mask(torch.arange(6 - q_len, 6), length, None,
                              (torch.rand(b, length, generator=g) > 0.3).long())
    got, _ = grouped_decode_sdpa(SimpleNamespace(num_key_value_groups=groups, is_causal=True), q, k, v, mask,
                                 scaling=0.3)
    want = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups),
                                                            attn_mask=mask, scale=0.3).transpose(1, 2)
    assert got.shape == (b, q_len, kv * groups, d)
    torch.testing.assert_close(got, want)


def test_decode_graph_replays_one_micro_batch_only():
    calls = []

    def stage(x, cache, cache_position):
        calls.append((x.clone(), cache_position.clone()))
        return x * 2

    graph, cache = DecodeGraph(stage, capture=False), object()
    assert graph(torch.tensor([[1]]), cache, torch.tensor([4])).tolist() == [[2]]
    assert graph(torch.tensor([[3]]), cache, torch.tensor([5])).tolist() == [[6]]
    assert [c[1].item() for c in calls] == [4, 5]  # each call's inputs went through the static buffers
    assert graph.capture_s is not None and graph.capture_s >= 0  # the first call is timed (the compile, if any)
    with pytest.raises(RuntimeError, match="same cache"):
        graph(torch.tensor([[3]]), object(), torch.tensor([6]))


# ---- generator + stages in one process ----------------------------------------------------------------
class _Composed(torch.nn.Module):
    """Stages run one after another in one process, each with its own cache: one module, as a worker's stage is."""

    def __init__(self, stages) -> None:
        super().__init__()
        self.stages = torch.nn.ModuleList(stages)

    def forward(self, x, caches, cache_position, **masks):
        for stage, cache in zip(self.stages, caches):
            x = stage(x, cache, cache_position, **masks)
        return x


def _generate(stages, ids, padding, graphs: bool, micro_batches: int = 2, skinny: bool = False) -> list[list[int]]:
    gen = PipelineGenerator(stage=_Composed(stages), groups=_one_rank(),
                            new_cache=lambda: [DynamicCache() for _ in stages], hidden_size=0, dtype=torch.float32,
                            device=torch.device("cpu"), micro_batches=micro_batches, sampler=Sampler(),
                            decode_graphs=graphs, skinny_gemm=skinny,
                            new_static_cache=lambda n: [StaticKVCache(n) for _ in stages])
    return torch.cat(gen.run(ids, ids.shape[0], ids.shape[1], GEN, chat=False, padding=padding)).tolist()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "opt"])
@pytest.mark.parametrize("padded", [False, True], ids=["equal-prompts", "left-padded"])
def test_static_cache_decode_generates_the_dynamic_cache_tokens(family, padded):
    config = _tiny(family)
    g = torch.Generator().manual_seed(11)
    lengths = [7, 7, 3, 1] if padded else [7, 7, 7, 7]
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    ids, padding = left_pad(prompts, pad_id=0)
    n = config.num_hidden_layers
    stages = [build_stage(config, ShardSpec.for_stage([1, n - 1], i), dtype=torch.float32, seed=0) for i in range(2)]
    eager = _generate(stages, ids, padding if padded else None, graphs=False)
    static = _generate(stages, ids, padding if padded else None, graphs=True)
    assert static == eager
    if family == "mistral":  # the prompt and generated tokens outrun the window of 6: it was applied
        assert len(lengths) and max(lengths) + GEN > config.sliding_window


# ---- compiled (torch.compile's inductor: C++ on a CPU, Triton on a GPU) -------------------------------------
def test_compiled_decode_generates_the_eager_tokens_and_compiles_once_per_shape():
    """The graphed step compiled by torch.compile (fp32 on the CPU) gives every token of the eager static path,
    padded and unpadded; a second generation of the same shapes reuses the compiled code (no new frame)."""
    from torch._dynamo.utils import counters

    config = _tiny("llama")
    stage = build_stage(config, ShardSpec.whole(config.num_hidden_layers), dtype=torch.float32, seed=0).eval()
    g = torch.Generator().manual_seed(5)
    ids, padding = left_pad([torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in (9, 4)], 0)

    def generate(compiled: bool, padded: bool) -> tuple[list[list[int]], list[float]]:
        gen = PipelineGenerator(stage=stage, groups=_one_rank(), new_cache=DynamicCache, hidden_size=0,
                                dtype=torch.float32, device=torch.device("cpu"), micro_batches=1, sampler=Sampler(),
                                decode_graphs=True, decode_compile=compiled)
        out = gen.run(ids, 2, 9, GEN, chat=False, padding=padding if padded else None)
        return torch.cat(out).tolist(), gen.times.capture_s

    assert compiled_step(stage) is compiled_step(stage)  # one compiled wrapper per stage
    for padded in (False, True):
        eager, _ = generate(False, padded)
        compiled, captures = generate(True, padded)
        assert compiled == eager and len(captures) == 1
        frames = counters["stats"]["unique_graphs"]
        again, _ = generate(True, padded)
        assert again == eager and counters["stats"]["unique_graphs"] == frames  # no recompile


def test_a_short_warm_up_at_the_measured_runs_cache_slots_compiles_what_the_measured_run_replays():
    """hpi run's warm-up (2 tokens, ``hpi.executor.worker.measure``): on a cache of its own length the compiled step's
    shapes differ from the measured run's, which compiles again inside its timers; on the measured run's slots the
    measured run compiles nothing, and decodes the eager tokens. Too few slots for the tokens are refused."""
    from torch._dynamo.utils import counters

    config = _tiny("llama")
    stage = build_stage(config, ShardSpec.whole(config.num_hidden_layers), dtype=torch.float32, seed=0).eval()
    prompt = 7  # shapes no other test here compiles (dynamo's cache outlives a stage)
    ids = torch.randint(3, config.vocab_size, (2, prompt), generator=torch.Generator().manual_seed(7))

    def generate(new_tokens: int, compiled: bool = True, cache_slots: int | None = None) -> list[list[int]]:
        gen = PipelineGenerator(stage=stage, groups=_one_rank(), new_cache=DynamicCache, hidden_size=0,
                                dtype=torch.float32, device=torch.device("cpu"), micro_batches=1, sampler=Sampler(),
                                decode_graphs=True, decode_compile=compiled)
        return torch.cat(gen.run(ids, 2, prompt, new_tokens, chat=False, cache_slots=cache_slots)).tolist()

    def compiles(fn) -> int:
        before = counters["stats"]["unique_graphs"]
        fn()
        return counters["stats"]["unique_graphs"] - before

    for gen_len, warm_slots, measured_compiles in ((5, None, 1), (4, prompt + 4, 0)):
        assert compiles(lambda: generate(2, cache_slots=warm_slots)) == 1  # the warm-up compiles a shape
        tokens: list[list[int]] = []
        assert compiles(lambda: tokens.extend(generate(gen_len))) == measured_compiles
        assert tokens == generate(gen_len, compiled=False)
    with pytest.raises(ValueError, match=r"cache_slots 8 < prompt_len \+ max_new_tokens = 7 \+ 2"):
        generate(2, cache_slots=8)


def test_a_rewound_cache_takes_a_new_prompt_in_its_own_tensors_and_masks_what_the_last_one_left():
    config = load_hf_config("tiny-llama")
    stage = build_stage(config, ShardSpec.whole(config.num_hidden_layers), dtype=torch.float32, seed=0).eval()
    cache, fresh = StaticKVCache(8), StaticKVCache(8)
    new_prompt = torch.tensor([[3, 4]])
    with torch.no_grad():
        stage(torch.tensor([[5, 6, 7, 8, 9]]), cache, torch.arange(0, 5))
        with pytest.raises(ValueError, match="prompt in one forward from slot 0"):
            stage(new_prompt, cache, torch.arange(0, 2))
        address, left = cache.keys[0].data_ptr(), cache.keys[0][:, :, 2:5].clone()
        cache.rewind()
        assert cache.is_empty and cache.position is None
        logits = stage(new_prompt, cache, torch.arange(0, 2))  # it reads its own slots only
        assert torch.equal(logits, stage(new_prompt, fresh, torch.arange(0, 2)))
    assert cache.keys[0].data_ptr() == address  # the same tensors: a kept graph's addresses hold
    assert torch.equal(cache.keys[0][:, :, :2], fresh.keys[0][:, :, :2])
    # the next step, at slot 2, sees slots 0-2; slots 3-4 still hold the last generation's, behind the mask
    assert torch.equal(cache.keys[0][:, :, 3:5], left[:, :, 1:]) and left[:, :, 1:].abs().sum() > 0
    assert static_causal_mask(torch.tensor([2]), 8, None, None)[0, 0, 0].int().tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("compiled", [False, True], ids=["graphed", "compiled"])
def test_the_next_generation_of_the_same_shapes_replays_the_kept_steps_and_decodes_its_own_tokens(compiled):
    """``KeptSteps``: a generator's second generation of the same shapes (other prompts, fewer tokens, the same cache
    slots: hpi run's warm-up then its measured run) reuses each micro-batch's cache and graph, captures nothing, and
    gives a fresh generator's tokens although the first generation's keys and values are still in the slots past its
    own; a generation of other shapes lets the kept ones go, so one generation's caches are kept at a time."""
    config = _tiny("llama")
    stage = build_stage(config, ShardSpec.whole(config.num_hidden_layers), dtype=torch.float32, seed=0).eval()
    g = torch.Generator().manual_seed(13)
    first, second = (left_pad([torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in lengths], 0)
                     for lengths in ((8, 8, 5, 8), (8, 3, 8, 8)))

    def generator() -> PipelineGenerator:
        return PipelineGenerator(stage=stage, groups=_one_rank(), new_cache=DynamicCache, hidden_size=0,
                                 dtype=torch.float32, device=torch.device("cpu"), micro_batches=2, sampler=Sampler(),
                                 decode_graphs=True, decode_compile=compiled)

    def generate(gen, prompts, new_tokens: int, slots: int = 8 + GEN) -> list[list[int]]:
        ids, padding = prompts
        gen.times = StepTimes()
        return torch.cat(gen.run(ids, 4, 8, new_tokens, chat=False, padding=padding, cache_slots=slots)).tolist()

    gen = generator()
    generate(gen, first, GEN)
    assert len(gen.times.capture_s) == 2 and len(gen.kept.steps) == 2  # a capture and a kept step per micro-batch
    steps = gen.kept.steps
    # micro-batch 0 is unpadded in the first generation and padded in the second, micro-batch 1 the other way round:
    # new keys, new steps, and the first generation's let go
    tokens = generate(gen, second, GEN - 2)
    assert tokens == generate(generator(), second, GEN - 2)
    assert len(gen.times.capture_s) == 2 and not set(steps) & set(gen.kept.steps)
    steps = gen.kept.steps
    again = generate(gen, second, GEN)  # the same keys again: both kept steps replayed, nothing captured
    assert gen.times.capture_s == [] and gen.kept.steps == steps
    assert again == generate(generator(), second, GEN) and [row[: GEN - 2] for row in again] == tokens
    generate(gen, second, GEN, slots=8 + GEN + 1)  # other cache slots: new steps, the old ones let go
    assert len(gen.times.capture_s) == 2 and len(gen.kept.steps) == 2 and not set(steps) & set(gen.kept.steps)


def test_graphed_runs_switch_the_stacked_products_per_run_and_decode_the_same_tokens():
    """skinny_gemm (RunSpec, the Generator): a run that asks stacks q/k/v and gate/up (on a CPU, one F.linear each)
    and gives the tokens of one that does not; the switch is set per run, so a later run without it runs each product
    apart again on the same, already installed stage, and an eager run leaves the switch alone."""
    from hpi.executor import skinny_gemm

    config = _tiny("llama")
    stage = build_stage(config, ShardSpec.whole(config.num_hidden_layers), dtype=torch.float32, seed=0).eval()
    ids, padding = left_pad([[5, 6, 7, 8, 9], [3, 4, 5]], 0)
    attention = stage.layers[0].self_attn

    def generate(graphs: bool, skinny: bool) -> list[list[int]]:
        gen = PipelineGenerator(stage=stage, groups=_one_rank(), new_cache=DynamicCache, hidden_size=0,
                                dtype=torch.float32, device=torch.device("cpu"), micro_batches=1, sampler=Sampler(),
                                decode_graphs=graphs, skinny_gemm=skinny)
        return torch.cat(gen.run(ids, 2, 5, GEN, chat=False, padding=padding)).tolist()

    try:
        plain = generate(True, False)
        assert type(attention.q_proj) is torch.nn.Linear and not skinny_gemm._ENABLED[0]
        stacked = generate(True, True)
        assert type(attention.q_proj) is skinny_gemm.StackedLinear and skinny_gemm._ENABLED[0]
        storage = attention.q_proj.weight.untyped_storage().data_ptr()
        assert attention.v_proj.weight.untyped_storage().data_ptr() == storage  # views of one stacked tensor
        assert stacked == plain
        assert generate(True, False) == plain and not skinny_gemm._ENABLED[0]  # switched back, still installed
        assert generate(False, False) == plain and not skinny_gemm._ENABLED[0]
    finally:
        skinny_gemm.use_skinny(True)


def test_spec_stacks_the_products_of_a_graphed_step_only():
    with pytest.raises(ValueError, match="skinny_gemm stacks the graphed decode step's products.*--cuda-graphs"):
        RunSpec(plan=Plan(), model="tiny-llama", device="cpu", skinny_gemm=True)
    ok = RunSpec(plan=Plan(), model="tiny-llama", device="cpu", decode_graphs=True,
                 variants=({"skinny_gemm": True}, {"skinny_gemm": True, "decode_compile": True}))
    assert [(m.skinny_gemm, m.decode_compile, m.workload.skinny_gemm) for m in ok.measurements()] == [
        (False, False, False), (True, False, True), (True, True, True)]


# ---- spec ------------------------------------------------------------------------------------------------
def test_spec_refuses_graphs_for_plans_with_python_in_the_step():
    base = dict(model="tiny-llama", device="cpu", dtype="fp32", decode_graphs=True)
    assert RunSpec(plan=Plan(tp=2), **base).workload.decode_graphs is True
    for plan, why in [(Plan(offload="cpu"), "ZeRO-3"), (Plan(weight_bits=8), "ZeRO-3"),
                      (Plan(dp=2, batch_size=2), "ZeRO-3"), (Plan(kv_offload=True), "KV cache")]:
        with pytest.raises(ValueError, match=f"CUDA graphs cannot run plan .*{why}.*drop --cuda-graphs"):
            RunSpec(plan=plan, **base)
    with pytest.raises(ValueError, match="KV cache"):
        RunSpec(plan=Plan(), variants=({"kv_offload": True},), **base)


# ---- hpi run's path ------------------------------------------------------------------------------------
LAYOUTS = {
    "one-rank": Plan(batch_size=2),
    "tp2": Plan(tp=2, batch_size=2),
    "pp2-2-micro-batches": Plan(pp=2, micro_batches=2, batch_size=2),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_launched_graphed_variant_matches_the_eager_run(name, tmp_path):
    """One build, measured eagerly and then as a graphed variant (how gpu_matrix compares them side by side)."""
    pytest.importorskip("deepspeed")
    import json

    from hpi.executor.launch import launch

    spec = RunSpec(plan=LAYOUTS[name], model="tiny-llama", workload=Workload(prompt_len_tokens=9, gen_len_tokens=GEN),
                   device="cpu", dtype="fp32", out_dir=str(tmp_path), variants=({"decode_graphs": True},))
    eager = launch(spec, timeout_s=300).to_json()
    graphed = json.loads((tmp_path / eager["variant_records"][0]).read_text())
    assert graphed["tokens"] == eager["tokens"] and len(graphed["tokens"][0]) == GEN
    assert graphed["spec"]["decode_graphs"] is True and graphed["spec"]["workload"]["decode_graphs"] is True
    assert eager["spec"]["workload"]["decode_graphs"] is False


def _graphed_and_variant(plan: Plan, variant: dict, tmp_path) -> tuple[dict, dict]:
    """hpi run's launched path on the CPU: one build graphed, then ``variant``; both records' documents."""
    pytest.importorskip("deepspeed")
    import json

    from hpi.executor.launch import launch

    spec = RunSpec(plan=plan, model="tiny-llama", workload=Workload(prompt_len_tokens=9, gen_len_tokens=GEN),
                   device="cpu", dtype="fp32", out_dir=str(tmp_path), decode_graphs=True, variants=(variant,))
    graphed = launch(spec, timeout_s=300).to_json()
    return graphed, json.loads((tmp_path / graphed["variant_records"][0]).read_text())


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_launched_compiled_variant_matches_the_graphed_run_and_records_its_compile(name, tmp_path):
    """hpi run's path, one rank, TP 2 (its all-reduces inside the compiled step) and PP 2: the same build graphed,
    then graphed and compiled; the compiled variant's record says so (spec and workload) and carries the compile's
    seconds, the plain one none."""
    graphed, compiled = _graphed_and_variant(LAYOUTS[name], {"decode_compile": True}, tmp_path)
    assert compiled["tokens"] == graphed["tokens"] and len(compiled["tokens"][0]) == GEN
    assert compiled["spec"]["decode_compile"] is True and compiled["spec"]["workload"]["decode_compile"] is True
    assert compiled["compile_s"] == max(r["compile_s"] for r in compiled["ranks"]) > 0
    assert graphed["compile_s"] is None and graphed["spec"]["decode_compile"] is False


def test_launched_warm_up_of_two_tokens_pays_the_compile_outside_the_measured_steps(tmp_path):
    """hpi run's default on a GPU, on the CPU's launched path: one warm-up of 2 tokens (``hpi.deployment.warmup_mode``)
    compiles the step at the measured run's cache slots, so the measured run compiles nothing: its first decode step
    is like the others, each a small share of the compile (on a GPU the 8B's was 65 s against 5.8 ms steps)."""
    pytest.importorskip("deepspeed")
    from hpi.executor.launch import launch

    spec = RunSpec(plan=LAYOUTS["one-rank"], model="tiny-llama",
                   workload=Workload(prompt_len_tokens=5, gen_len_tokens=GEN), device="cpu", dtype="fp32",
                   out_dir=str(tmp_path), decode_graphs=True, decode_compile=True, warmup_steps=1, warmup_gen_len=2)
    record = launch(spec, timeout_s=300).to_json()
    assert record["spec"]["warmup_steps"] == 1 and len(record["tokens"][0]) == GEN
    steps = record["decode_step_s"]["all"]
    # a compile inside the timers made the first step ~660x the median (0.63 s against 0.95 ms) and 1/12 of the
    # warm-up's compile (7.4 s): a shape compiled again, by dynamo's cache warmer than the first time
    assert len(steps) == GEN - 1 and steps[0] < 50 * record["decode_step_s"]["median"], steps
    assert max(steps) < record["compile_s"] / 20, (steps, record["compile_s"])


def test_launched_stacked_variant_matches_the_graphed_run_and_says_so(tmp_path):
    """hpi run's path, one rank: the same build graphed, then graphed with the stacked products; the variant's record
    says so in its spec and workload (what the planner prices: cost.overhead.skinny_saving)."""
    graphed, stacked = _graphed_and_variant(LAYOUTS["one-rank"], {"skinny_gemm": True}, tmp_path)
    assert stacked["tokens"] == graphed["tokens"] and len(stacked["tokens"][0]) == GEN
    assert stacked["spec"]["skinny_gemm"] is True and stacked["spec"]["workload"]["skinny_gemm"] is True
    assert graphed["spec"]["skinny_gemm"] is False and graphed["spec"]["workload"]["skinny_gemm"] is False


def test_spec_compiles_only_a_graphed_step():
    with pytest.raises(ValueError, match="decode_compile compiles the graphed decode step.*--cuda-graphs"):
        RunSpec(plan=Plan(), model="tiny-llama", device="cpu", decode_compile=True)
    with pytest.raises(ValueError, match="decode_compile compiles the graphed"):
        RunSpec(plan=Plan(), model="tiny-llama", device="cpu", variants=({"decode_compile": True},))
    ok = RunSpec(plan=Plan(), model="tiny-llama", device="cpu", decode_graphs=True,
                 variants=({"decode_compile": True},))
    assert [m.workload.decode_compile for m in ok.measurements()] == [False, True]


def test_variants_may_switch_graphs_but_not_rebuild():
    spec = RunSpec(plan=Plan(batch_size=2), model="tiny-llama", device="cpu", dtype="fp32",
                   variants=({"decode_graphs": True, "batch_size": 4}, {"batch_size": 8}))
    own, graphed, eager = spec.measurements()
    assert (own.decode_graphs, graphed.decode_graphs, eager.decode_graphs) == (False, True, False)
    assert graphed.plan.batch_size == 4 and graphed.workload.decode_graphs and not eager.workload.decode_graphs
    assert graphed.out_dir.endswith("variant-1") and graphed.variants == ()
    with pytest.raises(ValueError, match="needs a new build"):
        RunSpec(plan=Plan(), model="tiny-llama", variants=({"fetch_wait": "host"},))


# ---- the capture, on a GPU ---------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "opt"])
@pytest.mark.parametrize("padded", [False, True], ids=["equal-prompts", "left-padded"])
def test_captured_decode_generates_the_eager_tokens_on_a_gpu(family, padded):
    config = _tiny(family)
    device = torch.device("cuda")
    stage = build_stage(config, ShardSpec.whole(config.num_hidden_layers), dtype=torch.float32, device=device,
                        seed=0).eval()
    g = torch.Generator().manual_seed(3)
    lengths = [9, 4] if padded else [9, 9]
    ids, padding = left_pad([torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in lengths], 0)

    others = torch.randint(3, config.vocab_size, ids.shape, generator=g)
    gen = PipelineGenerator(stage=stage, groups=_one_rank(), new_cache=DynamicCache, hidden_size=0,
                            dtype=torch.float32, device=device, micro_batches=1, sampler=Sampler(), decode_graphs=True)

    def generate(prompts: torch.Tensor, graphs: bool) -> list[list[int]]:
        gen.decode_graphs, gen.times = graphs, StepTimes()
        return torch.cat(gen.run(prompts, 2, 9, GEN, chat=False, padding=padding if padded else None)).tolist()

    eager = generate(ids, False)
    assert generate(ids, True) == eager and len(gen.times.capture_s) == 1
    # another generation in between (other ids over the same slots) replays the kept graph; then these ids again on
    # it: the replay over the rewound cache, the other ids' keys and values behind the mask, gives the eager tokens
    others_graphed = generate(others, True)
    assert gen.times.capture_s == [] and others_graphed == generate(others, False)
    assert generate(ids, True) == eager and gen.times.capture_s == []
