"""How fast is the full plan search? Prints plans evaluated per second and peak memory.

    python benchmarks/plan_speed.py [--model kimi-k2] [--hardware dgx-h100-x4-ib] [--repeat 3]

Target (issue 2): the full search for kimi-k2 on dgx-h100-x4-ib under 2 s wall on a 2-core machine,
peak memory under 500 MB. The wall time counted is the whole ``hpi plan`` path in this process: loading
model and profile, building the topology graph, placing every layout, evaluating and ranking. A fresh
process (imports included) is timed too. The last stdout line is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def in_process(model_name: str, hardware_name: str) -> dict:
    from hpi.planner.catalog import load_model
    from hpi.planner.profiles import load_profile
    from hpi.planner.search import search
    from hpi.planner.specs.workload import Workload

    started = time.perf_counter()
    model, hardware = load_model(model_name), load_profile(hardware_name)
    result = search(model, hardware, Workload())
    ranked = {obj: result.ranked(obj) for obj in ("latency", "throughput", "balanced")}
    front = result.pareto_front()
    elapsed = time.perf_counter() - started
    return {
        "seconds": elapsed,
        "plans": result.n_plans,
        "feasible": result.n_feasible,
        "layouts": len(result.evaluations),
        "pareto": len(front),
        "best_latency": result.plan(ranked["latency"][0]).label if len(ranked["latency"]) else None,
    }


def fresh_process(model_name: str, hardware_name: str) -> float:
    """Wall time of ``hpi plan --json`` in a new interpreter, imports and output included."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "hpi.cli", "plan", "--model", model_name, "--hardware", hardware_name, "--json"],
        check=True, capture_output=True,
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="kimi-k2")
    parser.add_argument("--hardware", default="dgx-h100-x4-ib")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    runs = [in_process(args.model, args.hardware) for _ in range(args.repeat)]
    cold = runs[0]["seconds"]
    warm = min(r["seconds"] for r in runs[1:]) if len(runs) > 1 else cold
    process_s = min(fresh_process(args.model, args.hardware) for _ in range(args.repeat))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    r = runs[0]
    print(f"{args.model} on {args.hardware}: {r['plans']:,} plans over {r['layouts']} layouts, "
          f"{r['feasible']:,} feasible, Pareto front {r['pareto']}")
    print(f"search (first, cold caches): {cold:.3f} s = {r['plans'] / cold:,.0f} plans/s")
    print(f"search (warm caches):        {warm:.3f} s = {r['plans'] / warm:,.0f} plans/s")
    print(f"hpi plan in a fresh process:  {process_s:.3f} s wall (target < 2 s)")
    print(f"peak RSS: this process {peak_mb:.0f} MB, hpi plan process {child_peak_mb:.0f} MB (target < 500 MB)")
    print(json.dumps({
        "model": args.model, "hardware": args.hardware, "plans": r["plans"], "layouts": r["layouts"],
        "feasible": r["feasible"], "search_cold_s": cold, "search_warm_s": warm, "process_wall_s": process_s,
        "plans_per_s": r["plans"] / cold, "peak_rss_mb": peak_mb, "process_peak_rss_mb": child_peak_mb,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "python": platform.python_version(),
    }))


if __name__ == "__main__":
    main()
