"""``hpi eval`` on one GPU, with its parity figures in bf16 (issue 17).

An 8B-shaped checkpoint (random bf16 weights of seed 0, the offline tasks' word-level tokenizer) is scored on the
three offline tasks by hpi's serving runtime in two layouts that fit one H200 (resident; ZeRO-3 CPU offload),
each started by ``hpi eval`` itself with ``--reference hf`` (lm-eval's hf model in bf16, the server's precision).
lm-eval's hf model is then run once more in bf16 and once in fp32, so every bf16 delta is read beside what bf16
itself costs: hf bf16 against hf fp32 is the noise floor a bf16 run cannot beat.

    python benchmarks/eval_device.py --out DIR [--layouts resident,zero3-cpu-offload] [--hf bfloat16,float32]
                                     [--limit N] [--eval-timeout S] [--work /tmp/ckpt-eval-8b]
    python benchmarks/eval_device.py --out DIR --summarize-only   # the pairs from what DIR already holds

Writes DIR/evals/<layout>/ (hpi eval's history, samples kept; its progress lines and stderr beside it as they
come), DIR/hf-bfloat16.json and DIR/hf-float32.json (lm-eval's results with samples), DIR/eval-summary.json
(every pairwise parity of what DIR holds) and appends to DIR/steps.log. The hf runs go first: they are short.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LAYOUTS = {"resident": [], "zero3-cpu-offload": ["--offload", "cpu"]}


def say(out: Path, text: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {text}"
    print(line, flush=True)
    with (out / "steps.log").open("a") as f:
        f.write(line + "\n")


def make_checkpoint(model: str, work: Path, out: Path) -> Path:
    """The random bf16 model of seed 0, drawn on the GPU (the CPU took 229 s for an 8B), with the task tokenizer."""
    import torch

    from hpi.evaluation.offline_tasks import task_tokenizer
    from hpi.executor.modeling import load_hf_config
    from hpi.executor.weights import full_state_dict, write_checkpoint

    if (work / "tokenizer.json").exists():
        return work
    t0 = time.time()
    config = load_hf_config(model)
    write_checkpoint(full_state_dict(config, 0, torch.bfloat16, device="cuda"), config, work)
    torch.cuda.empty_cache()
    task_tokenizer(config.vocab_size).save_pretrained(work)
    say(out, f"saved {model} (random bf16, seed 0, drawn on cuda) with the task tokenizer to {work} in "
             f"{time.time() - t0:.0f} s")
    return work


def run_hpi_eval(ckpt: Path, layout: str, a: argparse.Namespace) -> None:
    """``hpi eval`` starting its own runtime in ``layout``, its progress lines and stderr kept as they come."""
    history = a.out / "evals" / layout
    history.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "hpi.cli", "eval", "--checkpoint", str(ckpt), *LAYOUTS[layout], "--tasks",
           a.tasks, "--max-length", str(a.max_length), "--batch-size", str(a.batch_size), "--reference", "hf",
           "--log-samples", "--progress-json", "--out", str(history)]
    if a.limit:
        cmd += ["--limit", str(a.limit)]
    say(a.out, f"{layout}: {' '.join(cmd[2:])}")
    t0 = time.time()
    with (history / "progress.jsonl").open("w") as stdout, (history / "stderr.log").open("w") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr)
        try:
            code = proc.wait(a.eval_timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # hpi eval stops its runtime (SIGTERM reaches hpi serve by the parent-death signal)
            code = proc.wait()
            say(a.out, f"{layout}: stopped after {a.eval_timeout:.0f} s")
    say(a.out, f"{layout}: exit {code} in {time.time() - t0:.0f} s")


def load_entry(entry: Path) -> dict:
    results = json.loads((entry / "results.json").read_text())
    results["samples"] = json.loads((entry / "samples.json").read_text())
    return {"entry": str(entry), "results": results, "parity": json.loads((entry / "parity.json").read_text()),
            "launch": json.loads((entry / "launch.json").read_text())}


def run_hf(ckpt: Path, dtype: str, a: argparse.Namespace) -> dict:
    from hpi.evaluation.job import EvalJob

    job = EvalJob(url="", checkpoint=str(ckpt), tasks=tuple(a.tasks.split(",")), limit=a.limit or None,
                  batch_size=a.batch_size, max_length=a.max_length, reference_dtype=dtype, reference_device="cuda")
    t0 = time.time()
    results = job.run_reference()
    say(a.out, f"hf {dtype}: {time.time() - t0:.0f} s")
    kept = {"results": results["results"], "samples": results["samples"], "n-shot": results.get("n-shot")}
    (a.out / f"hf-{dtype}.json").write_text(json.dumps(kept, default=str))
    return kept


def relative_deltas(parity) -> dict:
    """Per task, the largest and the median |delta| / max(1, |reference|) over its scored requests."""
    out = {}
    for r in parity.requests:
        ratios = sorted(d / a * parity.tolerances.loglikelihood_relative
                        for d, a in zip(r.loglikelihood_deltas, r.allowed, strict=True))
        if ratios:
            out[r.task] = {"max": ratios[-1], "median": ratios[len(ratios) // 2]}
    return out


def figures(parity) -> dict:
    doc = parity.as_dict()
    return {"ok": doc["ok"], "precision": doc["precision"], "failures": doc["failures"],
            "relative_loglikelihood_deltas": relative_deltas(parity),
            "scores": {f"{s['task']} {s['metric']}": {"score": s["score"], "reference": s["reference"],
                                                      "delta": s["delta"], "stderr": s["stderr"]}
                       for s in doc["scores"]},
            "requests": {r["task"]: {k: r[k] for k in ("n_loglikelihoods", "max_loglikelihood_delta",
                                                       "median_loglikelihood_delta", "decisions", "agreement")}
                         for r in doc["requests"]}}


def summarize(a: argparse.Namespace) -> None:
    from hpi.evaluation.parity import compare

    runs = {}
    for layout in LAYOUTS:
        entries = sorted((a.out / "evals" / layout).glob("*/results.json"))
        if entries:
            runs[layout] = load_entry(entries[-1].parent)
    hf = {dtype: json.loads((a.out / f"hf-{dtype}.json").read_text())
          for dtype in ("bfloat16", "float32") if (a.out / f"hf-{dtype}.json").exists()}
    pairs = {}  # every pair has a bf16 side: judged by bf16's tolerances (hpi.evaluation.parity.TOLERANCES)
    if len(hf) == 2:
        pairs["hf bf16 vs hf fp32 (what bf16 costs)"] = compare(hf["bfloat16"], hf["float32"], "bfloat16")
    for layout, run in runs.items():
        for dtype, short in (("bfloat16", "bf16"), ("float32", "fp32")):
            if dtype in hf:
                pairs[f"hpi {layout} bf16 vs hf {short}"] = compare(run["results"], hf[dtype], "bfloat16")
    summary = {"model": a.model, "tasks": a.tasks, "limit": a.limit,
               "runs": {layout: {"entry": run["entry"], "plan": run["launch"]["serve_spec"]["plan"],
                                 "server": run["launch"]["server"],
                                 "parity_in_run": {k: run["parity"][k] for k in ("ok", "failures")}}
                        for layout, run in runs.items()},
               "pairs": {name: figures(parity) for name, parity in pairs.items()}}
    (a.out / "eval-summary.json").write_text(json.dumps(summary, indent=1, default=str))
    for name, parity in pairs.items():
        worst = max((r.max_delta for r in parity.requests), default=0.0)
        median = {r.task.removeprefix("hpi_"): round(r.median_delta, 4) for r in parity.requests
                  if r.loglikelihood_deltas}
        agreement = {r.task.removeprefix("hpi_"): round(r.agreement, 3) for r in parity.requests}
        scores = ", ".join(f"{s.task.removeprefix('hpi_')} {s.metric.split(',')[0]} {s.delta:+.4g}"
                           for s in parity.scores if s.metric.split(",")[0] in ("acc", "exact_match",
                                                                                "word_perplexity"))
        rel = {task.removeprefix("hpi_"): round(d["max"], 4) for task, d in relative_deltas(parity).items()}
        say(a.out, f"{name}: max |dll| {worst:.4g} (relative {rel}), median {median}, agreement {agreement}; "
                   f"score deltas: {scores}; bf16 parity {'ok' if parity.ok else 'OFF'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--work", type=Path, default=Path("/tmp/ckpt-eval-8b"))
    p.add_argument("--tasks", default="hpi_arith_mc,hpi_count_ppl,hpi_arith_gen")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--hf", default="bfloat16,float32", help="lm-eval hf model runs, by dtype ('' for none)")
    p.add_argument("--limit", type=int, default=0, help="items per task (0: all)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-timeout", type=float, default=None, help="seconds one hpi eval may take")
    p.add_argument("--summarize-only", action="store_true")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not a.summarize_only:
        ckpt = make_checkpoint(a.model, a.work, a.out)
        for dtype in filter(None, a.hf.split(",")):
            run_hf(ckpt, dtype, a)
        for layout in filter(None, a.layouts.split(",")):
            run_hpi_eval(ckpt, layout, a)
    summarize(a)


if __name__ == "__main__":
    main()
