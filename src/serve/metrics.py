"""Every metric ``hpi serve`` exports at ``GET /metrics`` (Prometheus text format): the one place that names them.

Names follow Prometheus practice (``hpi_`` prefix, no colons, base units, ``_total`` on counters, ratios 0-1).
``EXPORTED`` lists each family by the name PromQL uses (a histogram or summary by its base name, whose series are
``_bucket`` / ``_sum`` / ``_count``; a counter with ``_total``). Each server has its own ``CollectorRegistry``
(several servers may share a test process). Labels: ``model`` (the served name) and ``plan`` (the plan's label)
on every series; ``finished_reason`` on ``hpi_requests_total``; ``op``, ``group``, ``stage``, ``tp_rank`` only on
``hpi_collective_seconds``, which is per rank.

Where the figures come from:

- requests (the front's clock, ``EngineClient``): TTFT = submit to the first generated token's event; ITL = the
  gap between a request's consecutive token events; e2e = submit to the finishing event; queue time = rank 0's
  arrival of the request to its first step (``Event.queued_s``). Prompt tokens are counted once a request's
  prompt was first scheduled, generated tokens as they arrive, ``hpi_requests_total`` when a request finishes
  (the engine's reasons: stop, length, cancelled, error; a stop string ends a request as cancelled on the
  ranks: the client still sees "stop");
- steps (rank 0's ``StepStats``): ``hpi_prefill_seconds`` observes each step that carries prompt tokens (prefill
  or mixed), ``hpi_decode_step_seconds`` each decode-only step, both rank 0's wall time from broadcast to
  outputs; ``hpi_kv_slots_used_ratio`` = slots holding a request / slots after the last step;
- per rank (``hpi.executor.meter``: every rank's running totals, read by rank 0 about once a second):
  ``hpi_collective_seconds{op,group,stage,tp_rank}`` (a summary: count and seconds; device events on CUDA,
  host clock on the CPU; TP all_reduce / all_gather and PP send / recv; a CUDA-graphed decode step's
  collectives cannot be timed and are not counted), ``hpi_h2d_bytes_total`` (every rank's forwards x the
  ZeRO-3 host->device bytes per forward ``hpi run`` counts), ``hpi_pipeline_bubble_ratio`` and
  ``hpi_h2d_bandwidth_ratio`` over the window between two reads (``window_figures``);
- the NVMe drive under ``--nvme-path`` (``hpi.executor.diskstats``, read at each scrape).

What cannot apply is absent, not 0: ``hpi_predicted_decode_step_seconds`` and ``hpi_h2d_bandwidth_ratio`` need a
profile (``--hardware``); ``hpi_nvme_*`` need ``--offload nvme`` on a block device; ``hpi_pipeline_bubble_ratio``
and ``hpi_h2d_bandwidth_ratio`` appear after the first window with steps. ``hpi_h2d_bytes_total`` is 0 for a
plan that streams nothing (a resident plan copies no weights).

Series: a 4-stage TP-4 plan (16 ranks) with a profile exports 247 series after its first steps: 88 for
``hpi_collective_seconds`` (44 label sets: every rank's TP all_reduce, the last stage's TP all_gather, PP send on
stages 0-2 and recv on stages 1-3; a count and a sum each), 145 for the six histograms (their buckets, +Inf, sum
and count), 4 for ``hpi_requests_total`` and 10 single series (``tests/serve/test_metrics_unit.py`` counts them). The
count depends on the plan only through ``hpi_collective_seconds``; the NVMe gauges add 2 where they apply.

Buckets are vLLM V1's (``vllm/v1/metrics/loggers.py``, the values serving.md quotes): TTFT 0.001 ... 2560 s, ITL
0.01 ... 80 s, request latencies 0.3 ... 7680 s. Steps use the TTFT buckets: from 1 ms (a graphed decode step)
to 2560 s (a 1T model streamed from NVMe).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from hpi.executor import diskstats
from hpi.executor.record import bubble_ratio
from hpi.executor.scheduler import FINISH_REASONS

disable_created_metrics()  # no *_created series: they double every counter's series and no dashboard reads them

TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                  40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                 80.0)
REQUEST_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                     480.0, 960.0, 1920.0, 7680.0)
STEP_BUCKETS_S = TTFT_BUCKETS_S

HISTOGRAMS = {  # name: (help, buckets)
    "hpi_time_to_first_token_seconds": ("Time from a request's arrival at the front to its first generated token.",
                                        TTFT_BUCKETS_S),
    "hpi_inter_token_latency_seconds": ("Time between consecutive generated tokens of a request.", ITL_BUCKETS_S),
    "hpi_e2e_request_latency_seconds": ("Time from a request's arrival at the front to its last event.",
                                        REQUEST_BUCKETS_S),
    "hpi_request_queue_time_seconds": ("Time a request waited on rank 0 before its first step.", REQUEST_BUCKETS_S),
    "hpi_prefill_seconds": ("Wall time of each step that carries prompt tokens (prefill or mixed), on rank 0.",
                            STEP_BUCKETS_S),
    "hpi_decode_step_seconds": ("Wall time of each decode-only step, on rank 0.", STEP_BUCKETS_S),
}
COUNTERS = {  # name as exposed (with _total): help
    "hpi_prompt_tokens_total": "Prompt tokens of the requests that reached a step.",
    "hpi_generation_tokens_total": "Generated tokens sent to clients.",
    "hpi_requests_total": "Finished requests by the engine's finish reason.",
    "hpi_events_dropped_total": "Step events /v1/events dropped because a subscriber did not keep up.",
}
GAUGES = {
    "hpi_requests_running": "Requests with at least one event and no finish yet.",
    "hpi_requests_waiting": "Requests submitted to rank 0 and not yet scheduled.",
    "hpi_kv_slots_used_ratio": "KV-cache slots holding a request after the last step / all slots.",
    "hpi_predicted_decode_step_seconds": "The planner's decode step for the running plan (absent without "
                                         "--hardware).",
}
RANK_FAMILIES = {  # the per-rank collector's families
    "hpi_collective_seconds": "Seconds in collectives per rank: device events on CUDA, host clock on CPU/gloo "
                              "(graphed decode steps are not timed).",
    "hpi_pipeline_bubble_ratio": "The slowest stage's idle share of rank 0's busy wall time over the last window "
                                 "(absent before the first window with steps).",
    "hpi_h2d_bytes_total": "Bytes ZeRO-3 copied host->device, all ranks (0: the plan streams nothing).",
    "hpi_h2d_bandwidth_ratio": "Achieved host->device rate of the busiest rank over the last window / the "
                               "profile's pinned ceiling (absent without --hardware).",
    "hpi_nvme_read_bytes_total": "Bytes the --nvme-path drive read since the server started (absent without "
                                 "NVMe offload on a block device).",
    "hpi_nvme_queue_depth": "Average requests in flight on the --nvme-path drive since the previous scrape "
                            "(absent without NVMe offload on a block device).",
}
EXPORTED: frozenset[str] = frozenset({*HISTOGRAMS, *COUNTERS, *GAUGES, *RANK_FAMILIES})
ENGAGED_HISTORY = 4096  # steps whose rank-0 engaged time is kept to pair with the ranks' totals


@dataclass(frozen=True)
class Window:
    """What the ranks did between two reads of their totals (``window_figures``)."""

    bubble_ratio: float
    h2d_bytes_s: float  # the busiest rank's host->device rate while steps ran


def window_figures(before: dict[int, Any], after: dict[int, Any], engaged_at: dict[int, float]) -> Window | None:
    """Per rank, its busy seconds and H2D bytes between two of its totals against rank 0's engaged wall time
    between the two steps those totals end at. The bubble is ``bubble_ratio`` of the busiest rank (the slowest
    stage); the H2D rate the largest. None when no rank finished a step in between."""
    shares, rates = [], []
    for rank, now in after.items():
        then = before.get(rank)
        if then is None or now.last_step not in engaged_at or then.last_step not in engaged_at:
            continue
        wall = engaged_at[now.last_step] - engaged_at[then.last_step]
        if wall <= 0:
            continue
        shares.append((now.busy_s - then.busy_s, wall))
        rates.append((now.h2d_bytes - then.h2d_bytes) / wall)
    if not shares:
        return None
    busy, wall = max(shares, key=lambda bw: bw[0] / bw[1])
    return Window(bubble_ratio(wall, busy), max(rates))


class Metrics:
    """One server's metrics: ``on_submit`` / ``on_event`` / ``on_step`` / ``on_totals`` from the engine client,
    ``registry`` for ``/metrics``."""

    def __init__(self, model: str, plan: str, n_slots: int, *, predicted_decode_step_s: float | None = None,
                 h2d_ceiling_bytes_s: float | None = None, nvme_path: str | None = None) -> None:
        self.labels = (model, plan)
        self.n_slots = n_slots
        self.registry = CollectorRegistry()
        r, names = self.registry, ("model", "plan")
        self.hist = {name: Histogram(name, text, names, buckets=buckets, registry=r).labels(*self.labels)
                     for name, (text, buckets) in HISTOGRAMS.items()}
        counter = {name: Counter(name, text, names + (("finished_reason",) if name == "hpi_requests_total" else ()),
                                 registry=r) for name, text in COUNTERS.items()}
        self.prompt_tokens = counter["hpi_prompt_tokens_total"].labels(*self.labels)
        self.generation_tokens = counter["hpi_generation_tokens_total"].labels(*self.labels)
        self.events_dropped = counter["hpi_events_dropped_total"].labels(*self.labels)
        self.finished = {reason: counter["hpi_requests_total"].labels(*self.labels, reason)
                         for reason in FINISH_REASONS}
        gauge = {name: Gauge(name, text, names, registry=r) for name, text in GAUGES.items()
                 if name != "hpi_predicted_decode_step_seconds" or predicted_decode_step_s is not None}
        self.running = gauge["hpi_requests_running"].labels(*self.labels)
        self.waiting = gauge["hpi_requests_waiting"].labels(*self.labels)
        self.slots_used = gauge["hpi_kv_slots_used_ratio"].labels(*self.labels)
        if predicted_decode_step_s is not None:
            gauge["hpi_predicted_decode_step_seconds"].labels(*self.labels).set(predicted_decode_step_s)
        self.ranks = RankCollector(self.labels, h2d_ceiling_bytes_s, nvme_path)
        r.register(self.ranks)
        self.clocks: dict[str, list[float]] = {}  # request id -> [submitted, last token] (monotonic)
        # step index -> rank 0's engaged seconds; -1 (no step yet, a rank's first totals) is the start: 0 s
        self.engaged_at: OrderedDict[int, float] = OrderedDict({-1: 0.0})

    def watch(self, running, waiting) -> None:
        """Read the request gauges at scrape time: ``running()`` / ``waiting()`` count them."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)

    # ---- requests (the front's view) ---------------------------------------------------------------------
    def on_submit(self, request_id: str) -> None:
        self.clocks[request_id] = [time.monotonic(), 0.0]

    def forget(self, request_id: str) -> None:
        self.clocks.pop(request_id, None)

    def on_event(self, event) -> None:
        """One ``hpi.executor.scheduler.Event`` of a request, as it reaches the front."""
        now = time.monotonic()
        clock = self.clocks.get(event.request_id)
        if event.queued_s is not None:  # the request's first event: its prompt went into a step
            self.prompt_tokens.inc(event.prompt_tokens)
            self.hist["hpi_request_queue_time_seconds"].observe(event.queued_s)
        if event.token_ids:
            self.generation_tokens.inc(len(event.token_ids))
            if clock is not None:
                first = clock[1] == 0.0
                name = "hpi_time_to_first_token_seconds" if first else "hpi_inter_token_latency_seconds"
                self.hist[name].observe(now - (clock[0] if first else clock[1]))
                clock[1] = now
        if event.finish_reason is not None:
            self.finished[event.finish_reason].inc()
            if clock is not None:
                self.hist["hpi_e2e_request_latency_seconds"].observe(now - clock[0])
                self.forget(event.request_id)

    # ---- steps and ranks (rank 0's view) --------------------------------------------------------------------
    def on_step(self, stats) -> None:
        """One ``hpi.executor.engine.StepStats``."""
        name = "hpi_decode_step_seconds" if stats.kind == "decode" else "hpi_prefill_seconds"
        self.hist[name].observe(stats.seconds)
        self.slots_used.set(stats.slots_used / self.n_slots)
        self.engaged_at[stats.index] = stats.engaged_s
        while len(self.engaged_at) > ENGAGED_HISTORY:
            self.engaged_at.popitem(last=False)
        if stats.totals is not None:
            self.on_totals(stats.totals)

    def on_totals(self, totals) -> None:
        """Every rank's running totals (``hpi.executor.meter.RankTotals``)."""
        self.ranks.update({t.rank: t for t in totals}, self.engaged_at)


class RankCollector:
    """The families computed from the ranks' totals and the NVMe drive, at each scrape (``RANK_FAMILIES``)."""

    def __init__(self, labels: tuple[str, str], h2d_ceiling_bytes_s: float | None, nvme_path: str | None) -> None:
        self.labels, self.ceiling, self.nvme_path = labels, h2d_ceiling_bytes_s, nvme_path
        self.totals: dict[int, Any] = {}
        self.window: Window | None = None
        self.disk_start = diskstats.snapshot(nvme_path) if nvme_path else None
        self.disk_last = self.disk_start

    def update(self, totals: dict[int, Any], engaged_at: dict[int, float]) -> None:
        window = window_figures(self.totals, totals, engaged_at)
        if window is not None:
            self.window = window
        self.totals = totals

    def collect(self):
        names = ["model", "plan"]
        coll = SummaryMetricFamily("hpi_collective_seconds", RANK_FAMILIES["hpi_collective_seconds"],
                                   labels=names + ["op", "group", "stage", "tp_rank"])
        for t in sorted(self.totals.values(), key=lambda t: t.rank):
            for (op, group), n, seconds in t.collectives:
                coll.add_metric([*self.labels, op, group, str(t.stage), str(t.tp_rank)], n, seconds)
        yield coll
        yield _one(CounterMetricFamily, "hpi_h2d_bytes", "hpi_h2d_bytes_total", self.labels,
                   sum(t.h2d_bytes for t in self.totals.values()))
        if self.window is not None:
            yield _one(GaugeMetricFamily, "hpi_pipeline_bubble_ratio", "hpi_pipeline_bubble_ratio", self.labels,
                       self.window.bubble_ratio)
            if self.ceiling:
                yield _one(GaugeMetricFamily, "hpi_h2d_bandwidth_ratio", "hpi_h2d_bandwidth_ratio", self.labels,
                           self.window.h2d_bytes_s / self.ceiling)
        yield from self._nvme()

    def _nvme(self):
        now = diskstats.snapshot(self.nvme_path) if self.disk_start is not None else None
        if now is None:
            return
        since_start = diskstats.between(self.disk_start, now)
        since_last = diskstats.between(self.disk_last, now)
        self.disk_last = now
        yield _one(CounterMetricFamily, "hpi_nvme_read_bytes", "hpi_nvme_read_bytes_total", self.labels,
                   since_start.read_bytes if since_start else 0)
        yield _one(GaugeMetricFamily, "hpi_nvme_queue_depth", "hpi_nvme_queue_depth", self.labels,
                   since_last.avg_queue_depth if since_last else 0.0)


def _one(kind, name: str, exported: str, labels: tuple[str, str], value: float):
    family = kind(name, RANK_FAMILIES[exported], labels=["model", "plan"])
    family.add_metric(list(labels), value)
    return family
