"""The continuous-batching scheduler, without a model: slots, the waiting queue, both step policies, chunked
prompts, finishing, cancelling and the slot groups of a pipeline."""

from __future__ import annotations

import pytest

from hpi.executor.scheduler import QueueFull, SamplingParams, Scheduler, SegmentOutput, Sequence


def seq(rid: str, n_prompt: int, max_tokens: int = 4, **kw) -> Sequence:
    return Sequence(rid, tuple(range(10, 10 + n_prompt)), SamplingParams(max_tokens=max_tokens, **kw))


def sampled(step, token: int = 5) -> list[SegmentOutput]:
    return [SegmentOutput(token if s.sample else None) for s in step.segments]


def test_requests_take_free_slots_and_wait_for_one_otherwise():
    s = Scheduler(n_slots=2, max_model_len=64, step_tokens=100)
    for rid in "abc":
        s.add(seq(rid, 3))
    step = s.schedule()
    assert [(g.slot, g.start_pos, g.n_tokens, g.sample) for g in step.segments] == [(0, 0, 3, True), (1, 0, 3, True)]
    assert [q.request_id for q in s.waiting] == ["c"]
    events = s.postprocess(step, sampled(step))
    assert [(e.request_id, e.token_ids, e.finish_reason) for e in events] == [("a", (5,), None), ("b", (5,), None)]
    assert all(e.queued_s is not None for e in events)  # the first event says how long it waited
    step = s.schedule()  # decode: each feeds its last token at the position after its prompt
    assert [(g.slot, g.start_pos, g.token_ids) for g in step.segments] == [(0, 3, (5,)), (1, 3, (5,))]
    assert step.decode_only


def test_fused_steps_carry_decode_tokens_and_prompt_chunks_within_the_budget():
    s = Scheduler(n_slots=3, max_model_len=64, step_tokens=6)
    s.add(seq("a", 2))
    s.postprocess(step := s.schedule(), sampled(step))
    s.add(seq("b", 9))
    step = s.schedule()  # a's decode token + 5 of b's 9 prompt tokens
    assert [(g.slot, g.start_pos, g.n_tokens, g.sample) for g in step.segments] == [(0, 2, 1, True), (1, 0, 5, False)]
    assert not step.decode_only
    s.postprocess(step, sampled(step))
    step = s.schedule()  # the rest of b's prompt rides with a's next token; it samples b's first token
    assert [(g.slot, g.start_pos, g.n_tokens, g.sample) for g in step.segments] == [(0, 3, 1, True), (1, 5, 4, True)]


def test_separate_policy_prefills_apart_from_decode():
    s = Scheduler(n_slots=3, max_model_len=64, step_tokens=64, policy="separate")
    s.add(seq("a", 2))
    s.postprocess(step := s.schedule(), sampled(step))
    s.add(seq("b", 3))
    step = s.schedule()
    assert [(g.slot, g.n_tokens) for g in step.segments] == [(1, 3)]  # a waits while b prefills
    s.postprocess(step, sampled(step))
    step = s.schedule()
    assert step.decode_only and [g.slot for g in step.segments] == [0, 1]


def test_stop_tokens_max_tokens_and_the_model_length_finish_a_request_and_free_its_slot():
    s = Scheduler(n_slots=3, max_model_len=8, step_tokens=64)
    s.add(seq("stop", 2, max_tokens=5, stop_token_ids=(2,)))
    s.add(seq("len", 2, max_tokens=1))
    s.add(seq("ctx", 6, max_tokens=2))
    step = s.schedule()
    events = {e.request_id: e for e in s.postprocess(step, [SegmentOutput(2), SegmentOutput(7), SegmentOutput(7)])}
    assert events["stop"].finish_reason == "stop" and events["stop"].token_ids == ()  # EOS is not output
    assert events["len"].finish_reason == "length" and events["len"].token_ids == (7,)
    assert events["ctx"].finish_reason is None
    assert list(s.running) == [2]
    step = s.schedule()
    (e,) = s.postprocess(step, [SegmentOutput(7)])
    assert e.finish_reason == "length" and not s.has_work  # 6 + 2 = max_model_len 8


def test_a_cancelled_request_frees_its_slot_and_its_late_outputs_are_ignored():
    s = Scheduler(n_slots=1, max_model_len=64, step_tokens=64)
    s.add(seq("a", 2))
    s.add(seq("b", 2))
    step = s.schedule()
    assert s.cancel("a").finish_reason == "cancelled" and not s.running
    assert s.postprocess(step, sampled(step)) == []  # a's step was in flight: nothing for anybody
    step = s.schedule()
    assert step.request_ids == ("b",) and step.segments[0].slot == 0
    assert s.cancel("nobody") is None
    s.add(seq("c", 1))
    assert s.cancel("c").finish_reason == "cancelled" and not s.waiting


def test_echo_logprobs_score_each_prompt_position_against_the_next_prompt_token():
    s = Scheduler(n_slots=1, max_model_len=64, step_tokens=3)
    s.add(Sequence("e", (10, 11, 12, 13, 14), SamplingParams(max_tokens=0, prompt_logprobs=1)))
    first = s.schedule()
    assert first.segments[0].prompt_targets == (11, 12, 13) and not first.segments[0].sample
    out = [SegmentOutput(prompt_logprobs=(-1.0, -2.0, -3.0), prompt_top_logprobs=(((1, -0.5),),) * 3)]
    (e,) = s.postprocess(first, out)
    assert [lp for lp, _ in e.prompt_logprobs] == [-1.0, -2.0, -3.0]
    second = s.schedule()
    assert second.segments[0].prompt_targets == (14,) and not second.segments[0].sample  # max_tokens 0
    (e,) = s.postprocess(second, [SegmentOutput(prompt_logprobs=(-4.0,), prompt_top_logprobs=((),))])
    assert e.finish_reason == "length" and e.token_ids == ()


def test_slot_groups_schedule_only_their_own_slots():
    s = Scheduler(n_slots=4, max_model_len=64, step_tokens=64, groups=2)
    for rid in "abcde":
        s.add(seq(rid, 2))
    g0, g1 = s.schedule(0), s.schedule(1)
    assert [g.slot for g in g0.segments] == [0, 1] and [g.slot for g in g1.segments] == [2, 3]
    assert g0.request_ids == ("a", "b") and g1.request_ids == ("c", "d") and s.schedule(0) is not None
    with pytest.raises(ValueError, match=r"n_slots\(3\) % groups\(2\)"):
        Scheduler(n_slots=3, max_model_len=64, step_tokens=8, groups=2)


def test_the_waiting_queue_is_bounded_and_requests_are_checked():
    s = Scheduler(n_slots=1, max_model_len=16, step_tokens=8, max_queue=1)
    s.add(seq("a", 2))
    with pytest.raises(QueueFull):
        s.add(seq("b", 2))
    with pytest.raises(ValueError, match="max_model_len"):
        Scheduler(n_slots=1, max_model_len=16, step_tokens=8).add(seq("long", 14, max_tokens=3))


def test_seeds_are_stable_across_processes_and_requests():
    a = Scheduler(n_slots=1, max_model_len=64, step_tokens=64)
    a.add(seq("req-1", 2, temperature=1.0))
    seg = a.schedule().segments[0]
    assert seg.seed == 1_829_706_545 and seg.draw == 0  # crc32("req-1"): no per-process hash salt
    b = Scheduler(n_slots=1, max_model_len=64, step_tokens=64)
    b.add(seq("req-2", 2, temperature=1.0, seed=7))
    assert b.schedule().segments[0].seed == 7
