"""Graphed decode of a GPU-resident model, eager and compiled, side by side in one process; each compiled graph
compiled several times from scratch under named inductor option sets (issue 20, resident).

The question (benchmarks/results/2026-12-04-h200-split/SUMMARY.md): the same code compiled in two processes gave
4.51 and 5.31 ms a step (Llama-3-8B, batch 1, one H200). Inductor's coordinate-descent tuning picks each kernel's
launch config from µs timings (``torch/_inductor/runtime/coordinate_descent_tuner.py``: a candidate wins when it
is 0.1% faster, ``has_improvement``), so the step depends on the compile. This script says how big the
compile-to-compile spread is and which option set makes it small and fast.

A device call (one GPU; each compile is cold, 80-165 s for the 8B under ``cdt-all`` on an H100 or H200, and is
followed by the teacher-forced replays and 200 timed ones, ~4 s):

    python3 benchmarks/compile_decode.py --model llama-3-8b --batches 1 --prompt-len 512 --gen-len 512 \
        --variants eager,compiled_split --compiles 1 --reference --budget-s 200 --hardware h200-1gpu \
        --out "$OUT/compile-ref.json"

``--budget-s`` starts no compile that the longest one so far would carry past it (compiles go round by round over
the option sets); what did not fit is listed in ``skipped``, and the JSON is rewritten after every compile, so a
call cut short keeps what it measured.

Graphs (``VARIANTS``): ``eager`` (the stage's forward captured, sdpa's attention: ``hpi run
--no-compile-decode``, with cuBLAS's products), ``compiled_sdpa`` (compiled, sdpa's attention), ``compiled_split``
(compiled, hpi's split-KV decode attention, ``hpi.executor.decode_attention``), ``compiled_skinny`` (that, and the
products of 2-16 rows in hpi's few-row kernel, ``hpi.executor.skinny_gemm``: what ``hpi run`` replays on a GPU
now), ``eager_skinny`` (the eager graph with the few-row kernel) and ``compiled_skinny_pdl`` (``compiled_skinny``
with the few-row products as programmatic dependent launches that warm L2 with their first weight tiles before they
wait, and the attention's second pass signalling them, ``hpi.executor.dependent_launch``; Hopper on, else the same
as ``compiled_skinny``), ``compiled_skinny_mask_once`` (``compiled_skinny`` with the step's mask built once, not
inlined by inductor into each layer's attention: ``hpi.executor.masks.built_once``),
``compiled_skinny_one_launch`` (``compiled_skinny`` with the attention's splits combined by pass 1's last program of
each pair, ``decode_attention.use_one_launch``: one kernel fewer a layer), and ``compiled_skinny_<walk>`` for every
other walk of the attention's pass 1 (``decode_attention.WALKS``: ``compiled_skinny_trimmed`` walks only the blocks
of its split's allowed span and reads no mask byte where that span has no hole). Inductor's own kernels become
dependent launches under the option ``triton.enable_pdl`` (``--option-sets``).

Option sets: ``inductor_option_sets.py`` (``OPTION_SETS``, ``--option-sets``) says what each changes.

Each compile (``--compiles N`` per compiled variant and option set) starts from scratch: ``torch._dynamo.reset()``
and a fresh inductor cache directory (``torch._inductor.utils.fresh_cache``, ``fresh_inductor_cache`` before
older torch), so no kernel, tuning choice or compiled graph of an earlier compile is reused. Per compile:
- tokens: the baseline (the first of ``--variants``) generates ``gen_len`` greedy tokens; every other graph is
  fed the same tokens (teacher forcing, its own KV cache) and its greedy choice at each position is compared
  with the baseline's: the share that agree. Random weights give small argmax margins, so this is a harsh test
  of bf16 numerics: a faster set that changes them shows here. With ``--reference`` the same weights in fp32
  (eager, teacher-forced alike) say which path agrees more often with the higher-precision choice, and
  ``hpi.executor.agreement`` counts agreement again on the positions fp32 decides by more than the baseline's own
  rounding moves a decision (``margin_floor``, ``decided_share``, ``agree_decided``, ``agree_vs_fp32_decided``).
- time: ``--replays`` replays at the first decode position (its cache write is idempotent) between two CUDA
  events: ms a step. On a CPU there is no graph to replay: the un-captured calls are timed with
  ``time.perf_counter`` (``"timer": "perf_counter"`` in the row; host wall time, not a GPU number).
- compile: the wall time of the first decode step (dynamo, inductor, tuning, capture); the coordinate-descent
  benchmarks it ran (on a GPU more than 0 in every compile: the tuning ran again), how many of the tuning's
  timings the profiler took (``cdt-prof``) and the FX-graph cache hits it had (0: nothing was reused).
Per graph and set: ``ms_per_compile``, min / median / max and ``spread`` (max over min). With ``--profile FILE``:
``torch.profiler``'s kernel table of 20 replays of each compile, appended to FILE.

Prints one JSON line per compile and per batch and writes them all to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from inductor_option_sets import DEFAULT_SET, OPTION_SETS, PROFILER, SYNTAX, parse_option_sets

from hpi.executor import agreement, dependent_launch, skinny_gemm
from hpi.executor.decode_attention import WALK as DEFAULT_WALK
from hpi.executor.decode_attention import WALKS
from hpi.executor.graphs import COMPILE_OPTIONS


class Kernels(NamedTuple):
    """The kernel switches one graph runs with."""

    split_kv: bool  # hpi's split-KV decode attention (decode_attention.use_split_kv), else sdpa's
    skinny: bool  # hpi's few-row products (skinny_gemm.use_skinny), else cuBLAS's
    pdl: bool  # those products as dependent launches (dependent_launch.use)
    walk: str  # the attention's walk of pass 1: one of decode_attention.WALKS
    mask_once: bool  # a compiled step builds its mask once, not once a layer (masks.use_built_once)
    one_launch: bool  # the attention combines its splits in pass 1's last program (decode_attention.use_one_launch)


# hpi run's own switches: what the process runs outside a variant, and what compiled_skinny runs
DEFAULT_KERNELS = Kernels(split_kv=True, skinny=True, pdl=False, walk=DEFAULT_WALK, mask_once=False, one_launch=False)
_NO_HPI_KERNELS = DEFAULT_KERNELS._replace(split_kv=False, skinny=False)
# The graphs compared, in order: (name, compiled, kernels). The first of --variants is the baseline the others are
# fed tokens from and compared with.
VARIANTS = (("eager", False, _NO_HPI_KERNELS),
            ("compiled_sdpa", True, _NO_HPI_KERNELS),
            ("compiled_split", True, DEFAULT_KERNELS._replace(skinny=False)),
            ("compiled_skinny", True, DEFAULT_KERNELS),
            ("eager_skinny", False, DEFAULT_KERNELS._replace(split_kv=False)),
            ("compiled_skinny_pdl", True, DEFAULT_KERNELS._replace(pdl=True)),
            ("compiled_skinny_mask_once", True, DEFAULT_KERNELS._replace(mask_once=True)),
            ("compiled_skinny_one_launch", True, DEFAULT_KERNELS._replace(one_launch=True))) + tuple(
    (f"compiled_skinny_{walk}", True, DEFAULT_KERNELS._replace(walk=walk)) for walk in WALKS if walk != DEFAULT_WALK)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# ---- one graph's run --------------------------------------------------------------------------------------------
def _stage(model: str, device: torch.device, dtype: torch.dtype):
    from hpi.executor.modeling import ShardSpec, build_stage, load_hf_config

    config = load_hf_config(model)
    stage = build_stage(config, ShardSpec.whole(config.num_hidden_layers), dtype=dtype, device=device,
                        seed=0).eval()
    return config, stage


def _weight_bytes_per_step(stage: torch.nn.Module) -> int:
    """Bytes of the weights a decode step reads: every parameter but the input embedding table (a step reads
    one row of it per token)."""
    embed = {id(p) for name, p in stage.named_parameters() if "embed_tokens" in name}
    return sum(p.numel() * p.element_size() for p in stage.parameters() if id(p) not in embed)


class _Run:
    """One batch's prefill into its own static cache, then decode steps through a ``DecodeGraph`` (``graphed``:
    captured on CUDA, run as is on a CPU) or the stage's eager forward."""

    def __init__(self, step_fn, stage, ids: torch.Tensor, gen_len: int, graphed: bool = True) -> None:
        from hpi.executor.graphs import DecodeGraph, StaticKVCache

        self.prompt_len = ids.shape[1]
        self.cache = StaticKVCache(self.prompt_len + gen_len)
        self.device = ids.device
        with torch.no_grad():
            self.first_logits = stage(ids, self.cache, torch.arange(self.prompt_len, device=self.device))
        self.first = self.first_logits.argmax(-1)
        capture = self.device.type == "cuda"
        self.graph = DecodeGraph(step_fn, capture=capture) if graphed else torch.no_grad()(step_fn)

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """The logits [b, vocab] after feeding ``tokens`` [b] at decode step ``t`` (position prompt_len + t)."""
        position = torch.tensor([self.prompt_len + t], device=self.device)
        return self.graph(tokens[:, None], self.cache, position)

    def decode(self, gen_len: int, fed: list[torch.Tensor] | None = None,
               observe: Callable[[int, torch.Tensor], None] | None = None) -> tuple[list[torch.Tensor], float]:
        """(this run's greedy choice at each of ``gen_len`` positions, fed ``fed``, the baseline's choices, or
        with None its own; the wall time of the first decode step: a compiled graph's compile and capture).
        ``observe``: called with each position and its logits (``hpi.executor.agreement``'s collectors)."""
        choices, first_s = [self.first], 0.0
        if observe is not None:
            observe(0, self.first_logits)
        for t in range(gen_len - 1):
            start = time.perf_counter()
            logits = self.step((fed or choices)[t], t)
            choices.append(logits.argmax(-1))
            if observe is not None:
                observe(t + 1, logits)
            if t == 0:
                first_s = time.perf_counter() - start
        return choices, first_s

    def time_ms(self, tokens: torch.Tensor, replays: int) -> float:
        """ms a step over ``replays`` calls at the first decode position: CUDA events around graph replays, or
        on a CPU ``time.perf_counter`` around the un-captured calls."""
        position = torch.tensor([self.prompt_len], device=self.device)
        for _ in range(3):
            self.graph(tokens[:, None], self.cache, position)
        if self.device.type != "cuda":
            start = time.perf_counter()
            for _ in range(replays):
                self.graph(tokens[:, None], self.cache, position)
            return (time.perf_counter() - start) / replays * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            self.graph(tokens[:, None], self.cache, position)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / replays


def _profile(run: _Run, tokens: torch.Tensor, path: Path, title: str) -> None:
    """Append the run's kernel table (20 replays) to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run.time_ms(tokens, 20)
    with path.open("a") as out:
        out.write(f"== {title}, 20 replays ==\n")
        out.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30) + "\n")


def _fresh_cache():
    """torch's context manager for a fresh inductor cache directory (and cleared in-memory caches)."""
    from torch._inductor import utils

    fresh = getattr(utils, "fresh_cache", None) or getattr(utils, "fresh_inductor_cache", None)
    if fresh is None:
        raise RuntimeError(f"torch {torch.__version__} has neither torch._inductor.utils.fresh_cache nor "
                           "fresh_inductor_cache: a compile from scratch needs one of them")
    return fresh()


_PROFILED = [0]  # kernel timings taken by the profiler benchmarker (``_benchmarker``) in this process


@contextlib.contextmanager
def _benchmarker(options: dict):
    """With ``use_torch_profiler_benchmarker`` set: the tuning's kernel timings (``CachingAutotuner.bench``,
    torch/_inductor/runtime/triton_heuristics.py) taken from the profiler's device time instead of CUDA events."""
    if not options.get(PROFILER):
        yield
        return
    from torch._inductor.runtime import benchmarking, triton_heuristics

    if not hasattr(triton_heuristics, "benchmarker"):
        raise RuntimeError(f"torch {torch.__version__}: runtime/triton_heuristics.py has no module-level "
                           f"benchmarker to swap: drop {PROFILER} from the option sets")
    profiler = benchmarking.TorchProfilerBenchmarker()
    timed = profiler.benchmark

    def counted(*args, **kwargs):
        _PROFILED[0] += 1  # each compile's entry reports them: the swap took effect
        return timed(*args, **kwargs)

    profiler.benchmark = counted
    saved = triton_heuristics.benchmarker
    triton_heuristics.benchmarker = profiler
    try:
        yield
    finally:
        triton_heuristics.benchmarker = saved


def _use_kernels(kernels: Kernels) -> None:
    """Switch hpi's split-KV attention, few-row products and their dependent launch on or off, set the
    attention's walk (the stage has the products installed), whether a compiled step builds its mask once and
    whether the attention combines its splits in pass 1 (one launch)."""
    from hpi.executor import decode_attention, masks

    decode_attention.use_split_kv(kernels.split_kv)
    skinny_gemm.use_skinny(kernels.skinny)
    dependent_launch.use(kernels.pdl)
    decode_attention.WALK = kernels.walk
    masks.use_built_once(kernels.mask_once)
    decode_attention.use_one_launch(kernels.one_launch)


@contextlib.contextmanager
def _compiled_from_scratch(stage, kernels: Kernels, options: dict | None):
    """The stage's forward for one run with the kernel switches set, compiled afresh when ``options`` is not
    None: dynamo reset and a fresh inductor cache, kept for the run's whole life (its first call compiles)."""
    _use_kernels(kernels)
    if options is None:
        yield stage
        return
    torch._dynamo.reset()
    with _fresh_cache(), _benchmarker(options):
        yield torch.compile(stage, dynamic=False, options=options)
    torch._dynamo.reset()


def _counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"coordesc_benchmarks": counters["inductor"]["coordesc_tuning_bench"],
            "fxgraph_cache_hits": counters["inductor"]["fxgraph_cache_hit"], "profiler_benchmarks": _PROFILED[0]}


class Budget:
    """``--budget-s`` over the whole call: no run starts that the longest one so far would carry past
    ``deadline`` (``time.perf_counter``; None: no limit)."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.longest_s = 0.0

    def allows(self) -> bool:
        return self.deadline is None or time.perf_counter() + self.longest_s <= self.deadline

    def spent(self, seconds: float) -> None:
        self.longest_s = max(self.longest_s, seconds)


# ---- one batch ----------------------------------------------------------------------------------------------
def _units(variants: tuple, option_sets: dict[str, dict], compiles: int) -> list[tuple]:
    """(unit, variant, kernels, option set name or None, compile index) for every run after the baseline, the
    compile rounds outermost so that a run cut short by the budget has as many compiles of each set."""
    out = []
    for index in range(1, compiles + 1):
        for name, compiled, kernels in variants[1:]:
            if not compiled:
                if index == 1:
                    out.append((name, name, kernels, None, 1))
                continue
            out.extend((f"{name}@{s}", name, kernels, s, index) for s in option_sets)
    return out


def _summary(entries: list[dict], base_ms: float, limit_ms: float | None) -> dict:
    """A unit's compiles: ms per compile, min / median / max, spread, compile times and agreements."""
    ms = [e["ms"] for e in entries]
    out = {"compiles": len(entries), "ms_per_compile": ms, "ms_min": min(ms), "ms_median": statistics.median(ms),
           "ms_max": max(ms), "spread": max(ms) / min(ms), "median_over_baseline": statistics.median(ms) / base_ms,
           "compile_s_per_compile": [e["compile_s"] for e in entries],
           "agree_per_compile": [e["agree"] for e in entries]}
    for key in ("agree_vs_fp32", "agree_decided", "agree_vs_fp32_decided"):
        if key in entries[0]:
            out[f"{key}_per_compile"] = [e[key] for e in entries]
    if limit_ms is not None:
        out["best_of_limit"] = limit_ms / min(ms)
    return out


@dataclass
class _Fp32:
    """One batch's fp32 reference, teacher-forced with the baseline's tokens: its choices and two best tokens at
    each position, and the noise floor the baseline's own rounding sets (``hpi.executor.agreement``)."""

    choices: list[torch.Tensor]
    top: agreement.TopTwo
    baseline: agreement.MarginsOn | None = None  # the baseline's margins on fp32's two best tokens
    noise: agreement.Floor | None = None


def _baseline(stage, ids: torch.Tensor, gen_len: int, replays: int, kernels: Kernels, options: dict | None,
              reference) -> tuple[list, float, float, _Fp32 | None]:
    """(the baseline's ``gen_len`` greedy choices, each fed back; its ms a step; its first step's wall time; with a
    ``reference`` its fp32 run and the floor: the baseline decodes the same steps again, fed its own tokens, to take
    its margins on fp32's two best tokens)."""
    with _compiled_from_scratch(stage, kernels, options) as fn:
        base = _Run(fn, stage, ids, gen_len)
        fed, first_s = base.decode(gen_len)
        ms = base.time_ms(fed[-1], replays)
        if reference is None:
            return fed, ms, first_s, None
        fp32 = _Fp32([], agreement.TopTwo())
        fp32.choices, _ = _Run(reference, reference, ids, gen_len, graphed=False).decode(gen_len, fed, fp32.top)
        fp32.baseline = agreement.MarginsOn(fp32.top)
        base.decode(gen_len, fed, fp32.baseline)  # the replays above rewrote one cache slot; this rewrites in order
        fp32.noise = agreement.floor(fp32.baseline)
        return fed, ms, first_s, fp32


def _compile_entry(stage, ids: torch.Tensor, fed: list, fp32: _Fp32 | None, replays: int, kernels: Kernels,
                   options: dict | None, profile_path: Path | None, title: str) -> dict:
    """One run of a graph (compiled afresh under ``options``; None: eager), teacher-forced with ``fed``: its
    agreement with the baseline (and fp32, over all positions and the decided ones), ms a step, compile time and
    the compile's counters."""
    before = _counts()
    with _compiled_from_scratch(stage, kernels, options) as fn:
        run = _Run(fn, stage, ids, len(fed))
        margins = agreement.MarginsOn(fp32.top) if fp32 is not None else None
        choices, compile_s = run.decode(len(fed), fed, margins)
        entry = {"ms": run.time_ms(fed[-1], replays), "compile_s": compile_s if options is not None else None,
                 "agree": agreement.share(fed, choices)}
        if fp32 is not None:
            entry["agree_vs_fp32"] = agreement.share(fp32.choices, choices)
            entry.update(agreement.decided_agreement(margins, choices, fed, fp32.choices, fp32.noise))
        if profile_path is not None:
            _profile(run, fed[-1], profile_path, title)
        del run
    entry.update({k: v - before[k] for k, v in _counts().items()})
    return entry


def measure(stage, vocab: int, batch: int, prompt_len: int, gen_len: int, replays: int, device, *,
            variants: tuple = VARIANTS, option_sets: dict[str, dict] | None = None, compiles: int = 1,
            reference=None, profile_path: Path | None = None, budget: Budget | None = None,
            limit_ms: float | None = None, report: Callable[[dict], None] | None = None) -> dict:
    """One batch's row: the baseline (the first of ``variants``; compiled once under the first option set if it
    is a compiled graph; it always runs) and every other graph, compiled ``compiles`` times under each option
    set while ``budget`` allows. A run that fails is recorded (``failed``) and the next one goes on, so one
    set that this torch cannot run costs no other set its numbers. ``report``: called with each run's entry."""
    budget = budget if budget is not None else Budget(None)
    sets = option_sets if option_sets is not None else {DEFAULT_SET: dict(COMPILE_OPTIONS)}
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(batch)).to(device)
    (base_name, base_compiled, base_kernels), first_set = variants[0], next(iter(sets))
    entries, skipped, failed = [], [], []
    try:
        start = time.perf_counter()
        fed, base_ms, base_first_s, fp32 = _baseline(stage, ids, gen_len, replays, base_kernels,
                                                     sets[first_set] if base_compiled else None, reference)
        budget.spent(time.perf_counter() - start)
        for unit, name, kernels, set_name, index in _units(variants, sets, compiles):
            if not budget.allows():
                skipped.append(f"{unit}#{index}")
                continue
            start = time.perf_counter()
            title = f"batch {batch}, {prompt_len + gen_len} cache slots: {unit}, compile {index}"
            entry = {"batch": batch, "unit": unit, "variant": name, "option_set": set_name, "compile": index}
            try:
                entry.update(_compile_entry(stage, ids, fed, fp32, replays, kernels,
                                            sets[set_name] if set_name else None, profile_path, title))
                entries.append(entry)
            except Exception as e:  # noqa: BLE001 - recorded with its first line; the other runs go on
                torch._dynamo.reset()
                first = (str(e).strip().splitlines() or [""])[0][:300]
                entry["error"] = f"{type(e).__name__}: {first}"
                failed.append(entry)
            gc.collect()
            budget.spent(time.perf_counter() - start)
            if report is not None:
                report(entry)
    finally:
        _use_kernels(DEFAULT_KERNELS)
    row = {"batch": batch, "positions": gen_len, "cache_slots": prompt_len + gen_len, "baseline": base_name,
           "baseline_ms": base_ms, "baseline_compile_s": base_first_s if base_compiled else None,
           "baseline_option_set": first_set if base_compiled else None,
           "timer": "cuda_events" if torch.device(device).type == "cuda" else "perf_counter",
           "runs": entries, "skipped": skipped, "failed": failed}
    if fp32 is not None:
        row["agree_baseline_vs_fp32"] = agreement.share(fp32.choices, fed)
        row.update(margin_floor=fp32.noise.floor_logits, floor_quantile=fp32.noise.quantile,
                   decided_share=fp32.noise.decided_share, baseline_decided=agreement.decided_agreement(
                       fp32.baseline, fed, fed, fp32.choices, fp32.noise))
    units = dict.fromkeys(e["unit"] for e in entries)
    row["units"] = {u: _summary([e for e in entries if e["unit"] == u], base_ms, limit_ms) for u in units}
    return row


# ---- command line ---------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """Bad input: one line naming the fix on stderr, exit status 2 (no usage block)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="compile_decode.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=512)
    p.add_argument("--replays", type=int, default=200)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--hardware", default="h200-1gpu", help="profile whose HBM ceiling the step is compared with")
    p.add_argument("--reference", action="store_true", help="also teacher-force the same weights in fp32")
    p.add_argument("--profile", default=None, metavar="FILE", help="append torch.profiler kernel tables to FILE")
    p.add_argument("--variants", default=",".join(v[0] for v in VARIANTS),
                   help="graphs to compare, the first the baseline (default: all of " +
                        ", ".join(v[0] for v in VARIANTS) + ")")
    p.add_argument("--compiles", type=int, default=1, help="compiles from scratch of each compiled graph and set")
    p.add_argument("--option-sets", default=DEFAULT_SET,
                   help=f"inductor option sets: {SYNTAX}; named: {', '.join(OPTION_SETS)} "
                        f"(default: {DEFAULT_SET}, hpi run's own)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no compile that the longest one so far would take past this many seconds")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    known = {v[0]: v for v in VARIANTS}
    names = args.variants.split(",")
    if any(n not in known for n in names) or len(set(names)) != len(names):
        p.error(f"--variants {args.variants}: name each of {', '.join(known)} at most once, the baseline first")
    args.variants = tuple(known[n] for n in names)
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches {args.batches}: write batch sizes separated by commas, e.g. 1,16")
    for flag, value, least in [("--batches", min(args.batches), 1), ("--prompt-len", args.prompt_len, 1),
                               ("--gen-len", args.gen_len, 2), ("--replays", args.replays, 1),
                               ("--compiles", args.compiles, 1)]:
        if value < least:
            p.error(f"{flag} {value} < {least}: give at least {least}")
    if args.profile and args.device != "cuda":
        p.error("--profile times CUDA kernels: leave it out with --device cpu")
    if args.budget_s is not None and args.budget_s <= 0:
        p.error(f"--budget-s {args.budget_s} <= 0: give a positive number of seconds, or leave it out")
    try:
        args.option_sets = parse_option_sets(args.option_sets)
    except ValueError as e:
        p.error(f"--option-sets: {e}")
    return args


def _write(path: Path, rows: list[dict], args, partial: list[dict]) -> None:
    names = [v[0] for v in args.variants]
    summary = {"kind": "hpi.CompileDecode", "variants": names, "compiles": args.compiles,
               "option_sets": args.option_sets, "rows": rows}
    b1 = next((r for r in rows if r["batch"] == 1), None)
    if b1:
        summary["batch_over_b1"] = {r["batch"]: {u: s["ms_median"] / b1["units"][u]["ms_median"]
                                                 for u, s in r["units"].items() if u in b1["units"]} for r in rows}
    if partial:
        summary["partial"] = partial  # the compiles of the batch still being measured
    path.write_text(json.dumps(summary, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    start = time.perf_counter()
    budget = Budget(start + args.budget_s if args.budget_s is not None else None)
    from hpi.planner.profiles import load_profile

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("compile_decode.py: --device cuda but torch sees no GPU: run on a GPU, or give --device cpu",
              file=sys.stderr)
        return 2
    config, stage = _stage(args.model, device, DTYPES[args.dtype])
    skinny_gemm.install(stage)  # each variant switches it on or off (``_use_kernels``)
    weight_bytes = _weight_bytes_per_step(stage)
    limit_ms = None
    if device.type == "cuda":  # the HBM ceiling says nothing about a CPU's host-timed step
        limit_ms = weight_bytes / load_profile(args.hardware).gpu.hbm_bandwidth_bytes_s * 1e3
    reference = copy.deepcopy(stage).float() if args.reference else None
    out, rows, partial = Path(args.out), [], []

    def report(entry: dict) -> None:
        partial.append(entry)
        print(json.dumps(entry), flush=True)
        _write(out, rows, args, partial)

    for batch in args.batches:
        row = measure(stage, config.vocab_size, batch, args.prompt_len, args.gen_len, args.replays, device,
                      variants=args.variants, option_sets=args.option_sets, compiles=args.compiles,
                      reference=reference, profile_path=Path(args.profile) if args.profile else None,
                      budget=budget, limit_ms=limit_ms, report=report)
        row.update(model=args.model, dtype=args.dtype, weight_bytes=weight_bytes, hbm_limit_ms=limit_ms,
                   torch=torch.__version__,
                   device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
        rows.append(row)
        partial.clear()
        print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
        _write(out, rows, args, partial)
    print(json.dumps({"seconds": time.perf_counter() - start,
                      "skipped": sum(len(r["skipped"]) for r in rows),
                      "failed": sum(len(r["failed"]) for r in rows)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
