"""``/v1/completions`` and ``/v1/chat/completions``: requests in, OpenAI documents or SSE chunks out.

Each prompt of a request becomes one engine request (one choice). Its events arrive per step
(``hpi.executor.scheduler.Event``): new token ids with their log-probabilities, the prompt's
log-probabilities when echo asked for them, and the finish reason. Text is streamed through a
``Detokenizer`` (stop strings end it; the engine request is then cancelled so its slot frees at once).
SSE follows OpenAI: ``data: {json}\\n\\n`` per chunk, ``data: [DONE]\\n\\n`` last; an error after the stream
started goes out as ``data: {"error": ...}`` before ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from hpi.executor.scheduler import SamplingParams
from hpi.serve.engine_client import EngineClient, EngineUnavailable, Rejected
from hpi.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from hpi.serve.tokens import FALLBACK_CHAT_TEMPLATE, Detokenizer

DISCONNECT_POLL_S = 0.5


@dataclass
class Delta:
    """What one choice adds in one step: text, per-token log-probability entries, maybe its end."""

    index: int
    text: str = ""
    tokens: list[tuple[int, float | None, tuple]] = field(default_factory=list)  # (id, logprob, top)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Service:
    """The model as the routes see it."""

    engine: EngineClient
    tokenizer: Any
    model_name: str
    max_model_len: int
    eos_ids: tuple[int, ...]
    vocab_size: int
    max_queue: int = 1024

    # ---- inputs ----------------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int], param: str = "prompt", special: bool = True) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=special)["input_ids"]
            if not ids:
                raise ApiError(400, f"{param} tokenizes to no tokens", param=param)
            return list(ids)
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ApiError(400, f"{param}: token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})",
                           param=param)
        return list(prompt)

    def chat_ids(self, messages, add_generation_prompt: bool = True) -> list[int]:
        template = getattr(self.tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE
        text = self.tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages],
                                                  chat_template=template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        return self.encode(text, "messages", special=False)

    def check_capacity(self, n: int) -> None:
        """429 before anything is sent when ``n`` more requests would overflow the waiting queue."""
        waiting = len(self.engine.waiting)
        if waiting + n > self.max_queue:
            raise ApiError(429, f"{waiting} requests are waiting (--max-queue {self.max_queue}): retry later",
                           code="queue_full")

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist: this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def params(self, prompt_len: int, max_tokens: int | None, req, logprobs: int | None,
               prompt_logprobs: int | None) -> SamplingParams:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ApiError(400, f"the prompt has {prompt_len} tokens; --max-model-len is {self.max_model_len}",
                           param="prompt")
        if max_tokens is None:
            max_tokens = room
        if max_tokens > room:
            raise ApiError(400, f"prompt({prompt_len}) + max_tokens({max_tokens}) > max_model_len"
                                f"({self.max_model_len}): ask for at most {room} tokens", param="max_tokens")
        temperature = 1.0 if req.temperature is None else req.temperature
        return SamplingParams(max_tokens=max_tokens, temperature=temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed,
                              stop_token_ids=() if req.ignore_eos else self.eos_ids, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # ---- one choice --------------------------------------------------------------------------------------
    async def choice(self, index: int, prompt: list[int], params: SamplingParams, stop: list[str], echo: bool
                     ) -> AsyncIterator[Delta]:
        """The deltas of one engine request; the last carries the finish reason."""
        detok = Detokenizer(self.tokenizer, tuple(stop), tuple(prompt))
        rid = f"{uuid.uuid4().hex}-{index}"
        generated = 0
        prompt_entries: list[tuple[int, float | None, tuple]] = [(prompt[0], None, ())]
        want_prompt_lp = params.prompt_logprobs is not None
        if echo and not want_prompt_lp:
            yield Delta(index, self.tokenizer.decode(prompt, skip_special_tokens=False), prompt_tokens=len(prompt))
        async for event in self.engine.submit(rid, prompt, params):
            delta = Delta(index, prompt_tokens=len(prompt))
            if event.prompt_logprobs:
                start = len(prompt_entries)
                for j, (lp, top) in enumerate(event.prompt_logprobs):
                    prompt_entries.append((prompt[start + j], lp, top))
                if len(prompt_entries) == len(prompt):  # the prompt is scored: echo it with its entries
                    delta.text = self.tokenizer.decode(prompt, skip_special_tokens=False) if echo else ""
                    delta.tokens = list(prompt_entries) if echo else []
            for k, token in enumerate(event.token_ids):
                lp, top = event.logprobs[k] if k < len(event.logprobs) else (None, ())
                delta.tokens.append((token, lp, top))
            generated += len(event.token_ids)
            delta.text += detok.push(event.token_ids)
            delta.completion_tokens = generated
            if detok.stopped:
                delta.finish_reason = "stop"
                yield delta
                return  # leaving the iteration cancels the request: its slot frees at the next step
            if event.finish_reason is not None:
                delta.text += detok.flush()
                delta.finish_reason = "stop" if event.finish_reason == "stop" else "length"
            yield delta


def _sse(doc: dict[str, Any]) -> str:
    return f"data: {json.dumps(doc, separators=(',', ':'))}\n\n"


async def merged(choices: list[AsyncIterator[Delta]]) -> AsyncIterator[Delta]:
    """Deltas of several choices as they come; an exception of one choice ends all of them."""
    if len(choices) == 1:
        async for d in choices[0]:
            yield d
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(it: AsyncIterator[Delta]) -> None:
        try:
            async for d in it:
                await queue.put(d)
            await queue.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            await queue.put(e)

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        open_ = len(tasks)
        while open_:
            item = await queue.get()
            if item is None:
                open_ -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


def engine_error(e: Exception) -> ApiError:
    if isinstance(e, EngineUnavailable):
        return ApiError(e.status, str(e))
    if isinstance(e, Rejected):
        return ApiError(429 if e.reason == "queue_full" else 400, str(e))
    return ApiError(500, f"{type(e).__name__}: {e}")


async def until_disconnect(request, work: "asyncio.Task"):
    """Await ``work``; cancel it if the client goes away first (its engine requests are cancelled with it)."""
    while True:
        done, _ = await asyncio.wait({work}, timeout=DISCONNECT_POLL_S)
        if done:
            return work.result()
        if await request.is_disconnected():
            work.cancel()
            raise asyncio.CancelledError


def stream_chunks(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """SSE lines of ``chunks``, an error chunk if one fails after the stream started, then [DONE]."""

    async def lines() -> AsyncIterator[str]:
        try:
            async for doc in chunks:
                yield _sse(doc)
        except (EngineUnavailable, Rejected, ApiError) as e:
            yield _sse((e if isinstance(e, ApiError) else engine_error(e)).body())
        yield "data: [DONE]\n\n"

    return lines()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


__all__ = ["ChatCompletionRequest", "CompletionRequest", "Delta", "Service", "engine_error", "merged",
           "new_id", "now", "stream_chunks", "until_disconnect", "usage"]
