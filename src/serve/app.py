"""The HTTP front of ``hpi serve``: FastAPI routes over a ``Service`` (the model, its tokenizer, the engine).

Routes (OpenAI's and vLLM's names): ``GET /health`` (alive; 500 once the runtime died), ``GET /ready`` (200
only after warm-up), ``GET /v1/models``, ``GET /version``, ``POST /v1/completions``,
``POST /v1/chat/completions``, ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``; and the metrics:
``GET /metrics`` (Prometheus text, ``hpi.serve.metrics``; on a second listener instead with ``--metrics-port``)
and ``GET /v1/events`` (one SSE event per step, ``hpi.serve.events``); both 404 with ``--no-metrics``.

With an API key every route but ``/health`` and ``/metrics`` needs ``Authorization: Bearer KEY`` (401 otherwise). A body
larger than ``max_body_bytes`` is refused (413) before it is read; prompts and ``max_tokens`` are bounded by
``--max-model-len`` (400). Errors are OpenAI's error document with the matching status.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.responses import JSONResponse, Response, StreamingResponse

from hpi.serve.completions import Service, engine_error
from hpi.serve.engine_client import DEAD, READY, EngineUnavailable, Rejected
from hpi.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    validation_error,
)
from hpi.serve.routes import SSE_HEADERS, chat, complete

OPEN_ROUTES = frozenset({"/health", "/metrics"})


def create_app(service: Service, *, api_key: str | None = None, max_body_bytes: int = 8 * 2**20,
               created: int = 0, metrics_here: bool = True) -> FastAPI:
    """``metrics_here``: serve ``/metrics`` on this app (False: ``--metrics-port`` serves it elsewhere)."""
    from hpi import __version__

    app = FastAPI(title="hpi serve", version=__version__, docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key is not None and request.url.path not in OPEN_ROUTES:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY",
                                       code="invalid_api_key"))
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            return _error(ApiError(413, f"request body of {int(length):,} bytes > {max_body_bytes:,}"))
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, e: RequestValidationError):
        return _error(validation_error(e))

    @app.exception_handler(EngineUnavailable)
    @app.exception_handler(Rejected)
    async def unavailable(_: Request, e: Exception):
        return _error(engine_error(e))

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception):  # a defect of ours: one line for the client, the log has it
        return _error(ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    @app.get("/health")
    async def health():
        engine = service.engine
        if engine.state == DEAD:
            return _error(ApiError(500, engine.message))
        c = engine.counters
        return {"status": engine.state, "steps": c.steps, "step_seconds_total": c.step_seconds,
                "step_tokens_total": c.step_tokens, "requests_waiting": len(engine.waiting),
                "requests_running": len(engine.queues) - len(engine.waiting),
                "finished": dict(engine.counters.finished)}

    @app.get("/ready")
    async def ready():
        engine = service.engine
        if engine.state != READY:
            return _error(ApiError(500 if engine.state == DEAD else 503, engine.message))
        return {"ready": True, **engine.info}

    @app.get("/metrics")
    async def metrics():
        m = service.engine.metrics
        if m is None or not metrics_here:
            raise ApiError(404, "no /metrics here: the server runs with --no-metrics, or serves them on "
                                "--metrics-port")
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/events")
    async def events():
        hub = service.engine.events
        if hub is None:
            raise ApiError(404, "no /v1/events: the server runs with --no-metrics")
        return StreamingResponse(hub.stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/v1/models")
    async def models():
        service.engine.check_available()
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": created,
                                            "owned_by": "hpi", "max_model_len": service.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        service.engine.check_available()
        return await complete(service, req, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        service.engine.check_available()
        return await chat(service, req, request)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        service.check_model(req.model)
        if req.messages is not None:
            ids = service.chat_ids(req.messages, req.add_generation_prompt)
        else:
            ids = service.encode(req.prompt, special=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": service.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        service.check_model(req.model)
        service.encode(req.tokens, "tokens")  # range check
        return {"prompt": service.tokenizer.decode(req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = service.tokenizer
        return {"tokenizer_class": type(tok).__name__, "model_max_length": service.max_model_len,
                "vocab_size": service.vocab_size, "eos_token": getattr(tok, "eos_token", None),
                "bos_token": getattr(tok, "bos_token", None), "pad_token": getattr(tok, "pad_token", None),
                "eos_token_ids": list(service.eos_ids), "chat_template": getattr(tok, "chat_template", None)}

    return app


def _error(e: ApiError) -> JSONResponse:
    headers: dict[str, Any] = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
    return JSONResponse(e.body(), status_code=e.status, headers=headers)
