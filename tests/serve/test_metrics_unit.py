"""``hpi.serve.metrics`` and ``hpi.serve.events`` without a server: per-request figures, the ranks' windows
(bubble, H2D rate), the series a 4-stage TP-4 plan exports, absent-vs-0 decisions, and a slow SSE subscriber
that drops events instead of blocking."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from hpi.executor.engine import StepStats  # noqa: E402
from hpi.executor.meter import RankTotals  # noqa: E402
from hpi.executor.scheduler import Event  # noqa: E402
from hpi.serve.events import EventHub, step_event  # noqa: E402
from hpi.serve.metrics import EXPORTED, TTFT_BUCKETS_S, Metrics, window_figures  # noqa: E402

TP_ALL_REDUCE, TP_ALL_GATHER, PP_SEND, PP_RECV = ("all_reduce", "tp"), ("all_gather", "tp"), ("send", "pp"), \
    ("recv", "pp")


def samples(m: Metrics) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(m: Metrics, name: str) -> float:
    (s,) = samples(m)[name]
    return s.value


def totals_of_plan(tp: int, pp: int, steps: int, busy_s: float = 1.0, h2d: int = 0) -> tuple[RankTotals, ...]:
    """What every rank of a tp x pp plan publishes after ``steps`` eager steps (the keys a real run has)."""
    out = []
    for stage in range(pp):
        for tp_rank in range(tp):
            keys = [TP_ALL_REDUCE] + ([TP_ALL_GATHER] if stage == pp - 1 else []) + \
                   ([PP_SEND] if stage < pp - 1 else []) + ([PP_RECV] if stage > 0 else [])
            out.append(RankTotals(stage * tp + tp_rank, stage, tp_rank, steps - 1, steps, busy_s, h2d,
                                  tuple((k, steps, 0.01 * steps) for k in sorted(keys))))
    return tuple(out)


def test_a_4_stage_tp4_plan_exports_the_series_the_docstring_states():
    m = Metrics("llama", "cpu tp4 pp4 dp1 w16 b8", 8, predicted_decode_step_s=0.05, h2d_ceiling_bytes_s=25e9)
    m.on_step(StepStats(0, 8, 8, True, 0.05, 0, 8, 0.05, totals_of_plan(4, 4, 1)))
    m.on_step(StepStats(1, 8, 8, True, 0.05, 0, 8, 0.10, totals_of_plan(4, 4, 2)))
    s = samples(m)
    assert len(s["hpi_collective_seconds_count"]) == 44 and len(s["hpi_collective_seconds_sum"]) == 44
    assert sum(len(v) for v in s.values()) == 247  # hpi.serve.metrics' docstring
    histogram_series = sum(len(v) for k, v in s.items() if k.rsplit("_", 1)[-1] in ("bucket", "sum", "count")
                           and not k.startswith("hpi_collective"))
    assert histogram_series == 145
    assert {t.name + "_total" if t.type == "counter" else t.name
            for t in text_string_to_metric_families(generate_latest(m.registry).decode())} == \
        EXPORTED - {"hpi_nvme_queue_depth", "hpi_nvme_read_bytes_total"}


def test_requests_are_timed_from_submit_and_counted_once():
    m = Metrics("tiny", "plan", 4)
    m.on_submit("a")
    m.on_event(Event("a", (), prompt_tokens=5, queued_s=0.2))  # a prefill chunk, no token yet
    m.on_event(Event("a", (7,), prompt_tokens=5))
    m.on_event(Event("a", (8,), prompt_tokens=5))
    m.on_event(Event("a", (), finish_reason="length", prompt_tokens=5))
    m.on_event(Event("gone", (9,), finish_reason="cancelled", prompt_tokens=3, queued_s=0.1))  # client left
    assert value(m, "hpi_prompt_tokens_total") == 8 and value(m, "hpi_generation_tokens_total") == 3
    assert value(m, "hpi_time_to_first_token_seconds_count") == 1
    assert value(m, "hpi_inter_token_latency_seconds_count") == 1
    assert value(m, "hpi_e2e_request_latency_seconds_count") == 1  # only requests the front timed
    assert value(m, "hpi_request_queue_time_seconds_sum") == pytest.approx(0.3)
    reasons = {s.labels["finished_reason"]: s.value for s in samples(m)["hpi_requests_total"]}
    assert reasons == {"stop": 0, "length": 1, "cancelled": 1, "error": 0}
    assert m.clocks == {}
    buckets = [s.labels["le"] for s in samples(m)["hpi_time_to_first_token_seconds_bucket"]]
    assert buckets == [repr(b) for b in TTFT_BUCKETS_S] + ["+Inf"]


def test_steps_feed_the_step_histograms_slots_and_absent_figures_stay_absent():
    m = Metrics("tiny", "plan", 4)
    m.on_step(StepStats(0, 5, 1, False, 0.3, 5, 1, 0.3))
    m.on_step(StepStats(1, 3, 2, False, 0.2, 2, 2, 0.5))  # mixed: a prefill step too
    m.on_step(StepStats(2, 2, 2, True, 0.1, 0, 1, 0.6))
    assert value(m, "hpi_prefill_seconds_count") == 2 and value(m, "hpi_prefill_seconds_sum") == pytest.approx(0.5)
    assert value(m, "hpi_decode_step_seconds_count") == 1 and value(m, "hpi_kv_slots_used_ratio") == 0.25
    names = set(samples(m))
    assert "hpi_predicted_decode_step_seconds" not in names and "hpi_h2d_bandwidth_ratio" not in names
    assert "hpi_pipeline_bubble_ratio" not in names  # no rank totals yet
    assert "hpi_nvme_queue_depth" not in names


def test_the_window_pairs_each_ranks_busy_time_with_rank0s_wall_time_to_the_same_step():
    engaged = {4: 10.0, 9: 12.0, 10: 12.5}
    before = {0: RankTotals(0, 0, 0, 4, 5, 3.0, 500), 1: RankTotals(1, 1, 0, 4, 5, 4.0, 500)}
    after = {0: RankTotals(0, 0, 0, 10, 11, 4.0, 1100), 1: RankTotals(1, 1, 0, 9, 10, 5.5, 1000)}
    w = window_figures(before, after, engaged)
    # rank 0: 1.0 busy of 2.5 s; rank 1 (the slowest stage): 1.5 busy of 2.0 s -> bubble 0.25
    assert w.bubble_ratio == pytest.approx(0.25)
    assert w.h2d_bytes_s == pytest.approx(500 / 2.0)  # the largest rate: 500 B over 2.0 s (vs 600 B over 2.5 s)
    assert window_figures(after, after, engaged) is None  # no step in between
    m = Metrics("tiny", "plan", 2, h2d_ceiling_bytes_s=1000.0)
    m.engaged_at.update(engaged)
    m.on_totals(tuple(before.values()))
    m.on_totals(tuple(after.values()))
    assert value(m, "hpi_pipeline_bubble_ratio") == pytest.approx(0.25)
    assert value(m, "hpi_h2d_bandwidth_ratio") == pytest.approx(0.25)
    assert value(m, "hpi_h2d_bytes_total") == 2100


def test_step_events_sum_collectives_and_take_each_stages_busiest_rank():
    totals = {t.rank: t for t in totals_of_plan(2, 2, 3)}
    event = step_event(StepStats(7, 4, 4, True, 0.02, 0, 3, 1.0), totals, 0.1)
    assert event["kind"] == "decode" and event["active_slots"] == 3 and event["step"] == 7
    assert event["collective_s_total"] == pytest.approx({"all_reduce/tp": 0.12, "all_gather/tp": 0.06,
                                                         "send/pp": 0.06, "recv/pp": 0.06})
    assert event["stage_busy_s_total"] == {"0": 1.0, "1": 1.0}


def test_a_slow_subscriber_loses_events_and_never_blocks_the_publisher():
    dropped = []

    async def scenario() -> list[str]:
        hub = EventHub(on_drop=lambda: dropped.append(1), queue_events=2)
        hub.attach(asyncio.get_running_loop())
        stream = hub.stream()
        first = asyncio.ensure_future(stream.__anext__())  # subscribes, then waits for an event
        await asyncio.sleep(0)
        for i in range(5):
            hub.publish({"step": i})  # from the engine's thread in the server: returns at once
        await asyncio.sleep(0.05)
        got = [await first, await stream.__anext__()]
        await stream.aclose()
        assert hub.subscribers == set()
        return got

    got = asyncio.run(scenario())
    assert got == ['data: {"step":0}\n\n', 'data: {"step":1}\n\n']
    assert len(dropped) == 3  # the queue holds 2 until the subscriber reads: steps 2, 3 and 4 dropped


def test_the_first_window_starts_at_the_servers_start():
    """Ranks' first totals (no step yet) are the baseline: steps that all fall between two reads still give a
    window (a short burst after start-up shows its bubble)."""
    m = Metrics("tiny", "plan", 2)
    m.on_totals((RankTotals(0, 0, 0, -1, 0, 0.0, 0),))
    m.on_step(StepStats(11, 1, 1, True, 0.02, 0, 1, 0.2, (RankTotals(0, 0, 0, 11, 11, 0.15, 0),)))
    assert value(m, "hpi_pipeline_bubble_ratio") == pytest.approx(0.25)
