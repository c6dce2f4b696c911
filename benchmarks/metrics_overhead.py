"""What ``hpi serve``'s metrics cost a decode step: the same model in one process, decode steps with the metrics on
and off interleaved (on, off, on, off, ...), so drift (clocks, thermals, other load) hits both alike.

    python benchmarks/metrics_overhead.py --device cpu                      # tiny-llama, fp32, eager decode
    python benchmarks/metrics_overhead.py --device cuda --model llama-3-8b  # random weights, bf16, graphed decode

On: what a rank does per step with metrics on (``hpi.executor.serve_loop``): the stage's busy span
(``RankMeter.begin/end``: device events on CUDA), collective timing enabled, its totals published to a c10d
TCPStore at most every ``PUBLISH_EVERY_S``, rank 0's ``StepStats`` with the prompt-token count and a totals read at
most every ``READ_EVERY_S``. Off: ``--no-metrics``' path (no meter, collective timing off). Each step's wall time
is taken between two synchronizations (the harness's, the same for both), so the ratio on/off is the metrics'
share of a step. The front's per-step work (``Metrics.on_step`` + one ``on_event`` per request + the SSE event)
runs in another process in ``hpi serve``; it is timed here on its own and reported as µs per step.

The last stdout line is one JSON document (device, model, steps, medians, ratio, per-step costs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", default=None, help="catalogue name (default: tiny-llama on cpu, llama-3-8b on cuda)")
    p.add_argument("--slots", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--position", type=int, default=512, help="cache position of the decode tokens (default 512)")
    p.add_argument("--steps", type=int, default=400, help="decode steps per side (default 400)")
    a = p.parse_args()

    import torch

    from hpi.executor import meter as meter_module
    from hpi.executor.engine import StepRunner, StepStats, warm_up
    from hpi.executor.groups import Groups
    from hpi.executor.meter import RankMeter, TotalsReader
    from hpi.executor.modeling import ShardSpec, build_stage, load_hf_config
    from hpi.executor.scheduler import Event, Segment, Step
    from hpi.executor.slots import SlotKVCache
    from hpi.executor.spans import COLLECTIVES, SpanTimer
    from hpi.serve.events import EventHub, step_event
    from hpi.serve.metrics import Metrics

    model = a.model or ("llama-3-8b" if a.device == "cuda" else "tiny-llama")
    dev = torch.device("cuda", 0) if a.device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    config = load_hf_config(model)
    stage = build_stage(config, ShardSpec.whole(config.num_hidden_layers), dtype=dtype, device=dev, seed=0)
    max_len = max(1024, a.position + 2)
    runner = StepRunner(stage=stage, groups=Groups.alone(), cache=SlotKVCache(a.slots, max_len),
                        hidden_size=config.hidden_size, dtype=dtype, device=dev, slots_per_group=a.slots,
                        graphs=a.device == "cuda")
    warm_up(runner, 1)
    store = torch.distributed.TCPStore("127.0.0.1", 0, 1, True)  # the kind of store torchrun gives the ranks
    rank_meter = RankMeter(store, 0, 0, 0, 0, COLLECTIVES, SpanTimer())
    rank_meter.publish(force=True)
    reader = TotalsReader(store, 1)
    step_of = [Step(i, 0, tuple(Segment(s, a.position, (5,), True) for s in range(a.slots)),
                    tuple(str(s) for s in range(a.slots))) for i in range(2 * a.steps + 8)]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def one(step: Step, on: bool) -> float:
        runner.meter = rank_meter if on else None
        COLLECTIVES.enabled = on
        sync()
        t0 = time.perf_counter()
        runner.run(step)
        if on:  # rank 0's per-step bookkeeping in Leader._collect
            StepStats(step.index, step.n_tokens, len(step.segments), step.decode_only, 0.0, 0, a.slots, 0.0,
                      reader.maybe_read())
        sync()
        return time.perf_counter() - t0

    for i in range(8):  # warm-up of both paths (graphs captured by warm_up already)
        one(step_of[i], on=i % 2 == 0)
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(2 * a.steps):
        on = i % 2 == 0
        times[on].append(one(step_of[8 + i], on))
    on_s, off_s = statistics.median(times[True]), statistics.median(times[False])
    measured = rank_meter.totals()  # the busy span the meter took of the "on" steps (device events on CUDA)
    rank_meter.busy.fold(wait=True)
    busy_per_step = rank_meter.busy.seconds[("stage", "busy")] / measured.forwards
    mean_on, mean_off = statistics.fmean(times[True]), statistics.fmean(times[False])

    # the rank-side bookkeeping alone, host time per step (no model work): busy span + publish check + read check
    n = 2000
    like = torch.zeros(1, device=dev)
    t0 = time.perf_counter()
    for i in range(n):
        rank_meter.end(rank_meter.begin(like), i)
        reader.maybe_read()
    sync()
    rank_us = (time.perf_counter() - t0) / n * 1e6

    # the front's per-step work (another process in hpi serve): step histogram, one event per request, SSE event
    metrics = Metrics(model, "bench", a.slots)
    hub = EventHub()
    totals = {0: rank_meter.totals()}
    stats = StepStats(0, a.slots, a.slots, True, on_s, 0, a.slots, 1.0, None)
    events = [Event(str(s), (7,), prompt_tokens=a.position) for s in range(a.slots)]
    for s in range(a.slots):
        metrics.on_submit(str(s))
    t0 = time.perf_counter()
    for i in range(n):
        metrics.on_step(StepStats(i, a.slots, a.slots, True, on_s, 0, a.slots, float(i), None))
        for event in events:
            metrics.on_event(event)
        step_event(stats, totals, None)
        hub.publish({})
    front_us = (time.perf_counter() - t0) / n * 1e6

    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "model": model,
              "dtype": str(dtype).replace("torch.", ""), "graphs": runner.graphs, "slots": a.slots,
              "position": a.position, "steps_per_side": a.steps, "publish_every_s": meter_module.PUBLISH_EVERY_S,
              "median_step_s": {"on": on_s, "off": off_s}, "mean_step_s": {"on": mean_on, "off": mean_off},
              "ratio_on_off_median": on_s / off_s, "ratio_on_off_mean": mean_on / mean_off,
              "rank_bookkeeping_us_per_step": rank_us, "front_us_per_step": front_us,
              "rank_bookkeeping_share_of_step": rank_us / 1e6 / off_s,
              "meter_busy_s_per_on_step": busy_per_step}
    print(f"{model} on {result['device']}: decode step median {off_s * 1e3:.3f} ms off, {on_s * 1e3:.3f} ms on "
          f"(ratio {on_s / off_s:.4f}; means {mean_on / mean_off:.4f}); rank bookkeeping {rank_us:.1f} µs/step "
          f"({rank_us / 1e6 / off_s:.2%} of a step); front {front_us:.1f} µs/step; the meter's busy span "
          f"{busy_per_step * 1e3:.3f} ms/step", flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
