"""Per-rank counting for ``hpi serve``'s metrics: spans timed without synchronizing, totals published to a c10d
store at a bounded rate and read back by rank 0, the prompt tokens of a scheduled step, the bubble rule."""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")

from hpi.executor import meter  # noqa: E402
from hpi.executor.meter import RankMeter, RankTotals, TotalsReader  # noqa: E402
from hpi.executor.record import bubble_ratio  # noqa: E402
from hpi.executor.scheduler import SamplingParams, Scheduler, Sequence  # noqa: E402
from hpi.executor.spans import SpanTimer  # noqa: E402


def test_span_timer_counts_host_spans_per_key_and_switches_off():
    timer = SpanTimer()
    for _ in range(3):
        token = timer.start(torch.zeros(1))
        time.sleep(0.01)
        timer.stop(token, ("all_reduce", "tp"))
    timer.stop(timer.start(), ("recv", "pp"))
    snap = timer.snapshot()
    assert snap[("all_reduce", "tp")][0] == 3 and snap[("all_reduce", "tp")][1] >= 0.03
    assert snap[("recv", "pp")][0] == 1
    assert timer.total() == pytest.approx(sum(s for _, s in snap.values()))
    timer.enabled = False
    timer.stop(timer.start(torch.zeros(1)), ("all_reduce", "tp"))
    assert timer.snapshot()[("all_reduce", "tp")][0] == 3  # off: nothing counted
    assert timer.total(reset=True) > 0 and timer.snapshot() == {}


def test_rank_totals_survive_the_store_round_trip():
    t = RankTotals(3, 1, 1, 17, 18, 0.25, 18 * 1000, ((("all_reduce", "tp"), 144, 0.5), (("recv", "pp"), 18, 0.1)))
    assert RankTotals.from_json(t.to_json()) == t
    assert RankTotals.from_json(t.to_json().encode()) == t


def test_ranks_publish_at_a_bounded_rate_and_rank0_reads_them_all(monkeypatch):
    store = torch.distributed.HashStore()
    monkeypatch.setattr(meter, "PUBLISH_EVERY_S", 60.0)
    meters = [RankMeter(store, r, stage=r, tp_rank=0, h2d_bytes_per_forward=1000, collectives=SpanTimer(),
                        busy=SpanTimer()) for r in range(2)]
    reader = TotalsReader(store, 2)
    meters[0].publish(force=True)
    assert reader.maybe_read() is None  # rank 1 has not published yet: no read, no wait
    meters[1].publish(force=True)
    for step in range(5):
        for m in meters:
            m.end(m.begin(torch.zeros(1)), step)  # within PUBLISH_EVERY_S: counted, not published
    first = reader.maybe_read()
    assert [(t.rank, t.stage, t.forwards, t.last_step, t.h2d_bytes) for t in first] == [(0, 0, 0, -1, 0),
                                                                                        (1, 1, 0, -1, 0)]
    assert reader.maybe_read() is None  # at most one read per READ_EVERY_S
    for m in meters:
        m.publish(force=True)
    reader.read_at = float("-inf")
    latest = reader.maybe_read()
    assert [(t.forwards, t.last_step, t.h2d_bytes) for t in latest] == [(5, 4, 5000)] * 2
    assert all(t.busy_s > 0 for t in latest)


def test_prompt_tokens_of_a_step_count_only_unfinished_prompts():
    s = Scheduler(n_slots=2, max_model_len=64, step_tokens=64)
    s.add(Sequence("a", (1, 2, 3), SamplingParams(max_tokens=4)))
    step = s.schedule(0)
    assert s.prompt_tokens(step) == 3
    from hpi.executor.scheduler import SegmentOutput

    s.postprocess(step, [SegmentOutput(token_id=9)])
    s.add(Sequence("b", (4, 5), SamplingParams(max_tokens=4)))
    mixed = s.schedule(0)
    assert mixed.n_tokens == 3 and s.prompt_tokens(mixed) == 2  # a's decode token + b's prompt


def test_bubble_is_the_slowest_stages_idle_share():
    assert bubble_ratio(2.0, 1.5) == 0.25
    assert bubble_ratio(0.0, 1.0) == 0.0
    assert bubble_ratio(1.0, 1.2) == 0.0  # busier than the wall (clock skew): no negative bubble
