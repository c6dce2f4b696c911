"""Load an OpenAI-compatible server with N concurrent streaming clients and report what they saw.

    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model NAME --clients 1,4,16,64 \\
        --prompt-len 512 --gen-len 128 [--mixed] [--api-key KEY] [--label hpi] [--out load.json]

Each of the N clients sends ``--requests`` completions one after another (stream on, temperature 0,
``ignore_eos`` where the server takes it), all clients at once. Prompts are words ``w<i>`` of random ids, so
a word-level tokenizer (hpi's for random-weight models, or one saved with a checkpoint) reads each as one
token and every server sees the same token counts. Per level it reports the aggregate output tokens/s
(generated tokens over the wall time from the first send to the last token), time to first token and
inter-token latency (the gap between consecutive streamed tokens) at p50 / p99, and end-to-end latency.
``--mixed``: prompt lengths uniform in [64, 1024], outputs uniform in [16, ``--mixed-gen-max``=256] (seeded).

The last stdout line is one JSON document (``{"benchmark": "serve_load", ...}``). Random weights are fine:
what is measured is the serving path, not the text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field


@dataclass
class RequestResult:
    prompt_tokens: int
    max_tokens: int
    sent_s: float
    first_s: float | None = None  # first token's arrival, seconds since sent
    gaps_s: list[float] = field(default_factory=list)  # between consecutive tokens
    tokens: int = 0
    done_s: float | None = None
    error: str | None = None


def _httpx():
    """httpx2 (what the openai client uses here), else httpx (the GPU image has that one): the same API."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return httpx


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(n))


async def one_request(client, args, prompt: str, n_prompt: int, max_tokens: int) -> RequestResult:
    body = {"model": args.model, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if args.api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if args.ignore_eos:
        body["ignore_eos"] = True
    result = RequestResult(n_prompt, max_tokens, time.perf_counter())
    last = None
    try:
        route = "/v1/chat/completions" if args.api == "chat" else "/v1/completions"
        async with client.stream("POST", args.url + route, json=body, headers=args.headers) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                doc = json.loads(line[6:])
                if "error" in doc:
                    result.error = str(doc["error"])[:300]
                    break
                text = "".join(c.get("text") or (c.get("delta") or {}).get("content") or ""
                               for c in doc.get("choices", []))
                n = len(text.split())
                if not n:
                    continue
                now = time.perf_counter()
                if result.first_s is None:
                    result.first_s = now - result.sent_s
                else:
                    result.gaps_s += [(now - last) / n] * n  # a chunk of n tokens: n equal gaps
                last = now
                result.tokens += n
    except Exception as e:  # noqa: BLE001 - recorded with the level's results
        result.error = f"{type(e).__name__}: {e}"[:300]
    result.done_s = time.perf_counter() - result.sent_s
    return result


async def run_level(args, n_clients: int, rng: random.Random) -> dict:
    httpx = _httpx()

    def shape() -> tuple[int, int]:
        if args.mixed:
            return rng.randint(64, 1024), rng.randint(16, args.mixed_gen_max)
        return args.prompt_len, args.gen_len

    jobs = [[shape() for _ in range(args.requests)] for _ in range(n_clients)]
    prompts = [[(words(rng, p, args.vocab), p, g) for p, g in client_jobs] for client_jobs in jobs]
    limits = httpx.Limits(max_connections=n_clients + 4, max_keepalive_connections=n_clients + 4)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        async def client_loop(mine):
            return [await one_request(client, args, text, p, g) for text, p, g in mine]

        started = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(mine) for mine in prompts))
        wall = time.perf_counter() - started
    results = [r for rs in per_client for r in rs]
    ok = [r for r in results if r.error is None]
    ttft = [r.first_s for r in ok if r.first_s is not None]
    gaps = [g for r in ok for g in r.gaps_s]
    tokens = sum(r.tokens for r in ok)
    return {
        "clients": n_clients, "requests": len(results), "errors": [r.error for r in results if r.error][:5],
        "n_errors": len(results) - len(ok), "wall_s": wall, "generated_tokens": tokens,
        "output_tok_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
        "itl_p50_s": percentile(gaps, 0.5), "itl_p99_s": percentile(gaps, 0.99),
        "itl_mean_s": statistics.fmean(gaps) if gaps else None,
        "e2e_p50_s": percentile([r.done_s for r in ok], 0.5),
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "raw": [asdict(r) | {"gaps_s": None} for r in results],
    }


def engine_counters(args) -> dict | None:
    """hpi serve's step counters from /health (steps, seconds inside steps, tokens stepped), else None."""
    try:
        doc = _httpx().get(args.url + "/health", headers=args.headers, timeout=5).json()
    except Exception:  # noqa: BLE001 - another server, or none: no counters
        return None
    keys = ("steps", "step_seconds_total", "step_tokens_total")
    return {k: doc[k] for k in keys if isinstance(doc, dict) and isinstance(doc.get(k), (int, float))} or None


def wait_ready(args) -> None:
    """Poll the readiness route until the server says it is warm (a loading model answers 503)."""
    httpx = _httpx()

    deadline = time.monotonic() + args.wait_ready
    while True:
        try:
            if httpx.get(args.url + args.ready_path, headers=args.headers, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"serve_load: {args.url} was not ready after {args.wait_ready:g} s")
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000 (no /v1)")
    p.add_argument("--model", required=True)
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=1, help="requests per client, one after another")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--mixed", action="store_true")
    p.add_argument("--mixed-gen-max", type=int, default=256, help="--mixed: longest output (default 256)")
    p.add_argument("--vocab", type=int, default=32000, help="ids of the prompt words are drawn below this")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="server")
    p.add_argument("--wait-ready", type=float, default=600.0, help="seconds to wait for the server first")
    p.add_argument("--ready-path", default="/ready", help="route that answers 200 once the server is warm")
    p.add_argument("--api", choices=("completions", "chat"), default="completions",
                   help="chat: /v1/chat/completions with the prompt as one user message (servers without "
                        "/v1/completions)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.url = args.url.rstrip("/")
    args.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    wait_ready(args)
    rng = random.Random(args.seed)
    levels = []
    for n in (int(x) for x in args.clients.split(",")):
        before = engine_counters(args)
        level = asyncio.run(run_level(args, n, rng))
        after = engine_counters(args)
        if before and after:  # what the server's engine did meanwhile (hpi serve's /health)
            level["engine"] = {k: after[k] - before[k] for k in after if k in before}
        levels.append(level)
        sys.stderr.write(f"{args.label} {n:3d} clients: {level['output_tok_s']:9.1f} tok/s, ttft p50 "
                         f"{level['ttft_p50_s'] or float('nan'):.3f} s, "
                         f"itl p50 {level['itl_p50_s'] or float('nan'):.4f} s, "
                         f"errors {level['n_errors']}\n")
    doc = {"benchmark": "serve_load", "label": args.label, "model": args.model, "mixed": args.mixed,
           "prompt_len": None if args.mixed else args.prompt_len, "gen_len": None if args.mixed else args.gen_len,
           "levels": levels}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    print(json.dumps({k: v for k, v in doc.items() if k != "levels"} |
                     {"levels": [{k: v for k, v in lv.items() if k != "raw"} for lv in levels]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
