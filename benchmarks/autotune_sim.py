"""Search efficiency of ``hpi autotune --simulate``: trials until within 3% of the hidden machine's optimum.

    python benchmarks/autotune_sim.py [--trials 12] [--seeds 0,1,2] [--jobs 2] [--quick]

For several models and hardware profiles, each with several hidden machines (``--seeds``: each seed draws
other efficiencies and other effects the planner does not model, see ``hpi.autotune.simulate``), one study
of ``--trials`` trials runs from the nominal planner's seeds. Per case it prints:

- ``t3``: the first trial after which the study's best (by its noisy measurements) is within 3% of the
  hidden machine's exhaustive optimum (true, noise-free figures); ``-`` if never;
- ``gap1``: how far trial 1 (the planner's best prediction) is from that optimum: what tuning buys;
- ``gap``: the final best's distance;
- ``grid``: the size of the same search lattice, and ``grid/3%``: the expected trials of a grid search in
  random order to first hit a point within 3% ((G + 1) / (K + 1)); ``coarse``: the same for the coarse grid
  of DeepSpeed's default knobs (configs x batch x pinning x KV offload);
- ``ratio``: grid/3% over t3.

The last stdout line is one JSON document with every case and the summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

CASES = [  # (model, hardware, objective)
    ("llama-3-8b", "h200-2gpu", "throughput"),
    ("llama-3-70b", "a6000-workstation", "throughput"),
    ("llama-3-70b", "h100-sxm-1gpu", "throughput"),
    ("mixtral-8x7b", "a6000-workstation", "throughput"),
    ("mixtral-8x7b", "h100-sxm-1gpu", "throughput"),
    ("kimi-k2", "dgx-h100", "throughput"),
    ("deepseek-v3", "dgx-h100", "throughput"),
    ("llama-3-70b", "h100-sxm-1gpu", "latency"),
    ("mixtral-8x7b", "h100-sxm-1gpu", "latency"),
]
QUICK = [CASES[1], CASES[4], CASES[5]]


def run_case(model: str, hardware: str, objective: str, seed: int, trials: int) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from hpi.autotune.tuner import TuneSettings, tune

    started = time.perf_counter()
    doc = tune(TuneSettings(model=model, hardware=hardware, objective=objective, simulate=True, n_trials=trials,
                          seed=seed, storage="memory", report=False))
    sim = doc["simulation"]
    t3 = sim["trials_to_within_3pct"]
    grid = sim["expected_grid_trials"]
    return {
        "model": model, "hardware": hardware, "objective": objective, "seed": seed, "trials": doc["trials"],
        "runs": doc["runs"], "trials_to_within_3pct": t3, "trial1_gap": sim["trial1_gap"],
        "final_gap": sim["final_gap"],
        "grid_size": sim["grid_size"], "expected_grid_trials": grid, "coarse_grid_size": sim["coarse_grid_size"],
        "expected_coarse_grid_trials": sim["expected_coarse_grid_trials"],
        "grid_over_autotune": (grid / t3) if (grid and t3) else None,
        "true_optimum": sim["true_optimum_plan"], "best": doc["best"]["label"] if doc["best"] else None,
        "statuses": doc["statuses"], "wall_s": time.perf_counter() - started,
    }


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="three cases (CI-sized)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    cases = [(m, h, o, s) for (m, h, o) in (QUICK if args.quick else CASES) for s in seeds]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_case, m, h, o, s, args.trials) for m, h, o, s in cases]
        rows = [f.result() for f in futures]
    print(f"{'model':13s} {'hardware':18s} {'objective':10s} {'seed':>4s} {'t3':>3s} {'runs':>4s} {'gap1':>6s} "
          f"{'gap':>6s} {'grid':>7s} {'grid/3%':>8s} {'coarse':>6s} {'c/3%':>6s} {'ratio':>6s} {'s':>5s}")
    for r in rows:
        print(f"{r['model']:13s} {r['hardware']:18s} {r['objective']:10s} {r['seed']:4d} "
              f"{_fmt(r['trials_to_within_3pct'], 'd'):>3s} {r['runs']:4d} {_fmt(r['trial1_gap'], '.1%'):>6s} "
              f"{_fmt(r['final_gap'], '.1%'):>6s} {r['grid_size']:7,d} "
              f"{_fmt(r['expected_grid_trials'], ',.0f', 'inf'):>8s} "
              f"{r['coarse_grid_size']:6,d} {_fmt(r['expected_coarse_grid_trials'], ',.0f', 'inf'):>6s} "
              f"{_fmt(r['grid_over_autotune'], ',.0f'):>6s} {r['wall_s']:5.0f}")
    reached = [r["trials_to_within_3pct"] for r in rows if r["trials_to_within_3pct"] is not None]
    ratios = [r["grid_over_autotune"] for r in rows if r["grid_over_autotune"]]
    summary = {
        "cases": len(rows),
        "within_3pct_in_budget": len(reached),
        "trials_budget": args.trials,
        "median_trials_to_3pct": statistics.median(reached) if reached else None,
        "max_trials_to_3pct": max(reached) if reached else None,
        "median_trial1_gap": statistics.median(r["trial1_gap"] for r in rows if r["trial1_gap"] is not None),
        "max_trial1_gap": max(r["trial1_gap"] for r in rows if r["trial1_gap"] is not None),
        "median_final_gap": statistics.median(r["final_gap"] for r in rows if r["final_gap"] is not None),
        "median_expected_grid_trials": statistics.median(r["expected_grid_trials"] or float("inf") for r in rows),
        "median_expected_coarse_grid_trials": statistics.median(r["expected_coarse_grid_trials"] or float("inf")
                                                                for r in rows),
        "median_grid_over_autotune": statistics.median(ratios) if ratios else None,
        "wall_s": time.perf_counter() - started,
    }
    print(f"within 3% of the hidden optimum in <= {args.trials} trials: {len(reached)}/{len(rows)} cases; median "
          f"{summary['median_trials_to_3pct']} trials, max {summary['max_trials_to_3pct']}; the planner's own first "
          f"pick was {summary['median_trial1_gap']:.1%} off (median, max {summary['max_trial1_gap']:.1%}); a "
          f"random-order grid needs {summary['median_expected_grid_trials']:,.0f} trials (median; coarse grid "
          f"{summary['median_expected_coarse_grid_trials']:,.0f})")
    print(json.dumps({"benchmark": "autotune_sim", "summary": summary, "cases": rows}, default=str))


if __name__ == "__main__":
    main()
