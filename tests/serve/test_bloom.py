"""BLOOM through ``hpi serve`` at TP 2 and at PP 2 under ZeRO-3 CPU offload: the slot cache's ALiBi attention
(``hpi.executor.bloom``), each TP rank with its own heads' slopes, answers greedy requests, batched together, with
transformers' ``generate`` tokens on the same checkpoint. CPU, fp32, real DeepSpeed and gloo (the harness of
tests/serve/conftest.py)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIG = {
    "architectures": ["BloomForCausalLM"], "model_type": "bloom", "hidden_size": 64, "n_layer": 2, "n_head": 8,
    "vocab_size": 512, "layer_norm_epsilon": 1e-5, "initializer_range": 0.4, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}
PROMPTS = ["w11 w12 w13 w14 w15 w16 w17 w18 w19 w20 w21 w22 w23", "w31", "w41 w42 w43 w44 w45",
           "w61 w62 w63 w64 w65 w66 w67 w68 w69 w70 w71"]
NEW = 6
LAYOUTS = {"tp2": ("--tp", "2"), "pp2-zero3-cpu-offload": ("--pp", "2", "--offload", "cpu")}


@pytest.fixture(scope="module")
def bloom_checkpoint(tmp_path_factory):
    from hpi.executor.modeling import load_hf_config
    from hpi.executor.weights import save_checkpoint
    from hpi.serve.tokens import word_tokenizer

    folder = tmp_path_factory.mktemp("bloom-serve")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    config = load_hf_config(str(folder / "config.json"))
    ckpt = save_checkpoint(config, seed=0, out_dir=folder / "ckpt", dtype=torch.float32)
    word_tokenizer(config.vocab_size).save_pretrained(ckpt)
    return ckpt


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bloom_serves_what_generate_generates(layout, sv, bloom_checkpoint, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(bloom_checkpoint, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(bloom_checkpoint)
    expected = {p: sv.greedy((model, tokenizer), tokenizer(p)["input_ids"], NEW) for p in PROMPTS}
    assert len({tuple(t) for t in expected.values()}) == len(PROMPTS)

    server = sv.start_server(tmp_path, "--checkpoint", str(bloom_checkpoint), *LAYOUTS[layout], "--max-batch", "4",
                             "--max-model-len", "64")
    try:
        def ask(prompt: str) -> list[int]:
            body = {"model": server.model, "prompt": prompt, "max_tokens": NEW, "temperature": 0, "logprobs": 0}
            r = server.post("/v1/completions", body)
            assert r.status_code == 200, r.text
            return sv.ids_of(r.json()["choices"][0]["logprobs"]["tokens"])

        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # the requests share steps: chunks and decodes mixed
            got = dict(zip(PROMPTS, pool.map(ask, PROMPTS)))
        assert got == expected
    finally:
        assert server.stop() == 0, server.log
    assert not server.workers(), "a rank outlived the server"
