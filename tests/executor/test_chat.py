"""Text prompts and chat mode through a real local checkpoint with its own tokenizer (no hub).

A word-level tokenizer covering the tiny model's whole vocabulary ("w0" .. "w{V-1}") is saved beside a
sharded safetensors checkpoint; ``hpi run``'s path (launch -> worker) must tokenize the prompt, generate
the tokens transformers generates from the same checkpoint, decode them, and in chat mode stop at EOS
and stream the text on rank 0.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("deepspeed")

from hpi.executor.launch import launch  # noqa: E402
from hpi.executor.spec import RunSpec  # noqa: E402
from hpi.planner.specs.plan import Plan  # noqa: E402
from hpi.planner.specs.workload import Workload  # noqa: E402

PROMPT = "w11 w220 w3301 w45"
GEN = 6


@pytest.fixture(scope="module")
def checkpoint(word_checkpoint):
    return word_checkpoint  # conftest.py: tiny-llama seed 0 with a word-level tokenizer ("w{i}" is token i)


def reference(ckpt) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = transformers.AutoTokenizer.from_pretrained(ckpt)(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GEN, min_new_tokens=GEN,
                             do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def spec(ckpt, out, plan: Plan, mode: str) -> RunSpec:
    return RunSpec(plan=plan, model="tiny-llama", checkpoint=str(ckpt), prompts=(PROMPT,), mode=mode,
                   workload=Workload(prompt_len_tokens=4, gen_len_tokens=GEN), device="cpu", dtype="fp32",
                   out_dir=str(out))


def test_text_prompt_generates_transformers_tokens_and_text(checkpoint, tmp_path):
    want = reference(checkpoint)
    record = launch(spec(checkpoint, tmp_path, Plan(tp=2), "benchmark"), timeout_s=300).to_json()
    assert record["tokens"] == [want]
    assert record["prompt_len_tokens_actual"] == 4
    assert record["texts"] == [" ".join(f"w{t}" for t in want)]


def test_chat_stops_at_eos_and_streams_the_text(checkpoint, tmp_path):
    want = reference(checkpoint)
    eos = want[3]  # make the 4th generated token the end of the answer
    config_path = checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    config["eos_token_id"] = eos
    chat_ckpt = tmp_path / "ckpt"
    chat_ckpt.mkdir()
    for f in checkpoint.iterdir():
        (chat_ckpt / f.name).write_bytes(f.read_bytes())
    (chat_ckpt / "config.json").write_text(json.dumps(config))
    lines: list[str] = []
    record = launch(spec(chat_ckpt, tmp_path / "run", Plan(), "chat"), timeout_s=300, stream=lines.append).to_json()
    answer = " ".join(f"w{t}" for t in want[:3])
    assert record["generated_tokens_per_sequence"] == 4  # stopped at EOS, not at gen_len 6
    assert record["texts"] == [answer]
    assert answer in lines
