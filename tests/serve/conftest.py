"""A real ``hpi serve`` process for the serving tests: started through the CLI on the CPU (DeepSpeed's CPU
accelerator, gloo), waited for until ``/ready``, stopped with SIGTERM, and checked to leave no process behind.
The reference is transformers' own model loaded from the same local checkpoint."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx2")  # what the openai client uses

READY_TIMEOUT_S = 300.0  # 4 CPU ranks under DeepSpeed on a 2-core machine take a while
CHAT_TEMPLATE = ("{% for m in messages %}w7 {{ m['content'] }} w8 {% endfor %}"
                 "{% if add_generation_prompt %}w9{% endif %}")


@dataclass
class Server:
    proc: subprocess.Popen
    out_dir: Path
    api_key: str | None = None
    lines: list[str] = field(default_factory=list)
    url: str = ""
    model: str = ""  # the served model name (from /v1/models once ready)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def post(self, path: str, body: dict, *, headers: dict | None = None, timeout: float = 120.0) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.headers if headers is None else headers,
                          timeout=timeout)

    def get(self, path: str, *, headers: dict | None = None) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers if headers is None else headers, timeout=30.0)

    def openai(self):
        openai = pytest.importorskip("openai")
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, timeout=120.0)

    def workers(self) -> list[int]:
        """Processes started for this server (torchrun and its ranks name the run folder's spec)."""
        found = subprocess.run(["pgrep", "-f", str(self.out_dir / "spec.json")], capture_output=True, text=True)
        return [int(p) for p in found.stdout.split()]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise
        deadline = time.monotonic() + 15
        while self.workers() and time.monotonic() < deadline:
            time.sleep(0.2)
        return code

    @property
    def log(self) -> str:
        return "\n".join(self.lines)


def start_server(tmp_path: Path, *args: str, api_key: str | None = None, wait_ready: bool = True) -> Server:
    out_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "hpi.cli", "serve", "--device", "cpu", "--dtype", "fp32", "--port", "0",
           "--out", str(out_dir), *args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    env.pop("HPI_API_KEY", None)
    if api_key:
        env["HPI_API_KEY"] = api_key
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    server = Server(proc, out_dir, api_key)

    def pump() -> None:
        for line in proc.stderr:
            server.lines.append(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if not server.url:
            m = next((re.search(r" at (http://\S+);", line) for line in server.lines if " at http://" in line), None)
            server.url = m.group(1) if m else ""
        if proc.poll() is not None:
            time.sleep(0.5)
            raise RuntimeError(f"hpi serve exited {proc.returncode} before it was ready:\n{server.log}")
        if server.url and not wait_ready:
            return server
        if server.url:
            try:
                if httpx.get(server.url + "/ready", headers=server.headers, timeout=5).status_code == 200:
                    server.model = server.get("/v1/models").json()["data"][0]["id"]
                    return server
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"hpi serve was not ready after {READY_TIMEOUT_S:g} s:\n{server.log}")


@pytest.fixture(scope="session")
def serve_checkpoint(word_checkpoint):
    """The tiny-llama word-level checkpoint with a chat template its vocabulary can spell."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(word_checkpoint)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(word_checkpoint)
    return word_checkpoint


@pytest.fixture(scope="session")
def reference(serve_checkpoint):
    """transformers' own model and tokenizer on the checkpoint, fp32."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(serve_checkpoint, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(serve_checkpoint)
    return model, tokenizer


def greedy(reference, prompt_ids: list[int], n: int) -> list[int]:
    """transformers' greedy ``generate``: the new tokens up to (not including) EOS."""
    import torch

    model, _ = reference
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    new = out[0, len(prompt_ids):].tolist()
    eos = model.config.eos_token_id
    return new[: new.index(eos)] if eos in new else new


def prompt_logprobs(reference, prompt_ids: list[int]) -> list[float]:
    """log p(token j | tokens < j) for j >= 1 under transformers' model (log-softmax of its logits)."""
    import torch

    model, _ = reference
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return [float(lp[j - 1, prompt_ids[j]]) for j in range(1, len(prompt_ids))]


def ids_of(tokens: list[str]) -> list[int]:
    """The word tokenizer's token strings ("w123") back to ids."""
    return [int(t[1:]) for t in tokens]


@pytest.fixture(scope="session")
def sv():
    """This module's helpers, for the tests (conftest modules are not importable)."""
    from types import SimpleNamespace

    return SimpleNamespace(start_server=start_server, greedy=greedy, prompt_logprobs=prompt_logprobs, ids_of=ids_of,
                           Server=Server)
