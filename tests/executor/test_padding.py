"""Prompts of unequal token length: left padding, a per-row attention mask and per-row positions.

Three levels, cheapest first:
- the padding itself (``LeftPadding`` / ``left_pad`` / ``prompt_batch``), pure functions;
- the generator and the stage in one process (split into two pipeline stages, two micro-batches) for each
  family: a padded batch generates, row by row, what each prompt generates alone and what transformers'
  ``generate`` generates with left padding (Llama, Mistral past its sliding window, Qwen2, OPT's learned
  positions). RoPE depends only on position differences, so a row shifted by its pad count would still
  match for the RoPE families; OPT's learned positions are what catch a wrong position id, and the pure
  test pins the ids to generate's own formula;
- ``hpi run``'s path (launch -> worker ranks) with text prompts of three lengths under one rank (chat
  mode), TP 2, and PP 2 with two micro-batches under ZeRO-3 CPU offload.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from transformers import DynamicCache  # noqa: E402

from hpi.executor.generate import LeftPadding, PipelineGenerator, Sampler, left_pad  # noqa: E402
from hpi.executor.groups import Groups  # noqa: E402
from hpi.executor.modeling import ShardSpec, build_stage, load_hf_config  # noqa: E402
from hpi.executor.spec import RunSpec  # noqa: E402
from hpi.executor.weights import full_state_dict  # noqa: E402
from hpi.executor.worker import pad_token_id, prompt_batch  # noqa: E402
from hpi.planner.specs.plan import Plan  # noqa: E402
from hpi.planner.specs.workload import Workload  # noqa: E402

GEN = 6


# ---- the padding, pure ------------------------------------------------------------------------------
def test_left_pad_builds_mask_and_positions_like_generate():
    ids, padding = left_pad([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert padding == LeftPadding((3, 1, 2), 3) and padding.is_padded
    mask = padding.prompt_mask()
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    # transformers' generate: position_ids = cumsum(mask) - 1, pads filled with 0
    want = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    assert torch.equal(padding.position_ids(0), want)
    assert padding.position_ids(0).tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]
    # decode: the token fed by forward f of row r sits at lengths[r] + f - 1 (generate adds 1 per step)
    assert padding.position_ids(1).tolist() == [[3], [1], [2]]
    assert padding.position_ids(3).tolist() == [[5], [3], [4]]
    # the mask grows by one column of ones per generated token
    assert padding.attention_mask(0).tolist() == mask.tolist()
    assert padding.attention_mask(2).tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]]


def test_padding_slices_by_rows_and_knows_when_nothing_is_padded():
    padding = LeftPadding((3, 3, 1, 2), 3)
    assert padding.rows(0, 2) == LeftPadding((3, 3), 3) and not padding.rows(0, 2).is_padded
    assert padding.rows(2, 4).prompt_mask().tolist() == [[0, 0, 1], [0, 1, 1]]
    _, full = left_pad([[1, 2], [3, 4]], pad_id=0)
    assert not full.is_padded
    for bad in ((0, 3), (4, 3)):
        with pytest.raises(ValueError, match=r"not in \[1, prompt_len\(3\)\]"):
            LeftPadding(bad, 3)


def test_pad_id_falls_back_to_eos_then_zero():
    assert pad_token_id(SimpleNamespace(pad_token_id=7, eos_token_id=2)) == 7
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


class _Words:
    """A stand-in tokenizer: "w{i}" is token i; no pad token, EOS 2."""

    pad_token_id, eos_token_id = None, 2

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [int(w[1:]) for w in text.split()]}


def _spec(**kw) -> RunSpec:
    return RunSpec(plan=Plan(batch_size=4), model="tiny-llama", device="cpu", dtype="fp32",
                   workload=Workload(prompt_len_tokens=5, gen_len_tokens=2), **kw)


def test_prompt_batch_pads_text_prompts_and_leaves_random_ids_alone():
    tokenizer = _Words()
    prompts = prompt_batch(_spec(prompts=("w11 w12 w13", "w5")), 100, tokenizer)
    # cycled to batch 4, padded with EOS (no pad token)
    assert prompts.ids.tolist() == [[11, 12, 13], [2, 2, 5], [11, 12, 13], [2, 2, 5]]
    assert prompts.padding == LeftPadding((3, 1, 3, 1), 3)
    assert prompts.rows(1, 3).ids.tolist() == [[2, 2, 5], [11, 12, 13]]
    assert prompts.rows(1, 3).padding == LeftPadding((1, 3), 3)
    random = prompt_batch(_spec(), 100)
    assert random.ids.shape == (4, 5) and not random.padding.is_padded
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        prompt_batch(_spec(prompts=("w1", " ")), 100, tokenizer)


# ---- generator + stages in one process ----------------------------------------------------------------
def _tiny(family: str):
    """tiny-llama, and small configs of the other families (as tests/executor/test_modeling.py builds them)."""
    from transformers import MistralConfig, OPTConfig, Qwen2Config

    if family == "llama":
        return load_hf_config("tiny-llama")
    if family == "mistral":  # window 6 < the longest prompt + generated tokens: the window is exercised
        return MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=1, head_dim=24, vocab_size=301, sliding_window=6,
                             max_position_embeddings=128, tie_word_embeddings=False)
    if family == "qwen2":
        return Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True,
                           max_position_embeddings=128)
    if family == "opt":  # learned positions with OPT's offset of 2
        return OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4, vocab_size=302,
                         max_position_embeddings=64, word_embed_proj_dim=64)
    raise KeyError(family)


def _one_rank() -> Groups:
    """Groups of a world of one (no process group is needed: pp 1 sends nothing, benchmark mode has no stop check)."""
    return Groups.alone()


def _generate(stages, ids, padding, micro_batches: int = 1, calls: list | None = None) -> list[list[int]]:
    """Greedy tokens of the stages composed in one process, through ``PipelineGenerator``."""
    def composed(x, caches, cache_position, **masks):
        if calls is not None:
            calls.append(sorted(masks))
        for stage, cache in zip(stages, caches):
            x = stage(x, cache, cache_position, **masks)
        return x

    gen = PipelineGenerator(stage=composed, groups=_one_rank(), new_cache=lambda: [DynamicCache() for _ in stages],
                            hidden_size=0, dtype=torch.float32, device=torch.device("cpu"),
                            micro_batches=micro_batches, sampler=Sampler())
    return torch.cat(gen.run(ids, ids.shape[0], ids.shape[1], GEN, chat=False, padding=padding)).tolist()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "opt"])
def test_padded_batch_generates_each_prompt_alone_and_what_generate_does(family):
    config = _tiny(family)
    g = torch.Generator().manual_seed(5)
    lengths = [7, 7, 3, 1]  # micro-batch 0 unpadded (the fast path), micro-batch 1 padded to 7
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    ids, padding = left_pad(prompts, pad_id=0)
    n = config.num_hidden_layers
    stages = [build_stage(config, ShardSpec.for_stage([1, n - 1], i), dtype=torch.float32, seed=0) for i in range(2)]

    calls: list = []
    batched = _generate(stages, ids, padding, micro_batches=2, calls=calls)
    alone = [_generate(stages, torch.tensor([p]), None)[0] for p in prompts]
    assert batched == alone
    # the unpadded micro-batch keeps the mask-free path; the padded one gets a mask and positions every forward
    assert calls[0::2] == [[]] * GEN
    assert calls[1::2] == [["attention_mask", "position_ids"]] * GEN

    cfg = type(config).from_dict(config.to_dict())
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    model.load_state_dict(full_state_dict(config, 0, torch.float32))
    model.eval().generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(ids, attention_mask=padding.prompt_mask(), do_sample=False, max_new_tokens=GEN,
                             min_new_tokens=GEN, pad_token_id=0)
    assert batched == out[:, ids.shape[1]:].tolist()


def test_generator_refuses_padding_of_other_rows():
    gen = PipelineGenerator(stage=None, groups=_one_rank(), new_cache=list, hidden_size=0, dtype=torch.float32,
                            device=torch.device("cpu"), micro_batches=1, sampler=Sampler())
    with pytest.raises(ValueError, match="slice the padding like the ids"):
        gen.run(torch.zeros(2, 3, dtype=torch.int64), 2, 3, 1, chat=False, padding=LeftPadding((3, 1, 2), 3))


# ---- hpi run's path ------------------------------------------------------------------------------------
PROMPTS = ("w11 w220 w3301 w45 w7 w8 w9", "w5", "w100 w200 w300")  # 7, 1 and 3 tokens
BATCH = 4  # rows: prompts 0, 1, 2, 0 (cycled); two micro-batches split them (0, 1) and (2, 0), both padded
ROW_PROMPTS = [PROMPTS[i % len(PROMPTS)] for i in range(BATCH)]
EOS = 2  # tiny-llama's eos_token_id

LAYOUTS = {
    "one-rank-chat": (Plan(batch_size=BATCH), "chat"),
    "tp2": (Plan(tp=2, batch_size=BATCH), "benchmark"),
    "pp2-2-micro-batches-zero3-cpu-offload": (Plan(pp=2, micro_batches=2, offload="cpu", pin_memory=False,
                                                   batch_size=BATCH), "benchmark"),
}


@pytest.fixture(scope="module")
def alone_tokens(word_checkpoint) -> dict[str, list[int]]:
    """transformers from the checkpoint: each prompt alone (no padding), and the whole batch left-padded
    through ``generate``, which must agree row by row."""
    model = transformers.AutoModelForCausalLM.from_pretrained(word_checkpoint, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(word_checkpoint)
    kw = dict(do_sample=False, max_new_tokens=GEN, min_new_tokens=GEN, pad_token_id=0)
    alone = {}
    with torch.no_grad():
        for text in PROMPTS:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            alone[text] = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)[0, ids.shape[1]:].tolist()
        ids, padding = left_pad([tokenizer(t)["input_ids"] for t in ROW_PROMPTS], pad_id=0)
        batched = model.generate(ids, attention_mask=padding.prompt_mask(), **kw)[:, ids.shape[1]:].tolist()
    assert batched == [alone[t] for t in ROW_PROMPTS]
    assert all(EOS not in tokens for tokens in alone.values())  # chat mode then runs all GEN steps
    return alone


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_unequal_text_prompts_generate_each_prompts_own_tokens(name, word_checkpoint, alone_tokens, tmp_path):
    pytest.importorskip("deepspeed")
    from hpi.executor.launch import launch

    plan, mode = LAYOUTS[name]
    spec = RunSpec(plan=plan, model="tiny-llama", checkpoint=str(word_checkpoint), prompts=PROMPTS, mode=mode,
                   workload=Workload(prompt_len_tokens=7, gen_len_tokens=GEN), device="cpu", dtype="fp32",
                   out_dir=str(tmp_path))
    lines: list[str] = []
    record = launch(spec, timeout_s=300, stream=lines.append).to_json()
    want = [alone_tokens[t] for t in ROW_PROMPTS]
    assert record["tokens"] == want, name
    assert record["generated_tokens_per_sequence"] == GEN  # new tokens only: no padding counted
    assert record["prompt_len_tokens_actual"] == 7
    assert record["prompt_tokens_per_row"] == [7, 1, 3, 7]
    texts = [" ".join(f"w{t}" for t in tokens) for tokens in want]
    assert record["texts"] == texts
    if mode == "chat":
        assert texts[0] in lines  # rank 0 streamed the first row's answer
    if plan.is_offloaded:
        assert record["h2d"]["bytes_per_step"] > 0  # ZeRO-3 really streamed the weights
