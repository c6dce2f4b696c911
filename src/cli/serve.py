"""``hpi serve`` (keep a plan's model loaded and answer OpenAI-compatible requests) and ``hpi chat`` (talk to
it from the terminal, through the same API every other client uses).

Parse, resolve (the deployment path ``hpi run`` takes: ``hpi.deployment.resolve_deployment``), serve. The
serving stack (FastAPI, uvicorn, the openai client) is imported when the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from hpi.cli.args import (
    GIVEN_PLAN_FLAGS,
    PlanFlag,
    UsageError,
    add_plan_flags,
    add_preset_flag,
    add_run_conditions,
    any_port,
    count,
    non_negative,
    pin_memory_given,
    plan_from_args,
    port,
    positive,
    preset_plan,
    seconds,
    workload_from_args,
)
from hpi.cli.errors import missing_dependency

API_KEY_ENV = "HPI_API_KEY"
SERVE_MODULES = ("fastapi", "uvicorn")  # the serve extra's server side (hpi chat needs openai)


def register(sub) -> dict:
    p = sub.add_parser("serve", help="keep a plan's model loaded and answer OpenAI-compatible requests",
                       description="Start the plan's ranks once (DeepSpeed ZeRO-3 x TP x PP, as hpi run), keep the "
                                   "model loaded and serve /v1/completions and /v1/chat/completions with continuous "
                                   "batching. Binds 127.0.0.1 unless --host says otherwise.")
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="local HF checkpoint (safetensors + tokenizer); "
                   "default: random weights with a word-level tokenizer (w0 w1 ...)")
    add_deployment_flags(p, max_batch_default="the plan's batch, --plan's or 8")
    p.add_argument("--prompt-len", type=positive, default=512,
                   help="prompt tokens the plan is priced for (default 512)")
    p.add_argument("--gen-len", type=positive, default=32, help="generated tokens the plan is priced for (default 32)")
    p.add_argument("--batch", type=positive, default=None, help=argparse.SUPPRESS)  # the plan's batch: --max-batch
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=any_port, default=8000, help="port (default 8000; 0: any free one)")
    p.add_argument("--api-key", default=None, help=f"require Authorization: Bearer KEY (default: ${API_KEY_ENV})")
    p.add_argument("--metrics-port", type=port, default=None, metavar="P",
                   help="serve GET /metrics on this port (at --host) instead of the API's port")
    p.add_argument("--no-metrics", dest="metrics", action="store_false",
                   help="count nothing: no /metrics, no /v1/events, no per-rank timing (to measure their cost)")
    p.add_argument("--max-model-len", type=positive, default=None,
                   help="prompt + generated tokens per request at most (default: --prompt-len + --gen-len)")
    p.add_argument("--max-queue", type=positive, default=1024, help="waiting requests before 429 (default 1024)")
    p.add_argument("--step-tokens", type=positive, default=None,
                   help="tokens one step may carry (default 8192, or --max-model-len when larger)")
    p.add_argument("--policy", choices=("fused", "separate"), default="fused",
                   help="fused: prompt chunks ride with the decode tokens (default); separate: prefill steps apart")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template replacing the tokenizer's")
    p.add_argument("--drain-timeout", type=non_negative, default=30.0, metavar="S",
                   help="on SIGINT/SIGTERM, let running requests finish for up to S seconds (default 30)")
    p.add_argument("--hang-timeout", type=seconds, default=600.0, metavar="S",
                   help="a step stuck this long stops the server with the rank's name (default 600)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="run folder: spec, logs (default: a new runs/<UTC time>-<plan>/, runs/latest points at it)")
    p.add_argument("--seed", type=count, default=0, help="seed of the random weights (no --checkpoint)")
    p.add_argument("--url-file", default=None, metavar="FILE",
                   help="once listening, write {url, pid, run_dir} here as JSON (with --port 0: the port it took)")

    p = sub.add_parser("chat", help="chat with a running hpi serve from the terminal (streams the answer)")
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's /v1 URL")
    p.add_argument("--api-key", default=None, help=f"the server's key (default: ${API_KEY_ENV})")
    p.add_argument("--model", default=None, help="model name (default: the one the server serves)")
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--prompt", default=None, help="send one message, print the answer and exit (no prompt loop)")
    p.add_argument("--max-tokens", type=positive, default=None)
    p.add_argument("--temperature", type=non_negative, default=0.0, help="0: greedy (default)")
    return {"serve": cmd_serve, "chat": cmd_chat}


def add_deployment_flags(p: argparse.ArgumentParser, *, max_batch_default: str) -> tuple[argparse.Action, ...]:
    """What ``hpi serve`` deploys and how: the model, the machine, the plan (its flags, --plan or --preset), the
    compute conditions, the device and the KV slots. ``hpi eval`` takes the same flags and starts ``hpi serve``
    with them (``deployment_argv``); the actions added are returned for that."""
    first = len(p._actions)  # argparse keeps every action in the order added: the slice is what this adds
    p.add_argument("--model", default=None, help="catalogue name or config.json path (default: --checkpoint's config)")
    p.add_argument("--hardware", default=None, help="profile: the plan is predicted, checked and its batch default "
                   "comes from it")
    add_run_conditions(p)
    add_plan_flags(p, for_search=False)
    add_preset_flag(p)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--max-batch", type=positive, default=None,
                   help=f"KV-cache slots: requests decoded together (default: {max_batch_default})")
    p.add_argument("--nvme-path", default=None, metavar="DIR", help="folder on the NVMe drive (--offload nvme)")
    p.add_argument("--force", action="store_true", help="serve a plan the prediction says cannot fit")
    return tuple(p._actions[first:])


def deployment_argv(actions: tuple[argparse.Action, ...], args: argparse.Namespace) -> list[str]:
    """The flags that give ``args`` its values for ``actions`` (``add_deployment_flags``'s), parsed again by
    ``hpi serve``: a plan flag as it was given (a given one, even at its default, counts: beside --plan it is
    refused, and --pin-memory given is refused rather than turned off), any other flag where its value is not
    the default."""
    given = set(getattr(args, GIVEN_PLAN_FLAGS, ()))
    defaults: dict[str, object] = {}
    for action in actions:
        defaults.setdefault(action.dest, action.default)  # argparse: the first action of a dest sets its default
    argv: list[str] = []
    for action in actions:
        value = getattr(args, action.dest)
        if isinstance(action, PlanFlag):
            flag = next((f for f in action.option_strings if f in given), None)
            if flag is not None and not (action.nargs == 0 and value != action.const):
                argv += [flag] if action.nargs == 0 else [flag, str(value)]
        elif action.nargs == 0:
            if value == action.const and value != defaults[action.dest]:
                argv.append(action.option_strings[0])
        elif value is not None and value != defaults[action.dest]:
            argv += [action.option_strings[0], str(value)]
    return argv


def _resolve(args: argparse.Namespace):
    from dataclasses import replace

    from hpi.cli.checks import executor_ready, existing_dir, readable_file, writable_dir, writable_file
    from hpi.cli.errors import require
    from hpi.deployment import resolve_deployment, this_host
    from hpi.executor.engine import default_step_tokens
    from hpi.executor.spec import RunSpec, ServeSpec
    from hpi.planner.catalog import load_model
    from hpi.planner.specs.plan import model_serve_blocker, serve_blocker

    if args.model is None and args.checkpoint is None:
        raise UsageError("hpi serve: name a model: --model NAME or --checkpoint DIR (with its config.json)")
    require(SERVE_MODULES, "hpi serve")
    if args.out is not None:
        writable_dir(args.out, "--out", "hpi serve")
    if args.chat_template is not None:
        readable_file(args.chat_template, "--chat-template", "hpi serve")
    if args.url_file is not None:
        writable_file(args.url_file, "--url-file", "hpi serve")
    if args.nvme_path is not None:
        existing_dir(args.nvme_path, "--nvme-path", "hpi serve")
    if args.metrics_port is not None and not args.metrics:
        raise UsageError("hpi serve: --metrics-port with --no-metrics: there are no metrics to serve; drop one")
    if args.metrics_port is not None and args.metrics_port == args.port:
        raise UsageError(f"hpi serve: --metrics-port {args.metrics_port} = --port: the API already listens there; "
                         "pick another --metrics-port (or drop it: /metrics is on the API's port)")
    model_ref = args.model or args.checkpoint
    model = load_model(model_ref)
    blocker = model_serve_blocker(model)
    if blocker:
        raise UsageError(blocker)
    if args.max_model_len is not None:
        args.prompt_len = max(args.max_model_len - args.gen_len, 1)
    max_len = args.max_model_len or args.prompt_len + args.gen_len
    if max_len > model.max_position_embeddings:
        raise UsageError(f"hpi serve: --max-model-len {max_len} > {model.name}'s {model.max_position_embeddings} "
                         "positions: lower --max-model-len (or --prompt-len/--gen-len)")
    slots = args.max_batch
    if slots is None:
        slots = None if args.plan_file else 8
    args.batch = slots if slots is not None else 1
    if args.preset:  # up to --max-batch (default 8) requests at once, among the plans hpi serve can serve
        plan = preset_plan(args, model, "hpi serve", concurrency=args.max_batch or 8, serving=True)
    else:
        plan = plan_from_args(args, model)
    if args.plan_file and args.max_batch is not None:
        plan = replace(plan, batch_size=args.max_batch)
    blocker = serve_blocker(plan.kv_offload, plan.dp)
    if blocker:
        raise UsageError(blocker)
    serve = ServeSpec(n_slots=plan.batch_size, max_model_len=max_len, address=("127.0.0.1", 0),
                      step_tokens=args.step_tokens or default_step_tokens(max_len),
                      policy=args.policy, max_queue=max(args.max_queue, 1), hang_timeout_s=args.hang_timeout or 600.0,
                      metrics=args.metrics)
    spec = RunSpec(plan=plan, model=model_ref, workload=workload_from_args(args), hardware=args.hardware,
                   device=args.device, dtype=args.dtype, fetch_wait=args.fetch_wait, checkpoint=args.checkpoint,
                   seed=args.seed, mode="serve", serve=serve, nvme_path=args.nvme_path, out_dir=args.out,
                   extra={"argv": sys.argv[1:]})
    deployment = resolve_deployment(spec, decode_graphs=args.decode_graphs, decode_compile=args.decode_compile,
                                    fused_dequant=args.fused_dequant, skinny_gemm=args.skinny_gemm, force=args.force,
                                    model=model,
                                    host=this_host(), pin_memory_explicit=pin_memory_given(args))
    executor_ready(args.device, "hpi serve")  # last: it imports torch to ask for a GPU
    return deployment


def cmd_serve(args: argparse.Namespace) -> int:
    deployment = _resolve(args)
    from hpi.serve.server import HttpOptions, serve
    from hpi.serve.tokens import read_chat_template

    http = HttpOptions(host=args.host, port=args.port, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                       served_model_name=args.served_model_name, chat_template=read_chat_template(args.chat_template),
                       drain_s=args.drain_timeout, metrics_port=args.metrics_port, url_file=args.url_file)
    for warning in deployment.warnings:
        sys.stderr.write(f"hpi serve: warning: {warning}\n")
    return serve(deployment, http)


def cmd_chat(args: argparse.Namespace) -> int:
    """A thin client of the served API (the official openai package): one message or a prompt loop."""
    _check_url(args.url)
    try:
        import openai
    except ImportError:
        raise missing_dependency("openai", "hpi chat") from None
    client = openai.OpenAI(base_url=args.url, api_key=args.api_key or os.environ.get(API_KEY_ENV) or "none",
                           max_retries=0)
    try:
        model = args.model or client.models.list().data[0].id
    except openai.APIConnectionError:
        raise UsageError(f"hpi chat: no server answers at {args.url}: start one with hpi serve") from None
    except openai.APIStatusError as e:
        raise UsageError(f"hpi chat: the server answered {e.status_code}: {e.message}") from None
    history = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        text = args.prompt if args.prompt is not None else _ask()
        if text is None:
            return 0
        history.append({"role": "user", "content": text})
        history.append({"role": "assistant", "content": _stream_answer(client, model, history, args)})
        if args.prompt is not None:  # one message, one answer
            return 0


def _check_url(url: str) -> None:
    """--url names an http(s) server: scheme and host present (the openai client takes anything)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number or out of range
    except ValueError as e:
        raise UsageError(f"hpi chat: --url {url!r}: {e}: write http://HOST:PORT/v1") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"hpi chat: --url {url!r} is not an http(s) URL: write http://HOST:PORT/v1 (hpi serve's "
                         "address)")


def _ask() -> str | None:
    try:
        line = input("you> ")
    except EOFError:
        return None
    return line if line.strip() not in ("", "/exit", "/quit") else None


def _stream_answer(client, model: str, history: list[dict], args: argparse.Namespace) -> str:
    stream = client.chat.completions.create(model=model, messages=history, stream=True,
                                            temperature=args.temperature, max_tokens=args.max_tokens)
    parts = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            sys.stdout.write(chunk.choices[0].delta.content)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(parts)
