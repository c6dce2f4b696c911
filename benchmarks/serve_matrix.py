"""Serving measurements on a GPU machine: ``hpi run`` offline figures, then ``hpi serve`` under N streaming
clients (``benchmarks/serve_load.py``), side by side in one call, and optionally ``transformers serve``.

    python benchmarks/serve_matrix.py run     --name 8b-b1 --out DIR -- --model llama-3-8b --batch 1 ...
    python benchmarks/serve_matrix.py start   --name 8b --out DIR --port 8100 -- --model llama-3-8b ...
    python benchmarks/serve_matrix.py load    --name 8b --out DIR --port 8100 --model llama-3-8b -- --clients 1,4
    python benchmarks/serve_matrix.py stop    --name 8b --out DIR
    python benchmarks/serve_matrix.py tfserve --name tf-8b --out DIR --port 8200 --work /tmp/ckpt -- --clients 1,4

- ``run``: ``hpi run ... --json``; keeps the RunRecord as ``DIR/NAME.run.json``.
- ``start``: ``hpi serve ...`` in a session of its own (it outlives this call on a device machine that keeps
  processes started with setsid), stderr to ``DIR/NAME.serve.log``, pid in ``DIR/NAME.pid``.
- ``load``: waits for readiness, runs serve_load.py, keeps ``DIR/NAME.load.json``.
- ``scrape``: ``GET /metrics`` once; keeps ``DIR/NAME.metrics.txt`` and ``DIR/NAME.metrics.json`` (histogram
  means beside every other sample: the measured decode step beside the planner's, the host->device ratio).
- ``stop``: SIGTERM, waits for the exit code (``DIR/NAME.exit``).
- ``tfserve``: saves a random-weight checkpoint of ``--model`` with hpi's word-level tokenizer, starts
  ``transformers serve --continuous-batching`` on it and loads it through the chat route (what it serves).

Every step prints one line and appends it to ``DIR/steps.log``; nothing here judges the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def say(out: Path, text: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {text}"
    print(line, flush=True)
    with open(out / "steps.log", "a") as f:
        f.write(line + "\n")


def hpi(*args: str) -> list[str]:
    return [sys.executable, "-m", "hpi.cli", *args]


def cmd_run(a, rest: list[str]) -> int:
    started = time.time()
    proc = subprocess.run(hpi("run", *rest, "--json", "--out", f"/tmp/hpi-runs/{a.name}"), capture_output=True,
                          text=True)
    (a.out / f"{a.name}.run.err").write_text(proc.stderr[-200_000:])
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode == 0 and lines:
        (a.out / f"{a.name}.run.json").write_text(lines[-1])
        rec = json.loads(lines[-1])
        step = rec.get("timings", rec).get("decode_step_s") if isinstance(rec, dict) else None
        say(a.out, f"run {a.name}: ok in {time.time() - started:.0f} s; decode_step_s {json.dumps(step)[:200]}")
    else:
        say(a.out, f"run {a.name}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.returncode


def cmd_start(a, rest: list[str]) -> int:
    log = open(a.out / f"{a.name}.serve.log", "w")
    proc = subprocess.Popen(hpi("serve", "--port", str(a.port), "--out", f"/tmp/hpi-runs/{a.name}", *rest),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (a.out / f"{a.name}.pid").write_text(str(proc.pid))
    say(a.out, f"start {a.name}: pid {proc.pid}, port {a.port}")
    return 0


def cmd_load(a, rest: list[str]) -> int:
    started = time.time()
    out = a.out / f"{a.name}.load.json"
    proc = subprocess.run([sys.executable, str(HERE / "serve_load.py"), "--url", f"http://127.0.0.1:{a.port}",
                           "--model", a.model, "--label", a.name, "--out", str(out), *rest], capture_output=True,
                          text=True)
    (a.out / f"{a.name}.load.err").write_text(proc.stderr[-100_000:])
    summary = [x for x in proc.stderr.splitlines() if "clients:" in x]
    say(a.out, f"load {a.name}: exit {proc.returncode} in {time.time() - started:.0f} s; " + " | ".join(summary)
        + ("" if proc.returncode == 0 else f" {proc.stderr.strip().splitlines()[-1:]}"))
    return proc.returncode


def cmd_scrape(a, rest: list[str]) -> int:
    """``GET /metrics`` once: the exposition as served (``NAME.metrics.txt``) and what a dashboard reads off it
    (``NAME.metrics.json``: each histogram's count and mean, every other sample's value)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{a.port}/metrics", timeout=30).read().decode()
    (a.out / f"{a.name}.metrics.txt").write_text(text)
    doc: dict[str, object] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("model", "plan", "le"))
            if s.name.endswith("_bucket"):
                continue
            doc[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    for key in [k for k in doc if k.split("{")[0].endswith("_count")]:
        total = doc.get(key.replace("_count", "_sum", 1))
        if isinstance(total, float) and doc[key]:
            doc[key.replace("_count", "_mean", 1)] = total / doc[key]
    (a.out / f"{a.name}.metrics.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    shown = {k: doc.get(k) for k in ("hpi_decode_step_seconds_mean", "hpi_predicted_decode_step_seconds",
                                     "hpi_h2d_bandwidth_ratio", "hpi_time_to_first_token_seconds_count")}
    say(a.out, f"scrape {a.name}: {len(doc)} samples; {shown}")
    return 0


def cmd_stop(a, rest: list[str]) -> int:
    pid = int((a.out / f"{a.name}.pid").read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        say(a.out, f"stop {a.name}: already gone")
        return 0
    for _ in range(240):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    say(a.out, f"stop {a.name}: stopped; log tail: {(a.out / f'{a.name}.serve.log').read_text()[-300:]!r}")
    return 0


def cmd_tfserve(a, rest: list[str]) -> int:
    """transformers' own server on the same model (random weights saved once), loaded the same way."""
    import torch

    from hpi.executor.modeling import load_hf_config
    from hpi.executor.weights import save_checkpoint
    from hpi.serve.tokens import FALLBACK_CHAT_TEMPLATE, word_tokenizer

    ckpt = Path(a.work)
    if not (ckpt / "config.json").exists():
        t0 = time.time()
        config = load_hf_config(a.model)
        save_checkpoint(config, seed=0, out_dir=ckpt, dtype=torch.bfloat16)
        tok = word_tokenizer(config.vocab_size)
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
        tok.save_pretrained(ckpt)
        say(a.out, f"tfserve: saved {a.model} to {ckpt} in {time.time() - t0:.0f} s")
    log = open(a.out / f"{a.name}.serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", str(ckpt),
                             "--continuous-batching", "--port", str(a.port), "--dtype", "bfloat16"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        a.model = str(ckpt)
        return cmd_load(a, ["--api", "chat", "--ready-path", "/health", *rest])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def main() -> int:
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=("run", "start", "load", "scrape", "stop", "tfserve"))
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--work", default="/tmp/ckpt-8b")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    steps = {"run": cmd_run, "start": cmd_start, "load": cmd_load, "scrape": cmd_scrape, "stop": cmd_stop,
             "tfserve": cmd_tfserve}
    return steps[a.step](a, rest)


if __name__ == "__main__":
    sys.exit(main())
