"""Stage building: a rank's TP-sharded slice of a pipeline stage computes exactly what transformers' own
model computes, for every family, every split and both weight sources (seeded random, safetensors).

All on CPU in fp32 (parity is exact up to float reassociation: atol 1e-5). The TP tests run two processes
over gloo; they import this file by path for the shared helpers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

from hpi.executor import weights as weights_mod  # noqa: E402
from hpi.executor.modeling import (  # noqa: E402
    ShardSpec,
    build_stage,
    causal_mask,
    load_hf_config,
    shard_config,
    stage_config,
)
from hpi.executor.tp import RowParallelLinear, VocabParallelLMHead, shard_index  # noqa: E402
from hpi.executor.weights import (  # noqa: E402
    full_state_dict,
    param_table,
    save_checkpoint,
    stable_seed,
    write_checkpoint,
)

ATOL = 1e-5
N_NEW = 4
FAMILIES = ["llama", "llama_bias", "qwen2", "mistral", "opt"]


# ---- shared helpers (also used by the TP subprocesses) ----------------------------------------------
def tiny_config(name: str):
    """Tiny configs that each exercise something: GQA split (llama), biases everywhere incl. the
    row-parallel ones (llama_bias), qkv bias + tied head (qwen2), one kv head replicated under tp 2 +
    explicit head_dim != hidden/heads + a sliding window shorter than prompt+generation + a vocab that tp 2
    must pad (mistral), learned positions + layer norms + tied head (opt)."""
    from transformers import MistralConfig, OPTConfig, Qwen2Config

    if name == "llama":
        return load_hf_config("tiny-llama")
    if name == "llama_bias":
        cfg = load_hf_config("tiny-llama")
        cfg.attention_bias = True
        cfg.mlp_bias = True
        cfg.num_hidden_layers = 3
        return cfg
    if name == "qwen2":
        return Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True,
                           max_position_embeddings=128)
    if name == "mistral":
        return MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=1, head_dim=24, vocab_size=301, sliding_window=6,
                             max_position_embeddings=128, tie_word_embeddings=False)
    if name == "opt":
        return OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4, vocab_size=302,
                         max_position_embeddings=64, word_embed_proj_dim=64)
    raise KeyError(name)


def prompt(vocab: int, batch: int = 2, seq: int = 6) -> "torch.Tensor":
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(1234))


@torch.no_grad()
def run_stages(stages, ids, n_new: int = N_NEW, chunks: list[int] | None = None):
    """Greedy decoding through stages composed by hand, one DynamicCache per stage.
    Returns (logits [b, n_new, vocab] float32, tokens [b, n_new]). ``chunks`` prefills in pieces."""
    caches = [DynamicCache() for _ in stages]
    chunks = chunks or [ids.shape[1]]
    start, logits, tokens = 0, [], []
    for n in chunks:  # prefill
        x = ids[:, start:start + n]
        pos = torch.arange(start, start + n)
        for stage, cache in zip(stages, caches):
            x = stage(x, cache, pos)
        start += n
    for step in range(n_new):
        logits.append(x)
        nxt = x.argmax(-1)
        tokens.append(nxt)
        if step == n_new - 1:
            break
        x, pos = nxt[:, None], torch.tensor([start])
        for stage, cache in zip(stages, caches):
            x = stage(x, cache, pos)
        start += 1
    return torch.stack(logits, 1), torch.stack(tokens, 1)


def build_all(config, split, *, tp_rank=0, tp_size=1, seed=0, checkpoint=None, tp_group=None):
    return [build_stage(config, ShardSpec.for_stage(split, i, tp_rank, tp_size), tp_group=tp_group,
                        dtype=torch.float32, device="cpu", seed=seed, checkpoint=checkpoint)
            for i in range(len(split))]


def perturbed_state_dict(config, seed: int = 0):
    """The seeded weights with non-trivial biases and norm weights (zeros and ones would hide slicing bugs)."""
    sd = full_state_dict(config, seed, torch.float32)
    g = torch.Generator().manual_seed(99)
    out = {}
    for name, t in sd.items():
        if name.endswith(".bias"):
            t = 0.1 * torch.randn(t.shape, generator=g)
        elif t.dim() == 1:
            t = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        out[name] = t
    if getattr(config, "tie_word_embeddings", False):
        out["lm_head.weight"] = out[[k for k in out if k.endswith("embed_tokens.weight")][0]]
    return out


# ---- references -------------------------------------------------------------------------------------
def hf_model(config, state_dict):
    cfg = type(config).from_dict(config.to_dict())
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    model.load_state_dict(state_dict)
    return model.eval()


@torch.no_grad()
def hf_greedy(model, ids, n_new: int = N_NEW):
    cache = DynamicCache(config=model.config)
    x, logits, tokens = ids, [], []
    for _ in range(n_new):
        out = model(x, past_key_values=cache, use_cache=True).logits[:, -1].float()
        logits.append(out)
        x = out.argmax(-1)[:, None]
        tokens.append(x[:, 0])
    return torch.stack(logits, 1), torch.stack(tokens, 1)


@torch.no_grad()
def hf_generate(model, ids, n_new: int = N_NEW):
    model.generation_config.eos_token_id = None
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n_new,
                         min_new_tokens=n_new, pad_token_id=0)
    return out[:, ids.shape[1]:]


# ---- one process, tp 1 -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_param_table_matches_transformers(family):
    config = tiny_config(family)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: v.shape for k, v in param_table(config).items()}
    assert got == want


@pytest.mark.parametrize("family", FAMILIES)
def test_single_stage_matches_transformers(family):
    config = tiny_config(family)
    ids = prompt(config.vocab_size)
    (stage,) = build_all(config, [config.num_hidden_layers])
    ref = hf_model(config, full_state_dict(config, 0, torch.float32))
    logits, tokens = run_stages([stage], ids)
    ref_logits, ref_tokens = hf_greedy(ref, ids)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(tokens, hf_generate(ref, ids))
    assert logits.dtype == torch.float32 and logits.shape == (2, N_NEW, config.vocab_size)


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_stages_compose(family):
    config = tiny_config(family)
    n = config.num_hidden_layers
    ids = prompt(config.vocab_size)
    whole = run_stages(build_all(config, [n]), ids)
    for split in ([1, n - 1], [n - 1, 1], [1] * n):
        stages = build_all(config, split)
        assert [s.shard.n_layers for s in stages] == split
        assert stages[0].embed_tokens is not None and all(s.embed_tokens is None for s in stages[1:])
        assert stages[-1].lm_head is not None and all(s.lm_head is None for s in stages[:-1])
        hidden = stages[0](ids, DynamicCache(), torch.arange(ids.shape[1]))
        assert hidden.shape == (2, ids.shape[1], config.hidden_size)
        logits, tokens = run_stages(stages, ids)
        torch.testing.assert_close(logits, whole[0], atol=ATOL, rtol=0)
        assert torch.equal(tokens, whole[1])


@pytest.mark.parametrize("family", ["llama", "mistral", "opt"])
def test_chunked_prefill_equals_one_go(family):
    """A multi-token chunk after a non-empty cache needs an explicit mask (sdpa's is_causal is top-left
    aligned); the stage builds it."""
    config = tiny_config(family)
    ids = prompt(config.vocab_size, seq=9)
    stages = build_all(config, [1, config.num_hidden_layers - 1])
    one = run_stages(stages, ids)
    for chunks in ([5, 4], [1, 3, 5]):
        got = run_stages(stages, ids, chunks=chunks)
        torch.testing.assert_close(got[0], one[0], atol=ATOL, rtol=0)
        assert torch.equal(got[1], one[1])


def test_sliding_window_matches_transformers_past_the_window():
    config = tiny_config("mistral")  # window 6
    ids = prompt(config.vocab_size, seq=9)
    ref = hf_model(config, full_state_dict(config, 0, torch.float32))
    logits, tokens = run_stages(build_all(config, [2, 1]), ids, n_new=5)
    ref_logits, ref_tokens = hf_greedy(ref, ids, n_new=5)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    assert torch.equal(tokens, ref_tokens)


def test_causal_mask_rule():
    assert causal_mask(0, 5, None, "cpu") is None  # one-go prefill: sdpa is_causal
    assert causal_mask(7, 1, None, "cpu") is None  # decode: full attention
    assert causal_mask(3, 1, 4, "cpu") is None  # decode inside the window
    m = causal_mask(2, 3, None, "cpu")[0, 0]
    assert m.tolist() == [[True, True, True, False, False], [True, True, True, True, False], [True] * 5]
    w = causal_mask(5, 1, 3, "cpu")[0, 0]
    assert w.tolist() == [[False, False, False, True, True, True]]


# ---- weights ----------------------------------------------------------------------------------------
def test_weights_are_deterministic_per_global_name_and_seed():
    config = tiny_config("llama")
    a, b = full_state_dict(config, 0), full_state_dict(config, 0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = full_state_dict(config, 1)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], a["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(a["model.norm.weight"], torch.ones(config.hidden_size))
    assert stable_seed(0, "x") == stable_seed(0, "x") != stable_seed(1, "x")
    assert stable_seed(0, "lm_head.weight") == 8712088487721688950  # blake2b, not Python's salted hash()
    std = a["model.layers.0.mlp.up_proj.weight"].std().item()
    assert abs(std - config.initializer_range) < 0.1 * config.initializer_range


def test_tied_head_is_the_embedding():
    config = tiny_config("qwen2")
    sd = full_state_dict(config)
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]
    (stage,) = build_all(config, [config.num_hidden_layers])
    assert torch.equal(stage.lm_head.weight, sd["model.embed_tokens.weight"])


@pytest.mark.parametrize("family", FAMILIES)
def test_tp_rank_weights_are_slices_of_the_full_tensors(family):
    """Built without a process group (forward would need one): each rank holds exactly its slice, and the
    slices of all ranks put back together are the full tensors."""
    config = tiny_config(family)
    sd = full_state_dict(config)
    split = [1, config.num_hidden_layers - 1]
    ranks = [build_all(config, split, tp_rank=r, tp_size=2) for r in range(2)]
    kv = getattr(config, "num_key_value_heads", config.num_attention_heads)
    heads = dict(n_heads=config.num_attention_heads, n_kv_heads=kv, head_dim=ranks[0][0].config.head_dim)
    for stage_pair in zip(*ranks):
        for name, hf in stage_pair[0].hf_names.items():
            full = sd[hf]
            parts = [dict(s.named_parameters())[name] for s in stage_pair]
            cuts = [shard_index(hf, tuple(full.shape), tp_rank=r, tp_size=2, **heads) for r in range(2)]
            for part, cut in zip(parts, cuts):
                assert torch.equal(part, full if cut is None else cut.apply(full)), hf
            if cuts[0] is None or (kv == 1 and (".k_proj." in hf or ".v_proj." in hf)):
                assert all(torch.equal(p, full) for p in parts), hf  # replicated (one kv head: on both)
            else:  # the halves put back together (less the vocab padding) are the full tensor
                joined = torch.cat(parts, cuts[0].dim).narrow(cuts[0].dim, 0, full.shape[cuts[0].dim])
                assert torch.equal(joined, full), hf
    last = ranks[0][-1]
    assert isinstance(last.lm_head, VocabParallelLMHead)
    assert isinstance(ranks[0][0].layers[0].self_attn.o_proj if family != "opt"
                      else ranks[0][0].layers[0].self_attn.out_proj, RowParallelLinear)


def test_checkpoint_round_trip_equals_random_init(tmp_path):
    config = tiny_config("llama_bias")
    ckpt = save_checkpoint(config, seed=3, out_dir=tmp_path / "ckpt", dtype=torch.float32,
                           shard_size_bytes=2_000_000)
    files = sorted(p.name for p in ckpt.glob("*.safetensors"))
    assert len(files) >= 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(param_table(config))
    assert load_hf_config(None, str(ckpt)).to_dict() == config.to_dict()
    for tp_size in (1, 2):
        for split in ([3], [1, 2], [2, 1]):
            for r in range(tp_size):
                a = build_all(config, split, tp_rank=r, tp_size=tp_size, seed=3)
                b = build_all(config, split, tp_rank=r, tp_size=tp_size, checkpoint=str(ckpt))
                for sa, sb in zip(a, b):
                    pa, pb = dict(sa.named_parameters()), dict(sb.named_parameters())
                    assert pa.keys() == pb.keys()
                    for k in pa:
                        assert torch.equal(pa[k], pb[k]), (tp_size, split, r, k)


def test_checkpoint_loads_like_transformers(tmp_path):
    """A checkpoint with non-trivial biases and norms, read by HF's own from_pretrained and by build_stage."""
    for family in ("qwen2", "opt"):  # tied heads: lm_head.weight is not in the checkpoint
        config = tiny_config(family)
        ckpt = write_checkpoint(perturbed_state_dict(config), config, tmp_path / family, shard_size_bytes=60_000)
        assert "lm_head.weight" not in json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
        ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
        ids = prompt(config.vocab_size)
        want = hf_greedy(ref, ids)
        got = run_stages(build_all(config, [2, 1], checkpoint=str(ckpt)), ids)
        torch.testing.assert_close(got[0], want[0], atol=ATOL, rtol=0)
        assert torch.equal(got[1], want[1])


def test_slice_reader_reads_only_slices(tmp_path, monkeypatch):
    """The first reader (kept for comparison): safetensors' get_slice per parameter. The planned reader's own
    accounting is checked in tests/executor/test_checkpoint.py."""
    config = tiny_config("llama_bias")
    ckpt = save_checkpoint(config, 0, tmp_path / "ckpt", torch.float32, shard_size_bytes=200_000)
    table = param_table(config)
    whole_reads, slice_reads, opened = [], {}, set()
    real_open = weights_mod.safe_open

    class Spy:
        def __init__(self, path, framework, device):
            assert framework == "pt" and device == "cpu"
            self.inner = real_open(path, framework=framework, device=device)
            opened.add(Path(path).name)

        def __enter__(self):
            self.h = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.h.keys()

        def get_tensor(self, name):
            whole_reads.append(name)
            return self.h.get_tensor(name)

        def get_slice(self, name):
            sl = self.h.get_slice(name)

            class Sliced:
                def __getitem__(_, idx):
                    out = sl[idx]
                    slice_reads[name] = tuple(out.shape)
                    return out

            return Sliced()

    monkeypatch.setattr(weights_mod, "safe_open", Spy)
    stage = build_stage(config, ShardSpec.for_stage([1, 2], 1, tp_rank=1, tp_size=2), dtype=torch.float32,
                        checkpoint=weights_mod.SliceReader(str(ckpt), config))
    wanted = set(stage.hf_names.values())
    assert set(whole_reads) | set(slice_reads) == wanted  # only this stage's tensors
    for name in whole_reads:  # read whole only what every rank holds whole
        assert shard_index(name, table[name].shape, tp_rank=1, tp_size=2, n_heads=4, n_kv_heads=2, head_dim=16) is None
    for name, shape in slice_reads.items():  # and a sharded tensor only as its half
        assert 2 * torch.Size(shape).numel() == torch.Size(table[name].shape).numel(), name
    assert "model.layers.0.self_attn.q_proj.weight" not in wanted and "model.embed_tokens.weight" not in wanted
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert opened == {index[n] for n in wanted}  # no other file touched


@pytest.mark.parametrize("name,tp", [("llama-3-8b", 8), ("llama-2-70b", 8), ("llama-3.1-405b", 8),
                                     ("opt-30b", 4), ("opt-175b", 8)])
def test_catalogue_shards_add_up_to_the_planner_count(name, tp):
    """Every rank of every stage built on the meta device: the sharded parameters over all ranks, plus the
    replicated ones once per stage, are the planner's parameter count of the model."""
    from hpi.planner.catalog import load_model

    config = load_hf_config(name)
    n = config.num_hidden_layers
    split = [n // 2, n - n // 2]
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    heads = dict(n_heads=config.num_attention_heads, n_kv_heads=kv,
                 head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    table = param_table(config)
    total = 0
    for i in range(2):
        for r in range(tp):
            stage = build_stage(config, ShardSpec.for_stage(split, i, r, tp), device="meta")
            assert all(p.is_meta for p in stage.parameters())
            for pname, p in stage.named_parameters():
                hf = stage.hf_names[pname]
                cut = shard_index(hf, table[hf].shape, tp_rank=r, tp_size=tp, **heads)
                if cut is None:
                    total += p.numel() if r == 0 else 0
                else:  # less the vocab padding of the LM head
                    total += p.numel() // cut.padded * (cut.stop - cut.start)
    if config.tie_word_embeddings:
        total -= config.vocab_size * config.hidden_size  # one tensor in the planner's count
    assert total == load_model(name).params_total


def test_sliding_window_cache_layers_are_refused():
    config = tiny_config("mistral")
    (stage,) = build_all(config, [3])
    cache = DynamicCache(config=stage.config)
    ids = prompt(config.vocab_size)
    stage(ids, cache, torch.arange(ids.shape[1]))
    with pytest.raises(ValueError, match="plain DynamicCache"):
        stage(ids[:, :1], cache, torch.tensor([ids.shape[1]]))


# ---- configs and refusals ---------------------------------------------------------------------------
def test_load_hf_config_sources(tmp_path):
    by_name = load_hf_config("tiny-llama")
    assert by_name.model_type == "llama" and not hasattr(by_name, "_hpi")
    import hpi.planner.catalog

    raw = json.loads((Path(hpi.planner.catalog.__file__).parent / "models" / "tiny-llama.json").read_text())
    raw.pop("_hpi")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert load_hf_config(str(tmp_path / "config.json")).to_dict() == by_name.to_dict()
    assert load_hf_config(str(tmp_path)).to_dict() == by_name.to_dict()
    with pytest.raises(FileNotFoundError, match="catalogue"):
        load_hf_config("no-such-model")


def test_shard_and_stage_config():
    config = tiny_config("mistral")
    sc = shard_config(config, 2)
    assert (sc.num_attention_heads, sc.num_key_value_heads, sc.intermediate_size, sc.head_dim) == (2, 1, 48, 24)
    assert config.num_attention_heads == 4  # the original is untouched
    q = tiny_config("qwen2")
    st = stage_config(q, ShardSpec.for_stage([1, 2], 1, 0, 2))
    assert st.num_hidden_layers == 2 and len(st.layer_types) == 2 and st.head_dim == 16
    assert st._attn_implementation == "hpi_sdpa"  # sdpa, grouped-query decode kept grouped (hpi.executor.attention)


def test_refusals():
    from transformers import GPT2Config

    supported = "llama, mistral, qwen2, mixtral, deepseek_v3, opt, bloom"
    with pytest.raises(NotImplementedError, match=f"'gpt2' is not supported .*{supported}"):
        build_stage(GPT2Config(n_layer=2), ShardSpec.whole(2))
    config = tiny_config("llama")  # 4 heads, 2 kv heads
    with pytest.raises(ValueError, match=r"num_attention_heads\(4\) % tp\(8\)"):
        shard_config(config, 8)
    c3 = tiny_config("qwen2")
    c3.num_key_value_heads = 4
    c3.num_attention_heads = 12
    with pytest.raises(ValueError, match="divide neither way"):
        shard_config(c3, 3)
    with pytest.raises(ValueError, match="is_first"):
        ShardSpec(4, 1, 4, True, True)
    with pytest.raises(ValueError, match="n_layers_total"):
        build_stage(config, ShardSpec.whole(3))


# ---- two processes, tp 2 (gloo) ---------------------------------------------------------------------
_TP_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    import torch, torch.distributed as dist
    spec = importlib.util.spec_from_file_location("tm", sys.argv[1])
    tm = importlib.util.module_from_spec(spec); spec.loader.exec_module(tm)
    out_dir, rank = sys.argv[2], int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    results = {}
    for case in json.load(open(os.path.join(out_dir, "cases.json"))):
        config = tm.load_hf_config(None, case["ckpt"]) if case["ckpt"] else tm.tiny_config(case["family"])
        stages = tm.build_all(config, case["split"], tp_rank=rank, tp_size=2, checkpoint=case["ckpt"])
        results[case["name"]] = tm.run_stages(stages, tm.prompt(config.vocab_size))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tp2_matches_tp1_and_transformers(tmp_path):
    cases, refs = [], {}
    for family in FAMILIES:
        config = tiny_config(family)
        n = config.num_hidden_layers
        ids = prompt(config.vocab_size)
        refs[family] = run_stages(build_all(config, [n]), ids)  # tp 1
        cases.append({"name": family, "family": family, "split": [n], "ckpt": None})
        cases.append({"name": f"{family}-pp", "family": family, "split": [1, n - 1], "ckpt": None})
        if family in ("llama_bias", "mistral", "opt"):  # real checkpoint, non-trivial biases and norms
            ckpt = write_checkpoint(perturbed_state_dict(config), config, tmp_path / family, shard_size_bytes=60_000)
            refs[f"{family}-ckpt"] = hf_greedy(
                AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval(),
                ids)
            cases.append({"name": f"{family}-ckpt", "family": family, "split": [2, n - 2], "ckpt": str(ckpt)})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    script = tmp_path / "tp_worker.py"
    script.write_text(_TP_SCRIPT)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), __file__, str(tmp_path)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)[-4000:]
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        for case in cases:
            ref = refs[case["name"]] if case["ckpt"] else refs[case["family"]]
            logits, tokens = got[case["name"]]
            torch.testing.assert_close(logits, ref[0], atol=ATOL, rtol=0, msg=lambda m: f"rank {r} {case['name']}: {m}")
            assert torch.equal(tokens, ref[1]), (r, case["name"])
