"""Run a named matrix of hpi plans and baselines on the GPUs of this machine, side by side, in one go.

    python benchmarks/gpu_matrix.py --matrix h100 --out DIR [--only NAME,NAME] [--gen-len 32]

Every hpi entry is launched exactly as ``hpi run`` launches it (executor.launch), every baseline in its
own process (benchmarks/baselines.py). All records land in DIR/records.json (one bundle: the device
returns few files); a table of measured vs predicted, achieved host->device bandwidth against the
profile's pinned ceiling, and the baseline ratios is printed, and the last stdout line is one JSON
summary. Keep what it wrote under benchmarks/results/ with the device, date and command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LLAMA8B_HIDDEN = 4096


@dataclass(frozen=True)
class Entry:
    name: str
    model: str
    hardware: str
    batch: int = 1
    plan: dict = field(default_factory=dict)  # Plan fields for an hpi run
    baseline: str | None = None  # hf-resident | accelerate | ds-examples
    baseline_args: tuple[str, ...] = ()
    gpus: int = 1


def _ds_examples_knobs(hidden: int) -> dict:
    return {"prefetch_bucket_elems": 2 * hidden * hidden, "max_live_elems": 2 * hidden * hidden,
            "persistence_threshold_elems": hidden}


def matrices() -> dict[str, list[Entry]]:
    h100, m8 = "h100-sxm-1gpu", "llama-3-8b"
    big = str(REPO / "benchmarks" / "configs" / "llama-33b.json")
    tuned = {"prefetch_bucket_elems": 400_000_000, "max_live_elems": 3_000_000_000}
    return {
        "smoke": [
            Entry("tiny-resident", "tiny-llama", h100, 2, {}),
            Entry("tiny-cpu-offload", "tiny-llama", h100, 2, {"offload": "cpu"}),
        ],
        "h100": [
            Entry("8b-resident-b1", m8, h100, 1, {}),
            Entry("8b-cpu-pinned-dsdefaults-b1", m8, h100, 1, {"offload": "cpu"}),
            Entry("8b-cpu-pinned-dsexamples-b1", m8, h100, 1, {"offload": "cpu", **_ds_examples_knobs(LLAMA8B_HIDDEN)}),
            Entry("8b-cpu-pinned-tuned-b1", m8, h100, 1, {"offload": "cpu", **tuned}),
            Entry("8b-cpu-pageable-b1", m8, h100, 1, {"offload": "cpu", "pin_memory": False}),
            Entry("8b-cpu-pinned-tuned-b16", m8, h100, 16, {"offload": "cpu", **tuned}),
            Entry("8b-cpu-pinned-tuned-b64", m8, h100, 64, {"offload": "cpu", **tuned}),
            Entry("base-hf-resident-8b-b1", m8, h100, 1, baseline="hf-resident"),
            Entry("base-ds-examples-8b-b1", m8, h100, 1, baseline="ds-examples"),
            Entry("base-ds-examples-8b-b16", m8, h100, 16, baseline="ds-examples"),
            Entry("base-accelerate-8b-b1", m8, h100, 1, baseline="accelerate"),
            Entry("33b-cpu-pinned-tuned-b1", big, h100, 1, {"offload": "cpu", **tuned}),
            Entry("33b-cpu-pinned-tuned-b16", big, h100, 16, {"offload": "cpu", **tuned}),
        ],
        "h200x2": [
            Entry("8b-tp2-resident-b1", m8, "h200-2gpu", 1, {"tp": 2}, gpus=2),
            Entry("8b-pp2-resident-b8-mb2", m8, "h200-2gpu", 8, {"pp": 2, "micro_batches": 2}, gpus=2),
            Entry("8b-tp2-cpu-pinned-b1", m8, "h200-2gpu", 1, {"tp": 2, "offload": "cpu", **tuned}, gpus=2),
            Entry("8b-pp2-cpu-pinned-b8-mb2", m8, "h200-2gpu", 8, {"pp": 2, "offload": "cpu", "micro_batches": 2, **tuned}, gpus=2),
            Entry("70b-tp2-cpu-pinned-b1", "llama-3-70b", "h200-2gpu", 1, {"tp": 2, "offload": "cpu", **tuned}, gpus=2),
            Entry("70b-tp2-cpu-pinned-b16", "llama-3-70b", "h200-2gpu", 16, {"tp": 2, "offload": "cpu", **tuned}, gpus=2),
        ],
    }


def run_hpi(entry: Entry, out: Path, gen_len: int, prompt_len: int) -> dict:
    from executor.launch import launch
    from executor.spec import RunSpec
    from planner.specs.plan import Plan
    from planner.specs.workload import Workload

    plan = Plan(batch_size=entry.batch, **entry.plan)
    spec = RunSpec(plan=plan, model=entry.model, workload=Workload(prompt_len, gen_len), hardware=entry.hardware,
                   device="cuda", dtype="bf16", out_dir=str(out / entry.name), warmup_steps=1)
    return launch(spec, timeout_s=900)


def run_baseline(entry: Entry, out: Path, gen_len: int, prompt_len: int) -> dict:
    script = str(REPO / "benchmarks" / "baselines.py")
    args = [entry.baseline, "--model", entry.model, "--batch", str(entry.batch), "--prompt-len", str(prompt_len),
            "--gen-len", str(gen_len), *entry.baseline_args]
    if entry.baseline == "ds-examples":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", "29533", script, *args]
    else:
        cmd = [sys.executable, script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    (out / f"{entry.name}.log").write_text(proc.stdout[-20000:] + "\n--- stderr ---\n" + proc.stderr[-20000:])
    if proc.returncode != 0:
        raise RuntimeError(f"{entry.name} exited {proc.returncode}: {proc.stderr.strip().splitlines()[-3:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measured_decode(record: dict) -> float:
    d = record["decode_step_s"]
    return d["median"] if isinstance(d, dict) else d


def summarize(results: dict[str, dict]) -> tuple[list[str], dict]:
    lines = [f"{'entry':34s} {'decode s':>9s} {'pred s':>8s} {'m/p':>5s} {'prefill s':>9s} {'pred':>7s} {'tok/s':>8s} "
             f"{'h2d GB/s':>8s} {'of pinned':>9s}"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:34s} ERROR {r['error'][:100]}")
            continue
        dec = _measured_decode(r)
        pred = (r.get("predicted") or {}).get("decode_step_s")
        pre_pred = (r.get("predicted") or {}).get("prefill_s")
        h2d = r.get("h2d") or {}
        frac = h2d.get("fraction_of_profile")
        lines.append(
            f"{name:34s} {dec:9.4f} {pred if pred else float('nan'):8.4f} {dec / pred if pred else float('nan'):5.2f} "
            f"{r['prefill_s']:9.3f} {pre_pred if pre_pred else float('nan'):7.3f} {r['throughput_tok_s']:8.2f} "
            f"{(h2d.get('achieved_bytes_s') or 0) / 1e9:8.1f} {frac if frac else float('nan'):9.2f}"
        )
    ratios = {}

    def ratio(a: str, b: str, key: str, label: str, invert: bool = False):
        if a in results and b in results and "error" not in results[a] and "error" not in results[b]:
            va = _measured_decode(results[a]) if key == "decode" else results[a][key]
            vb = _measured_decode(results[b]) if key == "decode" else results[b][key]
            ratios[label] = (vb / va) if invert else (va / vb)

    ratio("8b-resident-b1", "base-hf-resident-8b-b1", "decode", "hpi_resident_decode_over_hf_resident")
    ratio("8b-cpu-pinned-tuned-b1", "base-ds-examples-8b-b1", "throughput_tok_s", "hpi_tuned_over_ds_examples_b1_throughput")
    ratio("8b-cpu-pinned-tuned-b16", "base-ds-examples-8b-b16", "throughput_tok_s", "hpi_tuned_over_ds_examples_b16_throughput")
    ratio("8b-cpu-pinned-tuned-b1", "base-accelerate-8b-b1", "throughput_tok_s", "hpi_tuned_over_accelerate_b1_throughput")
    ratio("8b-cpu-pinned-dsdefaults-b1", "base-ds-examples-8b-b1", "throughput_tok_s", "hpi_dsdefaults_over_ds_examples_b1_throughput")
    streaming = {n: (r.get("h2d") or {}).get("fraction_of_profile") for n, r in results.items() if "error" not in r}
    best = max((v for v in streaming.values() if v), default=None)
    lines += [f"{k}: {v:.3f}" for k, v in ratios.items()]
    if best:
        lines.append(f"best streaming fraction of the profile's pinned host->device bandwidth: {best:.3f}")
    return lines, {"ratios": ratios, "best_streaming_fraction": best, "streaming": streaming}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", required=True, choices=sorted(matrices()))
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default=None, help="per-entry run folders (default: under --out)")
    parser.add_argument("--only", default="")
    parser.add_argument("--hardware", default=None, help="profile for every entry's prediction (the machine it runs on)")
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=512)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out
    work.mkdir(parents=True, exist_ok=True)
    entries = [e for e in matrices()[args.matrix] if not args.only or e.name in args.only.split(",")]
    if args.hardware:
        entries = [Entry(**{**e.__dict__, "hardware": args.hardware}) for e in entries]
    results: dict[str, dict] = {}
    bundle = out / "records.json"
    for entry in entries:
        started = time.perf_counter()
        try:
            run = run_baseline if entry.baseline else run_hpi
            results[entry.name] = run(entry, work, args.gen_len, args.prompt_len)
        except Exception as e:  # noqa: BLE001 - one failure must not lose the other entries' records
            results[entry.name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        results[entry.name]["entry"] = entry.__dict__ | {"plan": entry.plan}
        results[entry.name]["entry_wall_s"] = time.perf_counter() - started
        print(f"[{time.strftime('%H:%M:%S')}] {entry.name}: {'ERROR' if 'error' in results[entry.name] else 'ok'} "
              f"({results[entry.name]['entry_wall_s']:.0f} s)", flush=True)
        bundle.write_text(json.dumps(results, default=str))  # after every entry: nothing measured is lost
    lines, summary = summarize(results)
    print("\n".join(lines))
    print(json.dumps({"matrix": args.matrix, "entries": len(entries), "errors": sum("error" in r for r in results.values()),
                      **summary}))


if __name__ == "__main__":
    main()
