"""Print hpi's uncalibrated predictions next to published and measured results.

    python benchmarks/validate_published.py

Runs come from validation/published_runs.yaml (sources cited per row); see hpi.planner.published for what
each class means. The last stdout line is one JSON document with the per-class errors.
"""

from __future__ import annotations

import json

from hpi.planner.published import compare_all, summary


def main() -> None:
    comparisons = compare_all()
    print(f"{'run':42s} {'class':17s} {'plan':30s} {'metric':12s} {'published':>10s} {'hpi':>10s} {'hpi/pub':>8s}")
    for c in comparisons:
        print(f"{c.run_id:42s} {c.run_class:17s} {c.plan_label:30s} {c.metric:12s} {c.published:10.3f} "
              f"{c.predicted:10.3f} {c.ratio:8.2f}")
    stats = summary(comparisons)
    for cls, s in stats.items():
        print(f"{cls}: n={s['n']}, median |error| {s['median_ape']:.0%}, max |error| {s['max_ape']:.0%}")
    print(json.dumps({"rows": len(comparisons), "classes": stats}))


if __name__ == "__main__":
    main()
