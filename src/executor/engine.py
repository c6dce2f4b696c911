"""One rank of ``hpi serve``: run the steps rank 0 decides, in lock-step, on this rank's stage.

The model is built once (the same build as ``hpi run``: groups, stage, ZeRO-3) and stays loaded. Then:

- rank 0 runs the ``hpi.executor.scheduler.Scheduler``, takes requests from the HTTP front
  (``hpi.executor.serve_loop``), and broadcasts each step to every rank as one small message over a gloo
  group (``Control``: a step, an idle beat, or stop). It crosses nodes like any collective;
- every rank runs the step on its stage (``StepRunner``): the first stage embeds the step's tokens, the
  others receive hidden states from the previous stage, the last stage turns the chosen positions' logits
  into tokens and log-probabilities (``sample_outputs``), and its TP rank 0 sends them to rank 0;
- ZeRO-3 needs every rank of a partition group to run the same forwards: they do, because they run the same
  message stream.

Layouts (``hpi.executor.slots``): an eager step is ragged, [1, T] tokens of any mix of prompt chunks and
decode tokens; where the plan graphs its decode (resident, 16-bit, dense, CUDA), a decode-only step replays
a CUDA graph over all slots of its group, [slots, 1], inactive rows masked.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from hpi.executor.groups import Groups
from hpi.executor.meter import RankMeter, RankTotals
from hpi.executor.scheduler import Segment, SegmentOutput, Step
from hpi.executor.slots import DenseDecode, RaggedStep, SlotKVCache
from hpi.executor.spans import COLLECTIVES

PP_SEND, PP_RECV = ("send", "pp"), ("recv", "pp")  # (op, group) keys of the collective timer
IDLE, STOP = "idle", "stop"


@dataclass(frozen=True)
class Control:
    """What every rank receives before every step: ``kind`` step | idle | stop."""

    kind: str
    step: Step | None = None


class Messenger:
    """How a step's ``Control`` reaches every rank without a world-wide barrier, so that pipeline stages can
    work on different steps at once: rank 0 broadcasts it to its stage's TP peers (they run in lock-step
    anyway) and every stage hands it to the next stage's peer of the same TP coordinate, like the hidden
    states. The last stage's TP rank 0 sends each step's outputs back to rank 0. All over gloo (host memory,
    any node); sends are non-blocking so a stage never waits for its successor."""

    def __init__(self, g: Groups, control_group, stage0_tp_group) -> None:
        self.g, self.group, self.stage0_tp = g, control_group, stage0_tp_group
        self.pending: list = []  # send works still in flight (their buffers must stay alive)

    @classmethod
    def create(cls, g: Groups, timeout_s: float) -> "Messenger":
        """Collective over the world: every rank creates the same gloo groups in the same order."""
        from datetime import timedelta

        timeout = timedelta(seconds=timeout_s)
        control = dist.new_group(backend="gloo", timeout=timeout)
        stage0 = dist.new_group(ranks=list(range(g.tp)), backend="gloo", timeout=timeout)  # dp 1: ranks 0..tp-1
        return cls(g, control, stage0)

    def _isend(self, obj: Any, dst: int) -> None:
        self.pending = [w for w in self.pending if not w.is_completed()]
        data = pickle.dumps(obj)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        size = torch.tensor([len(data)], dtype=torch.long)
        self.pending += [dist.isend(size, dst, group=self.group), dist.isend(payload, dst, group=self.group)]

    def _recv(self, src: int) -> Any:
        size = torch.empty(1, dtype=torch.long)
        dist.recv(size, src, group=self.group)
        payload = torch.empty(int(size), dtype=torch.uint8)
        dist.recv(payload, src, group=self.group)
        return pickle.loads(payload.numpy().tobytes())

    def pass_on(self, msg: Control | None) -> Control:
        """Rank 0 gives the message (others None); every rank returns it after handing it down the pipeline."""
        g = self.g
        if g.is_first_stage:
            if g.tp > 1:
                box = [msg]
                dist.broadcast_object_list(box, src=0, group=self.stage0_tp)
                msg = box[0]
        else:
            msg = self._recv(g.prev_rank)
        if not g.is_last_stage:
            self._isend(msg, g.next_rank)
        return msg

    def report(self, outputs: list[SegmentOutput]) -> None:
        """The last stage's TP rank 0 (not rank 0): send a step's outputs to rank 0."""
        self._isend(outputs, 0)

    def outputs(self, source: int) -> list[SegmentOutput]:
        """Rank 0: the next step's outputs from the last stage's reporting rank."""
        return self._recv(source)

    def drain(self) -> None:
        for work in self.pending:
            work.wait()
        self.pending = []


# ---- sampling (the last stage) --------------------------------------------------------------------------
def _top(logprobs: torch.Tensor, k: int) -> list[tuple[tuple[int, float], ...]]:
    """Per row, the k most likely (token id, log-probability) pairs, most likely first."""
    if k <= 0:
        return [()] * logprobs.shape[0]
    values, ids = logprobs.topk(k, dim=-1)
    return [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


def _draw(logits: torch.Tensor, seg: Segment) -> int:
    """One token from one row of logits with the segment's temperature and top-p, seeded by (seed, draw):
    the same token on every rank, whatever else shares the batch."""
    probs = torch.softmax(logits.double().cpu() / seg.temperature, dim=-1)
    if seg.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < seg.top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    gen = torch.Generator().manual_seed((seg.seed * 1_000_003 + seg.draw) % (2**63))
    return int(torch.multinomial(probs, 1, generator=gen))


def sample_outputs(logits: torch.Tensor, segments: tuple[Segment, ...], rows: list[tuple[int, int, int]]
                   ) -> list[SegmentOutput]:
    """Tokens and log-probabilities of each segment. ``logits`` [n, vocab] float32; ``rows[i]`` = (first row of
    segment i's prompt positions, how many, its sampling row or -1)."""
    greedy = logits.argmax(dim=-1).tolist()
    need_lp = any(s.logprobs >= 0 or s.prompt_targets for s in segments)
    logprobs = torch.log_softmax(logits, dim=-1) if need_lp else None
    out = []
    for seg, (first, count, row) in zip(segments, rows):
        prompt_lp, prompt_top = (), ()
        if count:
            lp = logprobs[first : first + count]
            targets = torch.tensor(seg.prompt_targets, device=lp.device)[:, None]
            prompt_lp = tuple(lp.gather(-1, targets)[:, 0].tolist())
            prompt_top = tuple(_top(lp, seg.prompt_logprobs))
        token = logprob = None
        top: tuple = ()
        if row >= 0:
            token = greedy[row] if seg.temperature == 0.0 else _draw(logits[row], seg)
            if seg.logprobs >= 0:
                logprob = float(logprobs[row, token])
                top = _top(logprobs[row : row + 1], seg.logprobs)[0]
        out.append(SegmentOutput(token, logprob, top, prompt_lp, prompt_top))
    return out


def logit_rows(segments: tuple[Segment, ...]) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Which of a ragged step's T tokens need logits (indices into the flattened tokens), and per segment
    (first row of its prompt positions, their count, its sampling row or -1) in that list."""
    index: list[int] = []
    rows = []
    token = 0
    for seg in segments:
        n = seg.n_tokens
        first, count = len(index), len(seg.prompt_targets)
        index += range(token, token + count)  # position j predicts prompt_targets[j]
        row = -1
        if seg.sample:  # the segment's last token: a decode token, or the end of the prompt (never a target)
            row = len(index)
            index.append(token + n - 1)
        rows.append((first, count, row))
        token += n
    return index, rows


# ---- one step on this rank --------------------------------------------------------------------------------
@dataclass
class StepRunner:
    """Runs steps on one rank's stage over its ``SlotKVCache``."""

    stage: Any
    groups: Groups
    cache: SlotKVCache
    hidden_size: int
    dtype: torch.dtype
    device: torch.device
    slots_per_group: int
    graphs: bool = False  # decode-only steps replay a CUDA graph per slot group
    _graphs: dict[tuple[int, int, int], "DenseGraph"] = field(default_factory=dict)  # (group, rows, span) -> graph
    _sending: tuple | None = None  # (work, tensor) of the hidden states last sent
    meter: RankMeter | None = None  # hpi serve's metrics (attached after the warm-up); None: nothing counted

    @property
    def reports_outputs(self) -> bool:
        """The rank that sends each step's outputs to rank 0 (or is rank 0)."""
        g = self.groups
        return g.is_last_stage and g.tp_rank == 0

    def run(self, step: Step) -> list[SegmentOutput] | None:
        """This rank's part of ``step``; the last stage returns the outputs, the others None."""
        if self.graphs and step.decode_only:
            return self._run_dense(step)
        return self._run_ragged(step)

    def _run_ragged(self, step: Step) -> list[SegmentOutput] | None:
        g = self.groups
        ragged = RaggedStep.build(step.segments, self.device)
        if g.is_first_stage:
            x = torch.tensor([[t for s in step.segments for t in s.token_ids]], dtype=torch.long, device=self.device)
        else:
            x = self._recv((1, step.n_tokens, self.hidden_size))
        index, rows = logit_rows(step.segments) if g.is_last_stage else (None, None)
        self.cache.bind(ragged)
        with torch.no_grad():
            logits_index = torch.tensor(index, dtype=torch.long, device=self.device) if index is not None else None
            busy = self._begin(x)
            out = self.stage(x, self.cache, None, logits_index=logits_index)
            self._end(busy, step)
        if not g.is_last_stage:
            return self._send(out)
        return sample_outputs(out, step.segments, rows)

    def _run_dense(self, step: Step) -> list[SegmentOutput] | None:
        g = self.groups
        offset = step.group * self.slots_per_group
        rows = row_bucket(max(seg.slot for seg in step.segments) - offset + 1, self.slots_per_group)
        positions = torch.full((rows,), self.cache.max_len - 1, dtype=torch.long)
        ids = torch.zeros(rows, 1, dtype=torch.long)
        for seg in step.segments:
            positions[seg.slot - offset] = seg.start_pos
            ids[seg.slot - offset, 0] = seg.token_ids[0]
        if g.is_first_stage:
            x = ids.to(self.device)
        else:
            x = self._recv((rows, 1, self.hidden_size))
        span = kv_span(max(seg.start_pos for seg in step.segments) + 1, self.cache.max_len)
        key = (step.group, rows, span)
        graph = self._graphs.get(key)
        if graph is None:  # every rank picks the same shape from the same step: they capture together
            graph = self._graphs[key] = DenseGraph(self.stage, self.cache, offset, span, self.device)
        positions = positions.to(self.device)
        busy = self._begin(x)
        out = graph(x, positions)
        self._end(busy, step)
        if not g.is_last_stage:
            return self._send(out.clone())  # the graph's output buffer is overwritten by the next replay
        rows = [(0, 0, seg.slot - offset) for seg in step.segments]
        return sample_outputs(out, step.segments, rows)

    def _begin(self, x: torch.Tensor):
        """The stage's busy span starts once its input is here (waiting for the previous stage is not busy)."""
        return self.meter.begin(x) if self.meter is not None else None

    def _end(self, token, step: Step) -> None:
        if self.meter is not None:
            self.meter.end(token, step.index)

    def _send(self, hidden: torch.Tensor) -> None:
        """Hand the hidden states to the next stage without waiting for it (it may still be on an earlier
        step); the previous send is complete by then, or waited for here. Timed as a PP send: the wait for
        the previous send plus the enqueue (the transfer itself overlaps the next step)."""
        token = COLLECTIVES.start(hidden)
        if self._sending is not None:
            self._sending[0].wait()
        hidden = hidden.contiguous()
        self._sending = (dist.isend(hidden, dst=self.groups.next_rank), hidden)
        COLLECTIVES.stop(token, PP_SEND)
        return None

    def _recv(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The previous stage's hidden states, timed as a PP recv (the wait for that stage included)."""
        x = torch.empty(*shape, dtype=self.dtype, device=self.device)
        token = COLLECTIVES.start(x)
        dist.recv(x, src=self.groups.prev_rank)
        COLLECTIVES.stop(token, PP_RECV)
        return x


class DenseGraph:
    """A slot group's decode step over all its slots, [slots, 1]: captured once on CUDA, replayed after; run
    eagerly on the CPU through the same buffers (so CPU tests cover everything but the capture)."""

    def __init__(self, stage, cache: SlotKVCache, slot_offset: int, span: int, device: torch.device) -> None:
        self.stage, self.cache, self.offset, self.span, self.device = stage, cache, slot_offset, span, device
        self.x: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.graph = None
        self.output: torch.Tensor | None = None

    def _forward(self) -> torch.Tensor:
        self.cache.bind(DenseDecode(self.positions, slot_offset=self.offset, span=self.span))
        with torch.no_grad():
            return self.stage(self.x, self.cache, None)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.x is None:
            self.x, self.positions = x.clone(), positions.clone()
            if self.device.type == "cuda":
                from hpi.executor.graphs import capture

                self.graph, self.output = capture(self._forward)
        else:
            self.x.copy_(x, non_blocking=True)
            self.positions.copy_(positions, non_blocking=True)
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.output


# ---- the loops ----------------------------------------------------------------------------------------------
@dataclass
class StepStats:
    """What rank 0 measured of one step (the front's metrics)."""

    index: int
    n_tokens: int
    n_segments: int
    decode_only: bool
    seconds: float
    prompt_tokens: int = 0  # of n_tokens, prompt tokens (the rest are decode tokens)
    slots_used: int = 0  # slots holding a request after the step
    engaged_s: float = 0.0  # rank 0's wall seconds with a step in flight, from the start to this step's end
    totals: tuple[RankTotals, ...] | None = None  # every rank's running totals, when rank 0 read them (about 1/s)

    @property
    def kind(self) -> str:
        """decode (every segment one decode token), prefill (prompt tokens only) or mixed."""
        if self.prompt_tokens == 0:
            return "decode"
        return "prefill" if self.prompt_tokens == self.n_tokens else "mixed"


def follow(runner: StepRunner, messenger: Messenger) -> None:
    """A rank other than 0: run every step that reaches it until stop; report outputs if it is the reporter."""
    while True:
        msg = messenger.pass_on(None)
        if msg.kind == STOP:
            messenger.drain()
            return
        if msg.kind == IDLE:
            if runner.meter is not None:  # idle: the last steps' totals reach the store within a beat
                runner.meter.publish()
            continue
        outputs = runner.run(msg.step)
        if runner.reports_outputs:
            messenger.report(outputs)


def warm_up(runner: StepRunner, groups_n: int) -> None:
    """Every rank alike (no message): allocate the cache with a two-token prompt in slot 0, then, where
    decode is graphed, capture each group's decode step. Slot contents left behind are overwritten by the
    next prompt there and never read before (attention reads only positions a sequence has written)."""
    first = Step(0, 0, (Segment(0, 0, (0, 0), True),), ("warm-up",))
    runner.run(first)
    if runner.graphs:
        for group in range(groups_n):
            slot = group * runner.slots_per_group
            runner.run(Step(0, group, (Segment(slot, 1, (0,), True),), ("warm-up",)))


KV_BUCKET = 128  # graphed decode reads keys in spans of this many positions (one graph per span in use)


def row_bucket(needed: int, slots: int) -> int:
    """Rows a graphed decode step runs: the group's first slots, up to the highest busy one, rounded up to a power
    of two (the scheduler hands out the lowest free slot, so busy slots sit at the front). One client decodes
    in a one-row graph, not in all 64 (10.4 ms for 64 rows vs 7.6 ms for one, Llama-3-8B on one H200)."""
    rows = 1
    while rows < needed:
        rows *= 2
    return min(rows, slots)


def kv_span(needed: int, max_len: int) -> int:
    """The key span a graphed decode step reads: ``needed`` rounded up to a bucket, at most the cache's length.
    A graph over the whole cache would read every slot's full length each step (at 64 slots of 1280 tokens an
    8B model's keys and values are 10.7 GB, more than half its weights); buckets keep it near what is used."""
    return min(max_len, -(-needed // KV_BUCKET) * KV_BUCKET)


def default_step_tokens(max_model_len: int) -> int:
    """Tokens a step may carry: large, so that a burst of prompts is prefilled in few steps (each new request waits
    for the steps before its own). Weight-streamed plans pay one stream per step, whatever it carries."""
    return max(max_model_len, 8192)


def cache_bytes(n_slots: int, max_len: int, n_layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of a ``SlotKVCache`` for one stage: keys and values of every slot, position and layer."""
    return 2 * n_slots * max_len * n_layers * kv_heads * head_dim * dtype_bytes

