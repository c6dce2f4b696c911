"""Time the serving runtime's steps on one GPU, without HTTP: ragged prompt chunks, ragged decode, and the
graphed all-slots decode, on a resident stage of ``--model`` (random weights), one process.

    python benchmarks/serve_steps.py --model llama-3-8b --slots 64 --max-len 1280 [--profile]

Prints one line per case (median of ``--repeats`` after a warm-up) and, with ``--profile``, the top CUDA and CPU
ops of the slowest case. The last stdout line is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--max-len", type=int, default=1280)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()

    import torch

    from hpi.executor.engine import StepRunner
    from hpi.executor.groups import Groups
    from hpi.executor.modeling import ShardSpec, build_stage, load_hf_config
    from hpi.executor.scheduler import Segment, Step
    from hpi.executor.slots import SlotKVCache

    dev = torch.device("cuda", 0)
    config = load_hf_config(a.model)
    stage = build_stage(config, ShardSpec.whole(config.num_hidden_layers), dtype=torch.bfloat16, device=dev, seed=0)
    runner = StepRunner(stage=stage, groups=Groups.alone(), cache=SlotKVCache(a.slots, a.max_len),
                        hidden_size=config.hidden_size, dtype=torch.bfloat16, device=dev, slots_per_group=a.slots,
                        graphs=True)

    def chunks(n_chunks: int, length: int) -> Step:
        return Step(0, 0, tuple(Segment(i, 0, tuple(range(3, 3 + length)), True) for i in range(n_chunks)),
                    tuple(str(i) for i in range(n_chunks)))

    def decode(rows: int, pos: int) -> Step:
        return Step(0, 0, tuple(Segment(i, pos, (5,), True) for i in range(rows)), tuple(str(i) for i in range(rows)))

    cases = {"prefill 1x512": chunks(1, 512), "prefill 4x512": chunks(4, 512), "prefill 16x512": chunks(16, 512),
             "decode 1 @512 (graph)": decode(1, 512), f"decode {a.slots} @512 (graph)": decode(a.slots, 512)}
    eager = StepRunner(stage=stage, groups=Groups.alone(), cache=runner.cache, hidden_size=config.hidden_size,
                       dtype=torch.bfloat16, device=dev, slots_per_group=a.slots, graphs=False)
    results = {}
    for name, step in cases.items():
        times = []
        for _ in range(a.repeats + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            runner.run(step)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        results[name] = statistics.median(times[1:])
        print(f"{name:32s} {results[name] * 1e3:9.2f} ms (first {times[0] * 1e3:.1f} ms)", flush=True)
    for rows in (1, a.slots):
        name = f"decode {rows} @512 (eager ragged)"
        times = []
        for _ in range(a.repeats + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            eager.run(decode(rows, 512))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        results[name] = statistics.median(times[1:])
        print(f"{name:32s} {results[name] * 1e3:9.2f} ms", flush=True)
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            runner.run(cases["prefill 4x512"])
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))
    print(json.dumps({"benchmark": "serve_steps", "model": a.model, "slots": a.slots, "max_len": a.max_len,
                      "device": torch.cuda.get_device_name(dev), "seconds": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
