"""Greedy answers through ``hpi serve`` equal transformers' ``generate`` on the same checkpoint, in every
layout (plain, ZeRO-3 CPU offload, TP 2, PP 2 with two slot groups in the pipeline, TP 2 x PP 2 x ZeRO-3, and
the all-slots decode that CUDA graphs replay, run eagerly here),
streamed and not; a request's tokens do not depend on which requests share its steps; echo + logprobs
prompt log-probabilities equal transformers' log-softmax within 1e-4. CPU, fp32, real DeepSpeed and gloo."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

LAYOUTS = {
    "plain": (),
    "zero3-cpu-offload": ("--offload", "cpu"),
    "tp2": ("--tp", "2"),
    "pp2": ("--pp", "2"),
    "tp2-pp2-zero3": ("--tp", "2", "--pp", "2", "--offload", "cpu"),
    # the decode a CUDA graph replays (all slots, a key span of 128 of 300 positions), run eagerly on the CPU
    "dense-decode": ("--cuda-graphs", "--max-model-len", "300"),
}
PROMPTS = ["w11 w12 w13", "w21 w22 w23 w24 w25 w26 w27", "w31", "w41 w42 w43 w44 w45",
           "w51 w52", "w61 w62 w63 w64 w65 w66 w67 w68 w69 w70 w71", "w81 w82 w83 w84", "w91 w92 w93 w94 w95 w96"]
NEW = 6


@pytest.fixture(scope="module", params=list(LAYOUTS), ids=list(LAYOUTS))
def server(request, sv, serve_checkpoint, tmp_path_factory):
    s = sv.start_server(tmp_path_factory.mktemp(request.param), "--checkpoint", str(serve_checkpoint),
                        "--max-batch", "8", "--max-model-len", "64", *LAYOUTS[request.param])
    yield s
    assert s.stop() == 0, s.log
    assert not s.workers(), "a rank outlived the server"


def complete(server, prompt: str, **kw) -> dict:
    body = {"model": server.model, "prompt": prompt, "max_tokens": NEW, "temperature": 0, "logprobs": 0, **kw}
    r = server.post("/v1/completions", body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.fixture(scope="module")
def expected(sv, reference):
    _, tokenizer = reference
    out = {}
    for p in PROMPTS:
        ids = tokenizer(p)["input_ids"]
        out[p] = sv.greedy(reference, ids, NEW)
    return out


def test_greedy_tokens_equal_transformers_generate_streamed_and_not(server, sv, expected, reference):
    _, tokenizer = reference
    client = server.openai()
    for p in PROMPTS[:4]:
        choice = complete(server, p)
        assert sv.ids_of(choice["logprobs"]["tokens"]) == expected[p], p
        prompt_ids = tokenizer(p)["input_ids"]
        whole = tokenizer.decode(prompt_ids + expected[p])
        assert choice["text"] == whole[len(tokenizer.decode(prompt_ids)):]  # what follows the prompt
        streamed = client.completions.create(model=server.model, prompt=p, max_tokens=NEW, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == choice["text"]


def test_a_requests_tokens_do_not_depend_on_its_batch_mates(server, sv, expected):
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # 8 prompts at once: they share steps and slots
        together = list(pool.map(lambda p: sv.ids_of(complete(server, p)["logprobs"]["tokens"]), PROMPTS))
    for p, tokens in zip(PROMPTS, together):
        assert tokens == expected[p], p


def test_echo_logprobs_equal_transformers_log_softmax(server, sv, reference):
    _, tokenizer = reference
    for p in (PROMPTS[1], PROMPTS[5]):
        ids = tokenizer(p)["input_ids"]
        choice = complete(server, p, max_tokens=0, echo=True, logprobs=1)
        lp = choice["logprobs"]
        assert sv.ids_of(lp["tokens"]) == ids and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:] == pytest.approx(sv.prompt_logprobs(reference, ids), abs=1e-4)
        assert choice["text"] == p and choice["finish_reason"] == "length"
