"""The generation routes' bodies: completions and chat, streamed or whole (``hpi.serve.app`` mounts them)."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from starlette.responses import JSONResponse, StreamingResponse

from hpi.serve.completions import (
    Delta,
    Service,
    engine_error,
    merged,
    new_id,
    now,
    stream_chunks,
    until_disconnect,
    usage,
)
from hpi.serve.engine_client import EngineUnavailable, Rejected
from hpi.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ---- log-probabilities in OpenAI's two shapes ----------------------------------------------------------------
def completion_logprobs(service: Service, entries: list[tuple[int, float | None, tuple]], as_ids: bool = False
                        ) -> dict[str, Any]:
    """Legacy completions: parallel lists; the echoed prompt's first token has null log-probabilities. ``as_ids``:
    tokens named "token_id:{id}" (vLLM's ``return_tokens_as_token_ids``)."""
    name = (lambda t: f"token_id:{t}") if as_ids else service.token_text
    tokens = [name(t) for t, _, _ in entries]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    tops = [None if lp is None else {name(i): v for i, v in top} for _, lp, top in entries]
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries], "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(service: Service, entries: list[tuple[int, float | None, tuple]]) -> dict[str, Any]:
    def item(token_id: int, lp: float) -> dict[str, Any]:
        text = service.token_text(token_id)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top]} for t, lp, top in entries]}


# ---- completions ---------------------------------------------------------------------------------------------
def completion_choices(service: Service, req: CompletionRequest):
    """(choice iterators, prompt lengths), every input checked before any is submitted."""
    prompts = [service.encode(p) for p in req.prompts()]
    logprobs = req.logprobs
    runs = []
    for i, ids in enumerate(prompts):
        params = service.params(len(ids), req.max_tokens, req, logprobs,
                                logprobs if (req.echo and logprobs is not None) else None)
        runs.append((i, ids, params))
    return [service.choice(i, ids, p, req.stop, req.echo) for i, ids, p in runs], [len(ids) for ids in prompts]


async def complete(service: Service, req: CompletionRequest, request):
    service.check_model(req.model)
    choices, prompt_lens = completion_choices(service, req)
    service.check_capacity(len(choices))
    rid, created = new_id("cmpl"), now()
    base = {"id": rid, "object": "text_completion", "created": created, "model": service.model_name}
    if req.stream:
        return StreamingResponse(stream_chunks(_completion_chunks(service, req, choices, prompt_lens, base)),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    deltas = await _collect(request, choices)
    out, completion_tokens = [], 0
    for i in range(len(choices)):
        mine = [d for d in deltas if d.index == i]
        entries = [e for d in mine for e in d.tokens]
        completion_tokens += mine[-1].completion_tokens if mine else 0
        logprobs = (completion_logprobs(service, entries, req.return_tokens_as_token_ids)
                    if req.logprobs is not None else None)
        out.append({"index": i, "text": "".join(d.text for d in mine), "logprobs": logprobs,
                    "finish_reason": next((d.finish_reason for d in mine if d.finish_reason), None)})
    return JSONResponse({**base, "choices": out, "usage": usage(sum(prompt_lens), completion_tokens)})


async def _completion_chunks(service: Service, req: CompletionRequest, choices, prompt_lens, base
                             ) -> AsyncIterator[dict[str, Any]]:
    done = [0] * len(choices)
    async for d in merged(choices):
        done[d.index] = d.completion_tokens
        if not (d.text or d.finish_reason or (req.logprobs is not None and d.tokens)):
            continue  # text held back (a stop string may be forming), nothing else to say yet
        logprobs = (completion_logprobs(service, d.tokens, req.return_tokens_as_token_ids)
                    if req.logprobs is not None else None)
        yield {**base, "choices": [{"index": d.index, "text": d.text, "logprobs": logprobs,
                                    "finish_reason": d.finish_reason}]}
    if req.include_usage:
        yield {**base, "choices": [], "usage": usage(sum(prompt_lens), sum(done))}


async def _collect(request, choices) -> list[Delta]:
    async def gather() -> list[Delta]:
        return [d async for d in merged(choices)]

    try:
        return await until_disconnect(request, asyncio.create_task(gather()))
    except (EngineUnavailable, Rejected) as e:
        raise engine_error(e) from None


# ---- chat ------------------------------------------------------------------------------------------------------
async def chat(service: Service, req: ChatCompletionRequest, request):
    service.check_model(req.model)
    ids = service.chat_ids(req.messages)
    k = (req.top_logprobs or 0) if req.logprobs else None
    params = service.params(len(ids), req.token_limit, req, k, None)
    choice = service.choice(0, ids, params, req.stop, echo=False)
    service.check_capacity(1)
    rid, created = new_id("chatcmpl"), now()
    if req.stream:
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": service.model_name}
        return StreamingResponse(stream_chunks(_chat_chunks(service, req, choice, len(ids), base)),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    deltas = await _collect(request, [choice])
    entries = [e for d in deltas for e in d.tokens]
    message = {"role": "assistant", "content": "".join(d.text for d in deltas)}
    body = {"id": rid, "object": "chat.completion", "created": created, "model": service.model_name,
            "choices": [{"index": 0, "message": message,
                         "logprobs": chat_logprobs(service, entries) if req.logprobs else None,
                         "finish_reason": next((d.finish_reason for d in deltas if d.finish_reason), None)}],
            "usage": usage(len(ids), deltas[-1].completion_tokens if deltas else 0)}
    return JSONResponse(body)


async def _chat_chunks(service: Service, req: ChatCompletionRequest, choice, prompt_len: int, base
                       ) -> AsyncIterator[dict[str, Any]]:
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}]}
    generated = 0
    async for d in choice:
        generated = d.completion_tokens
        if not (d.text or d.finish_reason or (req.logprobs and d.tokens)):
            continue
        yield {**base, "choices": [{"index": 0, "delta": {"content": d.text} if d.text else {},
                                    "logprobs": chat_logprobs(service, d.tokens) if req.logprobs else None,
                                    "finish_reason": d.finish_reason}]}
    if req.include_usage:
        yield {**base, "choices": [], "usage": usage(prompt_len, generated)}


__all__ = ["ApiError", "chat", "complete"]
