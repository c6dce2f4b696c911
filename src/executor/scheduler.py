"""Continuous batching for ``hpi serve``: which requests run in the next step. Plain Python, no tensors.

Rank 0 owns one ``Scheduler``. Each step it decides (``schedule``) and every rank runs what it decided; the
sampled tokens come back (``postprocess``) and become events for the HTTP front. Nothing here knows about
ranks, tensors or HTTP, so the policy is unit-tested without a model.

The KV cache has a fixed number of slots (``n_slots``, the plan's batch by default). A request waits in
``waiting`` until a slot is free, takes it at the next step boundary, and frees it the moment it finishes or
is cancelled. Each step holds a list of ``Segment`` s, each some consecutive tokens of one slot's sequence:

- a decode segment: the last sampled token of a running sequence (its key/value not yet in the cache);
- a prefill segment: the next chunk of a prompt, at most ``step_tokens`` tokens in the step in total.

Two policies (``POLICIES``):

- ``fused`` (default; DeepSpeed-FastGen's Dynamic SplitFuse): every step carries all running sequences' decode
  tokens and fills what is left of the token budget with prompt chunks. On a weight-streamed plan one step
  streams every weight once, whatever it carries, so a newcomer's prompt costs the others no extra stream;
- ``separate``: a step is either a prefill of admitted prompts or a decode of everything running (vLLM V0's
  prefill-first order). Kept to measure against (``benchmarks/serve_load.py``).

With pipeline micro-batches the slots are split into ``groups`` contiguous groups; ``schedule(group)`` plans
one group's step, so several groups' steps can be in the pipeline at once.

Positions: a sequence's tokens take cache positions 0, 1, ... of its slot (no left padding), so position
and cache slot agree and a request's tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

POLICIES = ("fused", "separate")
FINISH_REASONS = ("stop", "length", "cancelled", "error")


class QueueFull(Exception):
    """More requests waiting than ``max_queue``: the HTTP front answers 429."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen and when it stops."""

    max_tokens: int  # new tokens to generate at most (0: score the prompt only)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # None: drawn from the request id (still the same on every rank)
    stop_token_ids: tuple[int, ...] = ()  # EOS and friends: the sequence ends there (the token is not output)
    logprobs: int | None = None  # None: none; k >= 0: each new token's log-probability and its top k
    prompt_logprobs: int | None = None  # echo + logprobs: each prompt token's log-probability and top k

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens({self.max_tokens}) must be >= 0")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and 0 < top_p <= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Sequence:
    """One request's state on rank 0."""

    request_id: str
    prompt: tuple[int, ...]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    slot: int | None = None
    computed: int = 0  # tokens of prompt + output whose keys and values are in the cache
    finish_reason: str | None = None
    arrival_s: float = field(default_factory=time.monotonic)

    @property
    def prefilled(self) -> bool:
        return self.computed >= len(self.prompt)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)


@dataclass(frozen=True)
class Segment:
    """Consecutive tokens of one slot's sequence in one step (what every rank receives)."""

    slot: int
    start_pos: int  # cache position of the first token
    token_ids: tuple[int, ...]
    sample: bool  # the last token's logits choose the sequence's next token
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    draw: int = 0  # which token of the sequence is drawn (seeds the draw: the same on every rank and batch)
    logprobs: int = -1  # top-k of the sampled token's distribution; -1: none
    prompt_targets: tuple[int, ...] = ()  # echo logprobs: the prompt token each position predicts
    prompt_logprobs: int = -1  # top-k at those positions; -1: none

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Step:
    """What one forward of every rank computes: the segments of one slot group."""

    index: int
    group: int
    segments: tuple[Segment, ...]
    request_ids: tuple[str, ...]  # per segment (rank 0's bookkeeping; the other ranks ignore it)

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.segments)

    @property
    def decode_only(self) -> bool:
        """Every segment is one sampled token: the step a CUDA graph over all slots can replay."""
        return all(s.n_tokens == 1 and s.sample and not s.prompt_targets for s in self.segments)


@dataclass(frozen=True)
class SegmentOutput:
    """What the last stage sends back for one segment."""

    token_id: int | None = None  # the sampled token (None where the segment does not sample)
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    prompt_logprobs: tuple[float, ...] = ()  # per prompt_targets entry
    prompt_top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()


@dataclass(frozen=True)
class Event:
    """What the HTTP front hears about a request after a step."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[tuple[float, tuple[tuple[int, float], ...]], ...] = ()  # per new token (if asked)
    prompt_logprobs: tuple[tuple[float, tuple[tuple[int, float], ...]], ...] = ()  # per prompt token after the first
    finish_reason: str | None = None
    prompt_tokens: int = 0
    queued_s: float | None = None  # set on the request's first event: arrival to its first step


class Scheduler:
    """Slots, a waiting queue and the step policy (module docstring)."""

    def __init__(self, n_slots: int, max_model_len: int, step_tokens: int, *, policy: str = "fused",
                 groups: int = 1, max_queue: int = 1024) -> None:
        if n_slots < 1 or groups < 1 or n_slots % groups:
            raise ValueError(f"n_slots({n_slots}) % groups({groups}) != 0: each pipeline group needs the same "
                             f"number of slots (>= 1)")
        if step_tokens < 1 or max_model_len < 2:
            raise ValueError(f"step_tokens({step_tokens}) >= 1 and max_model_len({max_model_len}) >= 2 are needed")
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
        self.n_slots, self.max_model_len, self.step_tokens = n_slots, max_model_len, step_tokens
        self.policy, self.groups, self.max_queue = policy, groups, max_queue
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.steps = 0

    # ---- requests --------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
        if not seq.prompt:
            raise ValueError("a prompt needs at least one token")
        if len(seq.prompt) + max(seq.params.max_tokens, 1) > self.max_model_len:
            raise ValueError(f"prompt({len(seq.prompt)}) + max_tokens({seq.params.max_tokens}) > "
                             f"max_model_len({self.max_model_len})")
        self.waiting.append(seq)

    def cancel(self, request_id: str) -> Event | None:
        """Drop a request wherever it is; its slot is free for the next step."""
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                return self._finish(seq, "cancelled")
        for seq in self.running.values():
            if seq.request_id == request_id:
                return self._finish(seq, "cancelled")
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def slots_of(self, group: int) -> range:
        per = self.n_slots // self.groups
        return range(group * per, (group + 1) * per)

    # ---- the step ----------------------------------------------------------------------------------------
    def schedule(self, group: int = 0) -> Step | None:
        """The next step of ``group``'s slots, or None when they have nothing to do."""
        running = [self.running[s] for s in self.slots_of(group) if s in self.running]
        decoding = [s for s in running if s.prefilled]
        prefilling = [s for s in running if not s.prefilled]
        budget = self.step_tokens
        chosen: list[tuple[Sequence, int]] = []  # (sequence, tokens it feeds)
        wants_prefill = bool(prefilling) or (self.waiting and self._free_slot(group) is not None)
        if self.policy == "fused" or not wants_prefill:
            for seq in decoding:
                chosen.append((seq, 1))
                budget -= 1
        if self.policy == "fused" or wants_prefill:
            for seq in prefilling:
                if budget <= 0:
                    break
                n = min(len(seq.prompt) - seq.computed, budget)
                chosen.append((seq, n))
                budget -= n
            while budget > 0 and self.waiting and (slot := self._free_slot(group)) is not None:
                seq = self.waiting.popleft()
                seq.slot = slot
                self.running[slot] = seq
                n = min(len(seq.prompt), budget)
                chosen.append((seq, n))
                budget -= n
        if not chosen:
            return None
        self.steps += 1
        return Step(self.steps, group, tuple(self._segment(seq, n) for seq, n in chosen),
                    tuple(seq.request_id for seq, _ in chosen))

    def _free_slot(self, group: int) -> int | None:
        return next((s for s in self.slots_of(group) if s not in self.running), None)

    def _segment(self, seq: Sequence, n: int) -> Segment:
        p = seq.params
        if seq.prefilled:  # decode: feed the last sampled token
            tokens, start = (seq.output[-1],), seq.length - 1
        else:
            tokens, start = seq.prompt[seq.computed : seq.computed + n], seq.computed
        completes_prompt = start + len(tokens) >= len(seq.prompt)
        sample = completes_prompt and p.max_tokens > len(seq.output)
        targets: tuple[int, ...] = ()
        if p.prompt_logprobs is not None and not seq.prefilled:  # each position predicts the next prompt token
            targets = seq.prompt[start + 1 : start + len(tokens) + 1]
        seed = p.seed if p.seed is not None else _stable_seed(seq.request_id)
        return Segment(seq.slot, start, tuple(tokens), sample, p.temperature, p.top_p, seed, len(seq.output),
                       -1 if p.logprobs is None else p.logprobs, targets,
                       -1 if p.prompt_logprobs is None else p.prompt_logprobs)

    def prompt_tokens(self, step: Step) -> int:
        """Of a step just scheduled (before ``postprocess``), the prompt tokens: its segments whose sequence
        has not finished its prompt yet."""
        return sum(seg.n_tokens for seg in step.segments
                   if seg.slot in self.running and not self.running[seg.slot].prefilled)

    # ---- after the step ---------------------------------------------------------------------------------
    def postprocess(self, step: Step, outputs: list[SegmentOutput]) -> list[Event]:
        """Apply the last stage's outputs; returns one event per request that has news."""
        events: list[Event] = []
        for seg, rid, out in zip(step.segments, step.request_ids, outputs):
            seq = self.running.get(seg.slot)
            if seq is None or seq.request_id != rid or seq.finished:
                continue  # cancelled while the step ran: its slot may already serve another request
            first = seq.computed == 0
            seq.computed = seg.start_pos + seg.n_tokens
            prompt_lp = tuple(zip(out.prompt_logprobs, out.prompt_top_logprobs)) if seg.prompt_targets else ()
            new, lps, reason = (), (), None
            if seg.sample and out.token_id is not None:
                token = out.token_id
                if token in seq.params.stop_token_ids:
                    reason = "stop"
                else:
                    seq.output.append(token)
                    new = (token,)
                    lps = ((out.logprob, out.top_logprobs),) if seg.logprobs >= 0 else ()
            if reason is None and seq.prefilled:
                if len(seq.output) >= seq.params.max_tokens:
                    reason = "length"
                elif seq.length >= self.max_model_len:
                    reason = "length"
            if not (new or prompt_lp or reason or first):
                continue
            events.append(Event(rid, new, lps, prompt_lp, reason, len(seq.prompt),
                                time.monotonic() - seq.arrival_s if first else None))
            if reason is not None:
                self._finish(seq, reason)
        return events

    def _finish(self, seq: Sequence, reason: str) -> Event:
        seq.finish_reason = reason
        if seq.slot is not None and self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
        return Event(seq.request_id, finish_reason=reason, prompt_tokens=len(seq.prompt))


def _stable_seed(request_id: str) -> int:
    """A seed from the request id that every process derives alike (Python's hash() is salted per process)."""
    import zlib

    return zlib.crc32(request_id.encode())
