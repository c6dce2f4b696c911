"""``hpi eval`` on one GPU, with its parity figures in bf16 (issue 17).

An 8B-shaped checkpoint (random bf16 weights of seed 0, the offline tasks' word-level tokenizer) is scored on the
three offline tasks by hpi's serving runtime in two layouts that fit one H200 (resident; ZeRO-3 CPU offload),
each started by ``hpi eval`` itself with ``--reference hf`` (lm-eval's hf model in bf16, the server's precision).
lm-eval's hf model is then run once more in bf16 and once in fp32, so every bf16 delta is read beside what bf16
itself costs: hf bf16 against hf fp32 is the noise floor a bf16 run cannot beat.

    python benchmarks/eval_device.py --out DIR [--model llama-3-8b] [--limit N] [--work /tmp/ckpt-eval-8b]

Writes DIR/evals/ (hpi eval's history, samples kept), DIR/hf-bfloat16.json and DIR/hf-float32.json (lm-eval's
results with samples), DIR/eval-summary.json (every pairwise parity) and appends to DIR/steps.log.
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
    import torch

    from hpi.evaluation.offline_tasks import task_tokenizer
    from hpi.executor.modeling import load_hf_config
    from hpi.executor.weights import save_checkpoint

    if (work / "tokenizer.json").exists():
        return work
    t0 = time.time()
    config = load_hf_config(model)
    save_checkpoint(config, seed=0, out_dir=work, dtype=torch.bfloat16)
    task_tokenizer(config.vocab_size).save_pretrained(work)
    say(out, f"saved {model} (random bf16, seed 0) with the task tokenizer to {work} in {time.time() - t0:.0f} s")
    return work


def run_hpi_eval(ckpt: Path, layout: str, a: argparse.Namespace) -> dict:
    """``hpi eval`` starting its own runtime in ``layout``; its entry (results + samples), exit code and time."""
    history = a.out / "evals" / layout
    cmd = [sys.executable, "-m", "hpi.cli", "eval", "--checkpoint", str(ckpt), *LAYOUTS[layout], "--tasks",
           a.tasks, "--max-length", str(a.max_length), "--batch-size", str(a.batch_size), "--reference", "hf",
           "--log-samples", "--progress-json", "--out", str(history)]
    if a.limit:
        cmd += ["--limit", str(a.limit)]
    say(a.out, f"{layout}: {' '.join(cmd[2:])}")
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    (a.out / f"hpi-eval-{layout}.stdout").write_text(done.stdout)
    (a.out / f"hpi-eval-{layout}.stderr").write_text(done.stderr)
    last = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {}
    say(a.out, f"{layout}: exit {done.returncode} in {wall:.0f} s; {last}")
    entry = Path(last["entry"]) if "entry" in last else None
    if entry is None:
        raise SystemExit(f"{layout}: hpi eval kept no entry:\n{done.stderr[-3000:]}")
    results = json.loads((entry / "results.json").read_text())
    results["samples"] = json.loads((entry / "samples.json").read_text())
    return {"layout": layout, "exit": done.returncode, "wall_s": wall, "entry": str(entry), "results": results,
            "parity": json.loads((entry / "parity.json").read_text()),
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


def figures(parity) -> dict:
    doc = parity.as_dict()
    return {"ok_at_fp32_tolerances": doc["ok"],
            "scores": {f"{s['task']} {s['metric']}": {"score": s["score"], "reference": s["reference"],
                                                      "delta": s["delta"], "stderr": s["stderr"]}
                       for s in doc["scores"]},
            "requests": {r["task"]: {k: r[k] for k in ("n_loglikelihoods", "max_loglikelihood_delta",
                                                       "median_loglikelihood_delta", "decisions", "agreement")}
                         for r in doc["requests"]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--work", type=Path, default=Path("/tmp/ckpt-eval-8b"))
    p.add_argument("--tasks", default="hpi_arith_mc,hpi_count_ppl,hpi_arith_gen")
    p.add_argument("--limit", type=int, default=0, help="items per task (0: all)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ckpt = make_checkpoint(a.model, a.work, a.out)
    runs = [run_hpi_eval(ckpt, layout, a) for layout in LAYOUTS]
    from hpi.evaluation.parity import compare

    hf = {dtype: run_hf(ckpt, dtype, a) for dtype in ("bfloat16", "float32")}
    pairs = {"hf bf16 vs hf fp32 (what bf16 costs)": compare(hf["bfloat16"], hf["float32"])}
    for r in runs:
        pairs[f"hpi {r['layout']} bf16 vs hf bf16"] = compare(r["results"], hf["bfloat16"])
        pairs[f"hpi {r['layout']} bf16 vs hf fp32"] = compare(r["results"], hf["float32"])
    summary = {"model": a.model, "checkpoint": str(ckpt), "tasks": a.tasks, "limit": a.limit,
               "runs": [{k: r[k] for k in ("layout", "exit", "wall_s", "entry")} | {
                   "plan": r["launch"]["serve_spec"]["plan"], "server": r["launch"]["server"],
                   "parity_in_run": {k: r["parity"][k] for k in ("ok", "failures")}} for r in runs],
               "pairs": {name: figures(parity) for name, parity in pairs.items()}}
    (a.out / "eval-summary.json").write_text(json.dumps(summary, indent=1, default=str))
    for name, parity in pairs.items():
        worst = max((r.max_delta for r in parity.requests), default=0.0)
        agreement = min((r.agreement for r in parity.requests), default=1.0)
        scores = ", ".join(f"{s.task.removeprefix('hpi_')} {s.metric.split(',')[0]} {s.delta:+.4f}"
                           for s in parity.scores if s.metric.split(",")[0] in ("acc", "exact_match",
                                                                                "word_perplexity"))
        say(a.out, f"{name}: max |dll| {worst:.4g}, min agreement {agreement:.3f}; score deltas: {scores}")


if __name__ == "__main__":
    main()
