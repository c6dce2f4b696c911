"""Where the run-to-run spread of eager (host-bound) decode comes from, measured side by side in one process.

    python benchmarks/host_jitter.py --model llama-3-8b --out DIR [--reps 3] [--gen-len 64] [--batches 1,16]

The same eager 8B decode on an H100 took 27.7, 31.6, 34.1 and 40.5 ms per step (median) in four runs of one
plan, and single steps of one run ranged 24-58 ms. A host-bound step is the Python and kernel launches of
one thread; what can stretch it, each switched on its own, interleaved over repetitions so that a drift of
the machine shows as spread within a condition, not as a difference between conditions:

- ``gc``: the cyclic garbage collector. A collection of the old generation walks every tracked object
  (torch, transformers and the model's modules); ``gc.freeze()`` after the build moves them out of its reach,
  and ``gc.disable()`` keeps collections out of the timed loop. Every collection in the loop is timed with
  ``gc.callbacks`` either way, so the baseline says how much they cost.
- ``threads1``: ``torch.set_num_threads(1)``: no OpenMP pool spinning beside the launching thread.
- ``pinned``: the process bound to one core (``os.sched_setaffinity``): no migrations between cores.
- ``all``: the three together.

Per condition: the median, p10, p90 and max decode step, the gc pauses in the loop, and the thread's
voluntary / involuntary context switches (``getrusage(RUSAGE_THREAD)``; involuntary ones are preemption),
and the launching thread's CPU time over wall time (near 1: the thread ran all along, so a slow step was
slow Python or launches; well below 1: it waited, descheduled or blocked on the device).
Writes DIR/host_jitter.json; the last stdout line is a JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

CONDITIONS = ("baseline", "gc", "threads1", "pinned", "all")


class GcPauses:
    """Seconds of every cyclic collection while installed, by generation."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append((int(info.get("generation", -1)), time.perf_counter() - self._start))

    def __enter__(self) -> "GcPauses":
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)


@contextlib.contextmanager
def condition(name: str, torch):
    threads, affinity, gc_was = torch.get_num_threads(), os.sched_getaffinity(0), gc.isenabled()
    try:
        if name in ("gc", "all"):
            gc.collect()
            gc.freeze()
            gc.disable()
        if name in ("threads1", "all"):
            torch.set_num_threads(1)
        if name in ("pinned", "all"):
            os.sched_setaffinity(0, {min(affinity)})
        yield
    finally:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, affinity)
        if name in ("gc", "all"):
            gc.unfreeze()
        if gc_was:
            gc.enable()


def _cpu_mhz() -> float:
    """Mean current clock over the cores (/proc/cpuinfo; 0 where it is not given)."""
    try:
        mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("cpu MHz")]
    except OSError:
        return 0.0
    return statistics.mean(mhz) if mhz else 0.0


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _steps(times) -> list[float]:
    """Decode step seconds from the generator's forward end marks (forward 0 is the prefill)."""
    ends = times.forward_end_s
    return [b - a for a, b in zip(ends, ends[1:])]


def _summary(steps: list[float]) -> dict:
    q = statistics.quantiles(steps, n=10)
    return {"median_s": statistics.median(steps), "p10_s": q[0], "p90_s": q[-1], "max_s": max(steps),
            "min_s": min(steps), "n": len(steps)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    args = ap.parse_args(argv)

    import torch
    from transformers import DynamicCache

    from hpi.executor.generate import PipelineGenerator, Sampler, StepTimes
    from hpi.executor.groups import Groups
    from hpi.executor.modeling import ShardSpec, build_stage, load_hf_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = load_hf_config(args.model)
    t0 = time.perf_counter()
    stage = build_stage(config, ShardSpec.whole(config.num_hidden_layers), dtype=dtype, device=device, seed=0).eval()
    build_s = time.perf_counter() - t0
    groups = Groups.alone()
    batches = [int(b) for b in args.batches.split(",")]
    conditions = args.conditions.split(",")
    gen = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(3, config.vocab_size, (b, args.prompt_len), generator=gen) for b in batches}

    def generate(batch: int) -> StepTimes:
        g = PipelineGenerator(stage=stage, groups=groups, new_cache=DynamicCache, hidden_size=config.hidden_size,
                              dtype=dtype, device=device, micro_batches=1, sampler=Sampler())
        g.run(prompts[batch], batch, args.prompt_len, args.gen_len, chat=False)
        return g.times

    for b in batches:  # warm-up: allocator pools, kernels' autotuning, lazy imports
        generate(b)
    runs = []
    for rep in range(args.reps):
        for name in conditions:
            for b in batches:
                with condition(name, torch), GcPauses() as pauses:
                    before, cpu0, wall0 = (resource.getrusage(resource.RUSAGE_THREAD), time.thread_time(),
                                           time.perf_counter())
                    times = generate(b)
                    after, cpu1, wall1 = (resource.getrusage(resource.RUSAGE_THREAD), time.thread_time(),
                                          time.perf_counter())
                steps = _steps(times)
                runs.append({"rep": rep, "condition": name, "batch": b, "steps_s": steps, **_summary(steps),
                             "gc_pauses": pauses.pauses, "gc_pause_s": sum(p for _, p in pauses.pauses),
                             "voluntary_switches": after.ru_nvcsw - before.ru_nvcsw,
                             "involuntary_switches": after.ru_nivcsw - before.ru_nivcsw,
                             "thread_cpu_fraction": (cpu1 - cpu0) / (wall1 - wall0), "cpu_mhz": _cpu_mhz()})
                r = runs[-1]
                print(f"rep {rep} {name:9} b{b:<3} median {r['median_s'] * 1e3:6.1f} ms  p10 {r['p10_s'] * 1e3:6.1f}  "
                      f"p90 {r['p90_s'] * 1e3:6.1f}  max {r['max_s'] * 1e3:6.1f}  gc {len(r['gc_pauses'])} "
                      f"({r['gc_pause_s'] * 1e3:.1f} ms)  csw {r['voluntary_switches']}/{r['involuntary_switches']}  "
                      f"cpu {r['thread_cpu_fraction']:.0%} of wall  {r['cpu_mhz']:.0f} MHz",
                      flush=True)

    by = {}
    for name in conditions:
        for b in batches:
            mine = [r for r in runs if r["condition"] == name and r["batch"] == b]
            medians = [r["median_s"] for r in mine]
            by[f"{name}-b{b}"] = {"median_of_medians_s": statistics.median(medians),
                                  "spread_of_medians": (max(medians) - min(medians)) / statistics.median(medians),
                                  "pooled": _summary([s for r in mine for s in r["steps_s"]])}
    base = {b: by[f"baseline-b{b}"]["median_of_medians_s"] for b in batches if f"baseline-b{b}" in by}
    ratios = {k: v["median_of_medians_s"] / base[int(k.rsplit("-b", 1)[1])] for k, v in by.items()
              if int(k.rsplit("-b", 1)[1]) in base}
    out = {"kind": "hpi.HostJitter", "date": time.strftime("%Y-%m-%d"), "host": platform.node(),
           "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
           "torch": torch.__version__,
           "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "model": args.model,
           "prompt_len": args.prompt_len, "gen_len": args.gen_len, "build_s": build_s,
           "torch_threads": torch.get_num_threads(), "gc_threshold": gc.get_threshold(),
           "gc_tracked_objects": len(gc.get_objects()), "runs": runs, "by_condition": by,
           "median_vs_baseline": ratios}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "host_jitter.json").write_text(json.dumps(out, indent=1))
    for k, v in by.items():
        print(f"{k:16} median {v['median_of_medians_s'] * 1e3:6.1f} ms  "
              f"spread of medians {v['spread_of_medians']:5.1%}  "
              f"pooled p10/p90 {v['pooled']['p10_s'] * 1e3:.1f}/{v['pooled']['p90_s'] * 1e3:.1f} ms  "
              f"x baseline {ratios.get(k, float('nan')):.2f}")
    print(json.dumps({"by_condition": {k: {"median_ms": round(v["median_of_medians_s"] * 1e3, 2),
                                           "spread": round(v["spread_of_medians"], 3)} for k, v in by.items()},
                      "median_vs_baseline": {k: round(v, 3) for k, v in ratios.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
