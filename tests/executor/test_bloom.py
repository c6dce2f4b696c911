"""BLOOM (ALiBi attention, fused per-head query_key_value, embedding LayerNorm, tied head) in the executor: greedy
tokens identical to transformers' own ``BloomForCausalLM.generate`` on one rank, under ZeRO-3 CPU offload, TP 2, PP 2
and TP 2 over the static cache CUDA graphs decode with (run eagerly), from seeded weights and from a saved
checkpoint read slice-wise under TP 2 with left-padded prompts; serving's slot-cache steps give transformers'
logits (``hpi serve`` itself: tests/serve/test_bloom.py). fp32, a tiny BLOOM config; DeepSpeed on its CPU
accelerator with gloo.

The weights are drawn with ``initializer_range`` 0.4, 8 heads and 16-token prompts: at BLOOM's 0.02 the tiny model
repeats its last token whatever the slopes, and with 4 heads over 10 tokens either TP rank could use the other's
slopes unseen; here both mistakes change the tokens (``test_the_tokens_depend_on_each_ranks_slopes``).
"""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402
from transformers.models.bloom import modeling_bloom  # noqa: E402

from hpi.executor.bloom import alibi_slopes  # noqa: E402
from hpi.executor.generate import PipelineGenerator, Sampler, left_pad  # noqa: E402
from hpi.executor.graphs import StaticKVCache  # noqa: E402
from hpi.executor.groups import Groups  # noqa: E402
from hpi.executor.modeling import ShardSpec, build_stage, load_hf_config  # noqa: E402
from hpi.executor.spec import RunSpec  # noqa: E402
from hpi.executor.tp import RowParallelLinear, shard_index  # noqa: E402
from hpi.executor.weights import full_state_dict, param_table, write_checkpoint  # noqa: E402
from hpi.executor.worker import check_quantizable, prompt_batch  # noqa: E402
from hpi.planner.catalog import load_model  # noqa: E402
from hpi.planner.specs.plan import Plan  # noqa: E402
from hpi.planner.specs.workload import Workload  # noqa: E402

CONFIG = {
    "architectures": ["BloomForCausalLM"], "model_type": "bloom", "hidden_size": 64, "n_layer": 2, "n_head": 8,
    "vocab_size": 512, "layer_norm_epsilon": 1e-5, "initializer_range": 0.4, "tie_word_embeddings": True,
    "apply_residual_connection_post_layernorm": False, "hidden_dropout": 0.0, "attention_dropout": 0.0,
    "pretraining_tp": 1, "slow_but_exact": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}
HEADS = dict(n_heads=8, n_kv_heads=8, head_dim=8)
WORKLOAD = Workload(prompt_len_tokens=16, gen_len_tokens=5)
BATCH = 2
LAYOUTS = {
    "one-rank": Plan(batch_size=BATCH),
    "zero3-cpu-offload": Plan(offload="cpu", pin_memory=False, batch_size=BATCH),
    "tp2": Plan(tp=2, batch_size=BATCH),
    "pp2": Plan(pp=2, batch_size=BATCH),
    "tp2-static-cache": Plan(tp=2, batch_size=BATCH),  # decode_graphs: the static cache, run eagerly on the CPU
}
PROMPTS = ("w11 w220 w301 w45 w7 w8 w9", "w5", "w100 w200 w300")  # 7, 1 and 3 tokens: rows left-padded
GEN = 5


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bloom") / "config.json"
    path.write_text(json.dumps(CONFIG))
    return str(path)


@pytest.fixture(scope="module")
def config(model_path):
    return load_hf_config(model_path)


def _hf_model(config, state_dict):
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state_dict)
    model.eval().generation_config.eos_token_id = None
    return model


def _hf_generate(model, ids, mask, n_new: int) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                             pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def _spec(plan: Plan, model: str, out_dir, **kw) -> RunSpec:
    return RunSpec(plan=plan, model=model, workload=WORKLOAD, device="cpu", dtype="fp32", out_dir=str(out_dir), **kw)


# ---- TP slicing and the slopes -------------------------------------------------------------------------------
def test_query_key_value_is_cut_into_whole_heads():
    """transformers reads the fused output as [heads, 3, head_dim] (``BloomAttention._reshape``): the even cut of
    dim 0 must hold heads 2-3 whole on rank 1, each with its q, k and v rows, and the bias the same way."""
    heads, d, h = 4, 3, 5
    full = torch.arange(3 * heads * d * h).reshape(3 * heads * d, h)
    part = shard_index("transformer.h.0.self_attention.query_key_value.weight", tuple(full.shape), tp_rank=1,
                       tp_size=2, **HEADS)
    cut = part.apply(full)
    assert torch.equal(cut.view(2, 3, d, h), full.view(heads, 3, d, h)[2:4])
    bias = torch.arange(3 * heads * d)
    cut_bias = shard_index("transformer.h.0.self_attention.query_key_value.bias", tuple(bias.shape), tp_rank=1,
                           tp_size=2, **HEADS).apply(bias)
    assert torch.equal(cut_bias.view(2, 3, d), bias.view(heads, 3, d)[2:4])

    def cut_of(name, shape):
        s = shard_index(f"transformer.h.0.{name}", shape, tp_rank=1, tp_size=2, **HEADS)
        return None if s is None else (s.dim, s.start, s.stop)

    assert cut_of("self_attention.dense.weight", (64, 64)) == (1, 32, 64)  # row-parallel: input features
    assert cut_of("self_attention.dense.bias", (64,)) is None  # added once, after the all-reduce
    assert cut_of("mlp.dense_h_to_4h.weight", (256, 64)) == (0, 128, 256)
    assert cut_of("mlp.dense_h_to_4h.bias", (256,)) == (0, 128, 256)
    assert cut_of("mlp.dense_4h_to_h.weight", (64, 256)) == (1, 128, 256)
    assert cut_of("mlp.dense_4h_to_h.bias", (64,)) is None
    assert cut_of("input_layernorm.weight", (64,)) is None


@pytest.mark.parametrize("n_heads,tp", [(4, 2), (8, 4), (12, 2), (112, 8)])
def test_a_tp_rank_takes_the_slopes_of_its_global_heads(n_heads, tp):
    whole = alibi_slopes(n_heads, 0, 1, "cpu")  # 12, 112: not powers of two
    parts = [alibi_slopes(n_heads, r, tp, "cpu") for r in range(tp)]
    assert all(p.shape == (n_heads // tp,) for p in parts)
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(parts[0], parts[1])


@pytest.mark.parametrize("n_heads", [4, 8, 12, 16, 112])
def test_the_slopes_are_alibis_geometric_sequence(n_heads):
    """Press et al.'s slopes, as BLOOM builds them: for the largest power of two p <= n, 2^(-8i/p) for i = 1..p, then
    the odd terms of the 2p sequence for the heads past p; and bit for bit transformers' own where it has them."""
    p = 2 ** math.floor(math.log2(n_heads))
    want = [2 ** (-8 * i / p) for i in range(1, p + 1)] + [2 ** (-4 * i / p) for i in range(1, 2 * (n_heads - p), 2)]
    slopes = alibi_slopes(n_heads, 0, 1, "cpu")
    assert slopes.dtype == torch.float32 and slopes.is_contiguous()
    torch.testing.assert_close(slopes, torch.tensor(want, dtype=torch.float32), rtol=1e-6, atol=0)
    if hasattr(modeling_bloom, "_get_alibi_slopes"):  # private, and not in every transformers
        assert torch.equal(slopes, modeling_bloom._get_alibi_slopes(n_heads, torch.device("cpu")))


def test_tp2_stage_holds_half_the_heads(config):
    stage = build_stage(config, ShardSpec.whole(2, tp_rank=1, tp_size=2), dtype=torch.float32, device="meta")
    shapes = {n: tuple(p.shape) for n, p in stage.named_parameters() if n.startswith("layers.0.")}
    assert shapes["layers.0.self_attention.query_key_value.weight"] == (96, 64)
    assert shapes["layers.0.self_attention.dense.linear.weight"] == (64, 32)
    assert shapes["layers.0.mlp.dense_h_to_4h.weight"] == (128, 64)
    assert shapes["layers.0.mlp.dense_4h_to_h.linear.weight"] == (64, 128)
    assert isinstance(stage.layers[0].self_attention.dense, RowParallelLinear)
    assert stage.layers[0].self_attention.num_heads == 4
    assert stage.hf_names["embed_norm.weight"] == "transformer.word_embeddings_layernorm.weight"
    assert stage.hf_names["layers.1.mlp.dense_4h_to_h.linear.weight"] == "transformer.h.1.mlp.dense_4h_to_h.weight"
    assert stage.hf_names["norm.bias"] == "transformer.ln_f.bias"


# ---- names, counts, quantization and refusals -----------------------------------------------------------------
def test_param_table_is_transformers_state_dict(config):
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    table = param_table(config)
    assert {n: info.shape for n, info in table.items()} == {n: tuple(t.shape) for n, t in model.state_dict().items()}
    assert table["lm_head.weight"].source == "transformer.word_embeddings.weight"  # tied


def test_planner_count_is_the_built_stage_count(model_path, config):
    """The planner's parameter count of the tiny BLOOM equals the executor's: one whole stage (the tied head
    counted once), and the TP-2 x PP-2 shards added up."""
    planner = load_model(model_path).params_total
    whole = build_stage(config, ShardSpec.whole(2), dtype=torch.float32, device="meta")
    tied = config.vocab_size * config.hidden_size
    assert sum(p.numel() for p in whole.parameters()) - tied == planner
    table, total = param_table(config), 0
    for stage in range(2):
        for r in range(2):
            built = build_stage(config, ShardSpec.for_stage([1, 1], stage, r, 2), dtype=torch.float32, device="meta")
            for name, p in built.named_parameters():
                hf = built.hf_names[name]
                cut = shard_index(hf, table[hf].shape, tp_rank=r, tp_size=2, **HEADS)
                total += p.numel() if cut is not None else (p.numel() if r == 0 else 0)
    assert total - tied == planner


def test_bloom_176b_shards_add_up_to_the_planner_count():
    config = load_hf_config("bloom-176b")
    heads = dict(n_heads=112, n_kv_heads=112, head_dim=128)
    table, total = param_table(config), 0
    for r in range(8):
        stage = build_stage(config, ShardSpec.whole(70, r, 8), device="meta")
        for name, p in stage.named_parameters():
            hf = stage.hf_names[name]
            cut = shard_index(hf, table[hf].shape, tp_rank=r, tp_size=8, **heads)
            if cut is None:
                total += p.numel() if r == 0 else 0
            else:
                total += p.numel() // cut.padded * (cut.stop - cut.start)
    total -= config.vocab_size * config.hidden_size  # the tied head: one tensor in the planner's count
    assert total == load_model("bloom-176b").params_total == 176_247_271_424


def test_4bit_builds_follow_the_quantization_group_rule(config):
    check_quantizable(build_stage(config, ShardSpec.whole(2), dtype=torch.float32, device="meta"))  # 64, 256 wide
    with pytest.raises(ValueError, match=r"self_attention\.dense\.linear\.weight has 32 input features"):
        check_quantizable(build_stage(config, ShardSpec.whole(2, 0, 2), dtype=torch.float32, device="meta"))


def test_4bit_bloom_runs_where_widths_fit_and_is_refused_where_not(model_path, tmp_path):
    """Launched: 4-bit BLOOM at TP 2 with every Linear input width a multiple of 64 per rank (hidden 128) runs
    through DeepSpeed's quantized initialization; the tiny model's 32-wide dense shard at TP 2 is refused."""
    pytest.importorskip("deepspeed")
    from hpi.executor.launch import LaunchError, launch

    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps({**CONFIG, "hidden_size": 128}))
    plan = Plan(tp=2, offload="cpu", pin_memory=False, weight_bits=4, batch_size=BATCH, persistence_threshold_elems=0)
    record = launch(_spec(plan, str(wide), tmp_path / "wide"), timeout_s=300)
    assert all(len(t) == WORKLOAD.gen_len_tokens for t in record.output.tokens)
    assert record.transfers.h2d.bytes_per_step > 0
    with pytest.raises(LaunchError, match="not a multiple of the quantization group"):
        launch(_spec(plan, model_path, tmp_path / "narrow"), timeout_s=300)


def test_slow_but_exact_is_refused(model_path):
    config = load_hf_config(model_path)
    config.pretraining_tp, config.slow_but_exact = 4, True
    with pytest.raises(NotImplementedError, match="set slow_but_exact false"):
        build_stage(config, ShardSpec.whole(2), device="meta")


# ---- serving: the slot cache -----------------------------------------------------------------------------------
def test_mixed_slot_steps_and_dense_decode_equal_each_sequence_alone(config):
    """As tests/executor/test_slots.py for the other families: a ragged step mixing prompt chunks (one after a
    cached part) with a decode token, then the all-slots decode, give the logits transformers' BLOOM gives each
    sequence alone (atol 1e-4: the logits of this 0.4-initialised model are in the tens)."""
    from hpi.executor.scheduler import Segment
    from hpi.executor.slots import DenseDecode, RaggedStep, SlotKVCache

    stage = build_stage(config, ShardSpec.whole(2), dtype=torch.float32, seed=0)
    ref = _hf_model(config, full_state_dict(config, 0, torch.float32))

    def alone(ids):
        with torch.no_grad():
            return ref(torch.tensor([ids])).logits[0, -1]

    def ragged(segments):
        cache.bind(RaggedStep.build(segments, torch.device("cpu")))
        ids = torch.tensor([[t for s in segments for t in s.token_ids]])
        ends = torch.tensor([sum(s.n_tokens for s in segments[: i + 1]) - 1 for i in range(len(segments))])
        with torch.no_grad():
            return stage(ids, cache, None, logits_index=ends)

    close = dict(atol=1e-4, rtol=0)
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in (9, 5, 12))
    cache = SlotKVCache(n_slots=4, max_len=32)
    out = ragged([Segment(2, 0, tuple(a[:4]), True), Segment(0, 0, tuple(b), True)])
    torch.testing.assert_close(out[0], alone(a[:4]), **close)
    torch.testing.assert_close(out[1], alone(b), **close)
    out = ragged([Segment(0, 5, (7,), True), Segment(2, 4, tuple(a[4:]), True), Segment(3, 0, tuple(c), True)])
    for got, ids in zip(out, (b + [7], a, c)):
        torch.testing.assert_close(got, alone(ids), **close)
    cache.bind(DenseDecode(torch.tensor([6, 31, 9, 12]), span=16))  # slot 1 is empty: masked, output ignored
    with torch.no_grad():
        out = stage(torch.tensor([[17], [0], [11], [13]]), cache, None)
    for row, ids in ((0, b + [7, 17]), (2, a + [11]), (3, c + [13])):
        torch.testing.assert_close(out[row], alone(ids), **close)


# ---- one process: the stages, padded prompts, the static cache ----------------------------------------------
def _generate(stages, ids, padding, micro_batches: int = 1, graphs: bool = False) -> list[list[int]]:
    def composed(x, caches, cache_position, **masks):
        for stage, cache in zip(stages, caches):
            x = stage(x, cache, cache_position, **masks)
        return x

    gen = PipelineGenerator(stage=composed, groups=Groups.alone(), new_cache=lambda: [DynamicCache() for _ in stages],
                            hidden_size=0, dtype=torch.float32, device=torch.device("cpu"),
                            micro_batches=micro_batches, sampler=Sampler(), decode_graphs=graphs,
                            new_static_cache=lambda n: [StaticKVCache(n) for _ in stages])
    return torch.cat(gen.run(ids, ids.shape[0], ids.shape[1], GEN, chat=False, padding=padding)).tolist()


def test_padded_pipeline_generates_what_generate_does(config):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in (7, 7, 3, 1)]
    ids, padding = left_pad(prompts, pad_id=0)
    stages = [build_stage(config, ShardSpec.for_stage([1, 1], i), dtype=torch.float32, seed=0) for i in range(2)]
    batched = _generate(stages, ids, padding, micro_batches=2)  # micro-batch 0 unpadded, 1 padded
    assert batched == [_generate(stages, torch.tensor([p]), None)[0] for p in prompts]
    model = _hf_model(config, full_state_dict(config, 0, torch.float32))
    assert batched == _hf_generate(model, ids, padding.prompt_mask(), GEN)
    # the static cache CUDA graphs decode over (run eagerly here): the same tokens
    assert _generate(stages, ids, padding, micro_batches=2, graphs=True) == batched


@pytest.mark.parametrize("rank", [0, 1])
def test_the_tokens_depend_on_each_ranks_slopes(rank, model_path, config, monkeypatch):
    """Both TP-2 ranks using rank ``rank``'s slopes give other tokens on the launched layouts' prompts, so
    ``test_layout_matches_transformers[tp2]`` catches a rank taking the slopes of the wrong heads."""
    model = _hf_model(config, full_state_dict(config, 0, torch.float32))
    ids = prompt_batch(_spec(Plan(batch_size=BATCH), model_path, "unused"), config.vocab_size).ids
    want = _hf_generate(model, ids, torch.ones_like(ids), GEN)
    real = modeling_bloom._get_alibi_slopes
    half = config.n_head // 2
    monkeypatch.setattr(modeling_bloom, "_get_alibi_slopes",
                        lambda n, device: real(n, device)[torch.arange(n) % half + rank * half])
    assert _hf_generate(model, ids, torch.ones_like(ids), GEN) != want


# ---- hpi run's path: launched ranks ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_tokens(model_path, config) -> list[list[int]]:
    model = _hf_model(config, full_state_dict(config, seed=0, dtype=torch.float32))
    ids = prompt_batch(_spec(Plan(batch_size=BATCH), model_path, "unused"), config.vocab_size).ids
    return _hf_generate(model, ids, torch.ones_like(ids), WORKLOAD.gen_len_tokens)


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_transformers(name, model_path, reference_tokens, tmp_path):
    pytest.importorskip("deepspeed")
    from hpi.executor.launch import launch

    spec = _spec(LAYOUTS[name], model_path, tmp_path, decode_graphs="static-cache" in name)
    assert spec.workload.decode_graphs == ("static-cache" in name)
    record = launch(spec, timeout_s=300).to_json()
    assert record["tokens"] == reference_tokens
    assert record["model"]["params_total"] == load_model(model_path).params_total


@pytest.fixture(scope="module")
def bloom_checkpoint(tmp_path_factory, config):
    """The seeded weights with non-trivial biases and norms (zeros and ones would hide a bias added twice or cut
    wrongly), written as an HF checkpoint in small shards, with a word-level tokenizer ("w{i}" is token i)."""
    pytest.importorskip("tokenizers")
    from hpi.serve.tokens import word_tokenizer

    g = torch.Generator().manual_seed(99)
    state = {}
    for name, t in full_state_dict(config, 0, torch.float32).items():
        if name.endswith(".bias"):
            t = 0.1 * torch.randn(t.shape, generator=g)
        elif t.dim() == 1:
            t = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        state[name] = t
    state["lm_head.weight"] = state["transformer.word_embeddings.weight"]
    ckpt = write_checkpoint(state, config, tmp_path_factory.mktemp("bloom-ckpt"), shard_size_bytes=2**18)
    word_tokenizer(config.vocab_size).save_pretrained(ckpt)
    return ckpt


def test_checkpoint_under_tp2_with_padded_prompts_matches_transformers(bloom_checkpoint, tmp_path):
    pytest.importorskip("deepspeed")
    from hpi.executor.launch import launch

    model = transformers.AutoModelForCausalLM.from_pretrained(bloom_checkpoint, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    tokenizer = transformers.AutoTokenizer.from_pretrained(bloom_checkpoint)
    rows = [PROMPTS[i % len(PROMPTS)] for i in range(3)]
    ids, padding = left_pad([tokenizer(t)["input_ids"] for t in rows], pad_id=0)
    assert len(list((bloom_checkpoint).glob("*.safetensors"))) > 1
    want = _hf_generate(model, ids, padding.prompt_mask(), GEN)

    spec = RunSpec(plan=Plan(tp=2, batch_size=3), model=str(bloom_checkpoint), checkpoint=str(bloom_checkpoint),
                   prompts=PROMPTS, workload=Workload(prompt_len_tokens=7, gen_len_tokens=GEN), device="cpu",
                   dtype="fp32", out_dir=str(tmp_path))
    record = launch(spec, timeout_s=300).to_json()
    assert record["prompt_tokens_per_row"] == [7, 1, 3]
    assert record["tokens"] == want


def test_a_base_model_checkpoint_loads_like_a_prefixed_one(config, tmp_path):
    """bigscience's BLOOM files were saved from ``BloomModel``: ``h.0....``, ``word_embeddings.weight``, no
    ``transformer.`` prefix and no LM head (tied). A stage reads them as it reads the prefixed names."""
    state = full_state_dict(config, 0, torch.float32)
    bare = {k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")}
    assert "h.0.self_attention.query_key_value.weight" in bare and "lm_head.weight" not in bare
    prefixed = write_checkpoint(state, config, tmp_path / "prefixed")
    base = write_checkpoint(bare, config, tmp_path / "base")
    for r in range(2):
        shard = ShardSpec.for_stage([1, 1], r, tp_rank=r, tp_size=2)  # stage r's TP rank r: both ends, both ranks
        want = build_stage(config, shard, dtype=torch.float32, checkpoint=str(prefixed)).state_dict()
        got = build_stage(config, shard, dtype=torch.float32, checkpoint=str(base)).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("padded", [False, True], ids=["equal-prompts", "left-padded"])
def test_captured_decode_generates_the_eager_tokens_on_a_gpu(config, padded):
    """As tests/executor/test_graphs.py for the other families: the ALiBi step is captured and replayed."""
    device = torch.device("cuda")
    stage = build_stage(config, ShardSpec.whole(2), dtype=torch.float32, device=device, seed=0).eval()
    g = torch.Generator().manual_seed(3)
    lengths = [9, 4] if padded else [9, 9]
    ids, padding = left_pad([torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in lengths], 0)

    def generate(graphs: bool) -> list[list[int]]:
        gen = PipelineGenerator(stage=stage, groups=Groups.alone(), new_cache=DynamicCache, hidden_size=0,
                                dtype=torch.float32, device=device, micro_batches=1, sampler=Sampler(),
                                decode_graphs=graphs)
        return torch.cat(gen.run(ids, 2, 9, GEN, chat=False, padding=padding if padded else None)).tolist()

    assert generate(True) == generate(False)
