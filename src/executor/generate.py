"""Token generation across pipeline stages, in lock-step, with our own loop (no ``model.generate``).

Why our own loop: transformers' ``generate`` cannot split a model into stages, and its ``synced_gpus``
stop check all-reduces over the WORLD group, which deadlocks when only a subgroup generates under
ZeRO-3. Here every rank runs exactly the same number of forwards: ``gen_len`` in benchmark mode; in chat
mode, until a world-wide all-reduce of "all done" flags says stop (one tiny collective per step).

One forward = every micro-batch through this rank's stage (GPipe order, forward only):

    first stage:  ids (prompt, or the tokens the last stage sent back)  -> stage -> send hidden to next
    middle stage: recv hidden from prev                                 -> stage -> send hidden to next
    last stage:   recv hidden from prev                                 -> stage -> logits -> sample
                  -> send the tokens back to the first stage (unless this was the last forward)

Sends are ``isend`` (waited at the end of the forward), receives block: stage s works on micro-batch
j+1 while stage s+1 works on j, and the first stage's next forward of micro-batch j waits only for j's
token, so decode steps overlap across micro-batches (the steady state the planner assumes).
TP ranks of a stage all receive the same inputs (each talks to its own peer with the same tp and dp
coordinates) and produce identical tokens: greedy is deterministic and sampling draws from a generator
seeded by (seed, forward, micro-batch) on the CPU, the same on every rank.

Prompts of unequal length are left-padded to the longest (``left_pad``), as transformers' ``generate``
does for decoder-only models, so that every row's next token sits in the same last column. What is real
and what is padding is a ``LeftPadding`` (per-row lengths and the padded width): every rank derives it
from the spec (each tokenizes the prompts itself), so non-first stages, which never see the ids, and the
TP ranks of a stage all hold the same one without a message. From it, per micro-batch (its rows sliced
like the ids) and per forward:

- the 2D attention mask [rows, prompt_len + forward]: the prompt's mask (0 on pads, 1 on tokens) with one
  column of ones per token generated so far; the stage turns it into transformers' own 4D causal (or
  sliding-window) mask, so pads are never attended;
- the position ids, per row: the prompt's real tokens take 0..len-1 (cumsum(mask) - 1, pads clamped to 0,
  exactly as ``generate`` makes them), and a decode forward's token of row r takes len_r + forward - 1.
  RoPE and OPT's learned positions use these; the KV cache stays indexed by the shared absolute
  ``cache_position`` (one slot per column, pads included).

A micro-batch without padding (every row full length, e.g. seeded random ids in benchmark mode) passes
no mask and no positions: the stage keeps its unpadded fast path (sdpa's own causal rule).

With ``decode_graphs`` every micro-batch's cache is a ``StaticKVCache`` sized for the whole generation, the
prefill runs eagerly into it, and each decode forward of a micro-batch replays its ``DecodeGraph``
(``hpi.executor.graphs``); the padding mask then spans the cache's slots (ones past the prompt: the causal rule
hides the future ones). The caches and graphs stay with the generator (``KeptSteps``): the next generation of the
same shapes, a warm-up's measured run above all, rewinds and replays them instead of capturing again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from hpi.executor.graphs import DecodeGraph, KeptSteps, StaticKVCache, compiled_step
from hpi.executor.groups import Groups
from hpi.executor.skinny_gemm import install as install_skinny
from hpi.executor.skinny_gemm import use_skinny


@dataclass
class StepTimes:
    """Wall-clock marks of one rank, seconds since the generation started."""

    forward_end_s: list[float] = field(default_factory=list)  # end of each forward (all micro-batches)
    busy_s: list[float] = field(default_factory=list)  # time inside the stage module during each forward
    capture_s: list[float] = field(default_factory=list)  # each micro-batch's first graphed step (DecodeGraph)


@dataclass(frozen=True)
class Sampler:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __call__(self, logits: torch.Tensor, forward: int, micro_batch: int) -> torch.Tensor:
        """[b, vocab] float32 logits -> [b] int64 token ids, identical on every rank given the same logits."""
        if self.temperature == 0.0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float().cpu() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(dim=-1) - sorted_p < self.top_p
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + forward * 1_009 + micro_batch)
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1).to(logits.device)


@dataclass(frozen=True)
class LeftPadding:
    """Which columns of a left-padded prompt batch hold real tokens: row r has its ``lengths[r]`` tokens
    right-aligned in ``prompt_len`` columns (the first ``prompt_len - lengths[r]`` are pads)."""

    lengths: tuple[int, ...]
    prompt_len: int

    def __post_init__(self) -> None:
        bad = [n for n in self.lengths if not 1 <= n <= self.prompt_len]
        if bad:
            raise ValueError(f"prompt lengths {bad} are not in [1, prompt_len({self.prompt_len})]: "
                             f"every row needs at least one token and fits the padded width")

    @property
    def is_padded(self) -> bool:
        return any(n != self.prompt_len for n in self.lengths)

    def rows(self, start: int, stop: int) -> "LeftPadding":
        """The padding of rows [start, stop) (a replica's share, a micro-batch)."""
        return LeftPadding(self.lengths[start:stop], self.prompt_len)

    def prompt_mask(self) -> torch.Tensor:
        """[rows, prompt_len] int64: 1 on real tokens, 0 on pads."""
        columns = torch.arange(self.prompt_len)[None, :]
        first_real = torch.tensor([self.prompt_len - n for n in self.lengths])[:, None]
        return (columns >= first_real).long()

    def attention_mask(self, forward: int) -> torch.Tensor:
        """[rows, prompt_len + forward]: the prompt's mask, then a one for each token generated before this
        forward (the key/value columns the cache holds once this forward's tokens are in)."""
        generated = torch.ones(len(self.lengths), forward, dtype=torch.long)
        return torch.cat([self.prompt_mask(), generated], dim=1)

    def position_ids(self, forward: int) -> torch.Tensor:
        """Per-row positions of the tokens forward ``forward`` feeds: [rows, prompt_len] for the prefill
        (transformers' ``cumsum(mask) - 1``, pads clamped to 0), [rows, 1] for a decode step."""
        if forward == 0:
            return (self.prompt_mask().cumsum(dim=1) - 1).clamp(min=0)
        return torch.tensor(self.lengths)[:, None] + (forward - 1)


def left_pad(token_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, LeftPadding]:
    """Token lists of any lengths -> ([batch, longest] int64 ids left-padded with ``pad_id``, their padding)."""
    width = max(len(t) for t in token_lists)
    ids = torch.tensor([[pad_id] * (width - len(t)) + list(t) for t in token_lists], dtype=torch.int64)
    return ids, LeftPadding(tuple(len(t) for t in token_lists), width)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class PipelineGenerator:
    """Drives one rank's stage through prefill and decode. ``stage(x, cache, cache_position)`` runs it; a
    micro-batch with padding adds ``attention_mask=`` [rows, kv] and ``position_ids=`` [rows, seq]."""

    stage: Callable[..., torch.Tensor]
    groups: Groups
    new_cache: Callable[[], object]
    hidden_size: int
    dtype: torch.dtype
    device: torch.device
    micro_batches: int
    sampler: Sampler
    eos_token_id: int | None = None
    decode_graphs: bool = False  # decode forwards replayed as CUDA graphs over a static cache (module docstring)
    decode_compile: bool = False  # the graphed step is the stage compiled by torch.compile (graphs.compiled_step)
    skinny_gemm: bool = False  # the graphed step's sibling products stacked, 2-16 rows in hpi's kernel (skinny_gemm)
    new_static_cache: Callable[[int], object] = StaticKVCache  # max slots -> the cache decode_graphs uses
    on_tokens: Callable[[int, list[torch.Tensor]], None] | None = None  # (forward, tokens per micro-batch)
    on_forward: Callable[[int, int], None] | None = None  # (forward, forwards asked), every rank: the heartbeat
    times: StepTimes = field(default_factory=StepTimes)
    kept: KeptSteps = field(default_factory=KeptSteps)  # shared by ``replace``-d copies: a warm-up's for the run

    def _split(self, batch: int) -> list[int]:
        m = self.micro_batches
        if batch % m:
            raise ValueError(f"batch per replica({batch}) % micro_batches({m}) != 0")
        return [batch // m] * m

    def _recv_hidden(self, rows: int, seq: int) -> torch.Tensor:
        x = torch.empty(rows, seq, self.hidden_size, dtype=self.dtype, device=self.device)
        dist.recv(x, src=self.groups.prev_rank)
        return x

    def _recv_tokens(self, rows: int) -> torch.Tensor:
        t = torch.empty(rows, dtype=torch.int64, device=self.device)
        dist.recv(t, src=self.groups.last_stage_rank)
        return t

    def run(self, prompt_ids: torch.Tensor | None, batch: int, prompt_len: int, max_new_tokens: int, chat: bool,
            padding: LeftPadding | None = None, cache_slots: int | None = None) -> list[torch.Tensor]:
        """Generate; returns the new tokens [batch, n] on last-stage ranks (an empty list elsewhere).

        ``prompt_ids`` [batch, prompt_len] (left-padded) is needed on first-stage ranks only; ``padding``
        (the same on every rank; None: no row is padded) says which of its columns are real tokens.
        ``cache_slots``: the static cache's slots where decode is graphed (None: ``prompt_len + max_new_tokens``).
        The graphed step's shapes are its cache's, so a short warm-up given the measured run's slots compiles and
        captures the very shapes the measured run replays (``hpi.executor.worker.measure``).
        """
        g = self.groups
        sizes = self._split(batch)
        offsets = [sum(sizes[:j]) for j in range(len(sizes))]
        if padding is not None and (len(padding.lengths), padding.prompt_len) != (batch, prompt_len):
            raise ValueError(f"padding covers {len(padding.lengths)} rows of {padding.prompt_len} columns, the "
                             f"prompts are {batch} rows of {prompt_len}: slice the padding like the ids")
        paddings = [self._micro_batch_padding(padding, offsets[j], rows) for j, rows in enumerate(sizes)]
        max_len = cache_slots or prompt_len + max_new_tokens
        if max_len < prompt_len + max_new_tokens:
            raise ValueError(f"cache_slots {max_len} < prompt_len + max_new_tokens = {prompt_len} + {max_new_tokens}: "
                             "the static cache must hold every token; pass at least their sum, or None")
        if self.decode_graphs:
            # Switched per run, so that the variants of one build measure both paths; a compiled step traced with the
            # other setting is traced again (dynamo guards the switch). On a CPU the stack is one F.linear (no kernel).
            use_skinny(self.skinny_gemm)
            if self.skinny_gemm:
                install_skinny(self.stage)
            keys = [(j, rows, max_len, paddings[j] is not None, self.decode_compile, self.skinny_gemm)
                    for j, rows in enumerate(sizes)]
            caches, graphs, fresh = self._static_steps(keys, max_len)
        else:
            caches, graphs, fresh = [self.new_cache() for _ in sizes], [], []
        slots = max_len if self.decode_graphs else None
        generated: list[list[torch.Tensor]] = [[] for _ in sizes]
        next_ids: list[torch.Tensor | None] = [None] * len(sizes)
        done = torch.zeros(batch, dtype=torch.bool)
        _sync(self.device)
        start = time.perf_counter()
        for forward in range(max_new_tokens):
            seq = prompt_len if forward == 0 else 1
            cache_position = torch.arange(prompt_len + forward - seq, prompt_len + forward, device=self.device)
            pending, busy = [], 0.0
            for j, rows in enumerate(sizes):
                if g.is_first_stage:
                    if forward == 0:
                        x = prompt_ids[offsets[j] : offsets[j] + rows].to(self.device)
                    elif g.pp > 1:
                        x = self._recv_tokens(rows)[:, None]
                    else:
                        x = next_ids[j][:, None]
                else:
                    x = self._recv_hidden(rows, seq)
                masks = self._mask_kwargs(paddings[j], forward, slots)  # built outside the stage's busy time
                step = graphs[j] if self.decode_graphs and forward > 0 else self.stage
                _sync(self.device)
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = step(x, caches[j], cache_position, **masks)
                _sync(self.device)
                busy += time.perf_counter() - t0
                if not g.is_last_stage:
                    pending.append(dist.isend(out.contiguous(), dst=g.next_rank))
                    continue
                tokens = self.sampler(out, forward, j)
                generated[j].append(tokens)
                next_ids[j] = tokens
                if g.pp > 1 and forward < max_new_tokens - 1:
                    pending.append(dist.isend(tokens.contiguous(), dst=g.first_stage_rank))
            for work in pending:
                work.wait()
            _sync(self.device)
            self.times.forward_end_s.append(time.perf_counter() - start)
            self.times.busy_s.append(busy)
            if self.on_tokens is not None and g.is_last_stage:
                self.on_tokens(forward, [gen[-1] for gen in generated])
            if self.on_forward is not None:
                self.on_forward(forward, max_new_tokens)
            if chat and self._all_done(generated, done):
                break
        self.times.capture_s.extend(graph.capture_s for graph, new in zip(graphs, fresh)
                                    if new and graph.capture_s is not None)
        if self.decode_graphs:
            self.kept.keep(dict(zip(keys, zip(caches, graphs))))
        if not g.is_last_stage:
            return []
        return [torch.stack(gen, dim=1).cpu() for gen in generated]

    def _static_steps(self, keys: list[tuple], max_len: int) -> tuple[list, list[DecodeGraph], list[bool]]:
        """Each micro-batch's static cache and decode graph: the last generation's where its key matches
        (``KeptSteps``: no new capture), else new ones; and which are new (their first step is a capture)."""
        kept = self.kept.take(keys)
        step_fn = compiled_step(self.stage) if self.decode_compile else self.stage
        capture = self.device.type == "cuda"
        steps = [kept.get(key) or (self.new_static_cache(max_len), DecodeGraph(step_fn, capture=capture))
                 for key in keys]
        return [c for c, _ in steps], [g for _, g in steps], [key not in kept for key in keys]

    @staticmethod
    def _micro_batch_padding(padding: LeftPadding | None, start: int, rows: int) -> LeftPadding | None:
        """The rows' padding, or None where none of them is padded (the stage's unpadded fast path)."""
        if padding is None:
            return None
        mine = padding.rows(start, start + rows)
        return mine if mine.is_padded else None

    def _mask_kwargs(self, padding: LeftPadding | None, forward: int, slots: int | None = None
                     ) -> dict[str, torch.Tensor]:
        """The padding mask and positions of this forward; with ``slots`` (a static cache) the mask spans
        all of the cache's slots, ones past the tokens so far (causality hides them)."""
        if padding is None:
            return {}
        mask = padding.attention_mask(forward)
        if slots is not None:
            mask = torch.nn.functional.pad(mask, (0, slots - mask.shape[1]), value=1)
        return {"attention_mask": mask.to(self.device), "position_ids": padding.position_ids(forward).to(self.device)}

    def _all_done(self, generated: list[list[torch.Tensor]], done: torch.Tensor) -> bool:
        """World-wide stop check: every rank calls it after every forward (a MIN all-reduce of a flag)."""
        mine = torch.ones(1, dtype=torch.int32)
        if self.groups.is_last_stage and self.eos_token_id is not None:
            last = torch.cat([gen[-1].cpu() for gen in generated])
            done |= last == self.eos_token_id
            mine[0] = int(bool(done.all()))
        elif self.eos_token_id is None:
            mine[0] = 0
        flag = mine.to(self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
