"""``hpi serve``'s OpenAI API through the official ``openai`` client and plain HTTP: streaming chat and
completions, the checkpoint's chat template, tokenization routes, the API key, stop strings, token-id and
batched prompts, seeded sampling, and 400/401/404 answers that name what is wrong. One real server (CPU)."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")
KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(sv, serve_checkpoint, tmp_path_factory):
    s = sv.start_server(tmp_path_factory.mktemp("api"), "--checkpoint", str(serve_checkpoint), "--max-batch", "4",
                        "--max-model-len", "64", "--served-model-name", "tiny", api_key=KEY)
    yield s
    assert s.stop() == 0, s.log
    assert not s.workers()


def test_the_openai_client_streams_chat_and_completions(server, sv, reference):
    _, tokenizer = reference
    client = server.openai()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w100 w101"}],
                                                 max_tokens=5, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "length" and len(text.split()) == 5
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": "w100 w101"}], tokenize=False,
                                               add_generation_prompt=True)
    ids = tokenizer(prompt_ids, add_special_tokens=False)["input_ids"]
    assert ids[0] == 7 and ids[-1] == 9  # the checkpoint's template: w7 {content} w8 w9
    assert sv.ids_of(text.split()) == sv.greedy(reference, ids, 5)
    whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w100 w101"}],
                                           max_tokens=5, temperature=0)
    assert whole.choices[0].message.content == text and whole.usage.completion_tokens == 5
    assert whole.usage.prompt_tokens == len(ids)
    stream = list(client.completions.create(model="tiny", prompt="w5 w6", max_tokens=3, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == 3 and stream[-1].usage.prompt_tokens == 2


def test_tokenize_detokenize_and_tokenizer_info(server):
    r = server.post("/tokenize", {"prompt": "w5 w6 w7"}).json()
    assert r["tokens"] == [5, 6, 7] and r["count"] == 3 and r["max_model_len"] == 64
    assert server.post("/tokenize", {"messages": [{"role": "user", "content": "w1"}]}).json()["tokens"] == [7, 1, 8, 9]
    assert server.post("/detokenize", {"tokens": [5, 6]}).json() == {"prompt": "w5 w6"}
    info = server.get("/tokenizer_info").json()
    assert info["vocab_size"] == 32000 and info["eos_token_ids"] == [2] and "w7" in info["chat_template"]


def test_health_is_open_and_every_other_route_needs_the_key(server):
    assert server.get("/health", headers={}).status_code == 200
    for path in ("/ready", "/v1/models", "/version"):
        r = server.get(path, headers={})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        assert server.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = server.post("/v1/completions", {"model": "tiny", "prompt": "w1"}, headers={})
    assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "w1", "best_answer": True}, 400, "best_answer"),
    ({"prompt": "w1", "n": 2}, 400, "n"),
    ({"prompt": "w1", "logit_bias": {"5": 1.0}}, 400, "logit_bias"),
    ({"prompt": "w1", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"prompt": "w1", "max_tokens": 64}, 400, "max_tokens"),
    ({"prompt": " ".join(["w1"] * 70)}, 400, "prompt"),
    ({"prompt": [5, 99999]}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": "w1", "temperature": -1}, 400, "temperature"),
    ({"prompt": "w1", "stream_options": {"include_usage": True}}, 400, None),
    ({"prompt": "w1", "model": "gpt-4"}, 404, "model"),
])
def test_bad_requests_are_answered_in_openais_shape_naming_the_field(server, body, status, param):
    r = server.post("/v1/completions", {"model": "tiny", **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["param"] == param


def test_stop_strings_end_the_text_and_free_the_request(server, sv, reference):
    _, tokenizer = reference
    expected = sv.greedy(reference, [21, 22, 23], 8)
    stop = f"w{expected[2]}"
    r = server.post("/v1/completions", {"model": "tiny", "prompt": "w21 w22 w23", "max_tokens": 8, "temperature": 0,
                                        "stop": [stop]}).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop" and stop not in choice["text"]
    assert choice["text"] == " " + " ".join(f"w{t}" for t in expected[:2]) + " "


def test_token_id_and_batched_prompts_give_one_choice_each(server, sv, reference):
    r = server.post("/v1/completions", {"model": "tiny", "prompt": [[31, 32], [41]], "max_tokens": 3,
                                        "temperature": 0}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert sv.ids_of(r["choices"][0]["text"].split()) == sv.greedy(reference, [31, 32], 3)
    assert sv.ids_of(r["choices"][1]["text"].split()) == sv.greedy(reference, [41], 3)
    r = server.post("/v1/completions", {"model": "tiny", "prompt": ["w31 w32", "w41"], "max_tokens": 3,
                                        "temperature": 0, "echo": True}).json()
    assert r["choices"][1]["text"].startswith("w41 ") and r["usage"]["prompt_tokens"] == 3
    empty = server.post("/v1/completions", {"model": "tiny", "prompt": "w1 w2", "max_tokens": 0}).json()
    assert empty["choices"][0]["text"] == "" and empty["usage"]["completion_tokens"] == 0


def test_return_tokens_as_token_ids_names_every_token_by_its_id(server, sv, reference):
    """vLLM's extension, which the hpi lm-eval model reads: the echoed prompt, the generated tokens and the top
    entries as "token_id:{id}", the log-probabilities unchanged."""
    body = {"model": "tiny", "prompt": [[31, 32]], "max_tokens": 3, "temperature": 0, "logprobs": 1, "echo": True}
    named = server.post("/v1/completions", {**body, "return_tokens_as_token_ids": True}).json()["choices"][0]
    plain = server.post("/v1/completions", body).json()["choices"][0]
    ids = [31, 32, *sv.greedy(reference, [31, 32], 3)]
    assert named["logprobs"]["tokens"] == [f"token_id:{i}" for i in ids]
    assert named["logprobs"]["token_logprobs"] == plain["logprobs"]["token_logprobs"]
    assert [list(top) for top in named["logprobs"]["top_logprobs"][1:]] == [
        [f"token_id:{sv.ids_of(list(top))[0]}"] for top in plain["logprobs"]["top_logprobs"][1:]]
    assert named["text"] == plain["text"]
    bad = server.post("/v1/completions", {**body, "return_tokens_as_token_ids": "sometimes"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "return_tokens_as_token_ids"


def test_seeded_sampling_repeats_and_differs_by_seed(server):
    def sample(seed: int) -> str:
        return server.post("/v1/completions", {"model": "tiny", "prompt": "w1 w2", "max_tokens": 12, "temperature": 1.0,
                                               "seed": seed}).json()["choices"][0]["text"]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_hpi_chat_streams_an_answer_through_the_same_api(server, sv, reference):
    import subprocess
    import sys

    _, tokenizer = reference
    proc = subprocess.run([sys.executable, "-m", "hpi.cli", "chat", "--url", server.url + "/v1", "--api-key", KEY,
                           "--prompt", "w100 w101", "--max-tokens", "4"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ids = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": "w100 w101"}], tokenize=False,
                                                  add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert sv.ids_of(proc.stdout.split()) == sv.greedy(reference, ids, 4)
    nobody = subprocess.run([sys.executable, "-m", "hpi.cli", "chat", "--url", "http://127.0.0.1:9/v1", "--prompt",
                             "w1"], capture_output=True, text=True, timeout=60)
    assert nobody.returncode == 2 and "no server answers" in nobody.stderr
    assert len(nobody.stderr.strip().splitlines()) == 1
