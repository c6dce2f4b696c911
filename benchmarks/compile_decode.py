"""Graphed decode of a GPU-resident model, eager and compiled, side by side in one process; each compiled graph
compiled several times from scratch under named inductor option sets (issue 20, resident).

The question (benchmarks/results/2026-12-04-h200-split/SUMMARY.md): the same code compiled in two processes gave
4.51 and 5.31 ms a step (Llama-3-8B, batch 1, one H200). Inductor's coordinate-descent tuning picks each kernel's
launch config from µs timings (``torch/_inductor/runtime/coordinate_descent_tuner.py``: a candidate wins when it
is 0.1% faster, ``has_improvement``), so the step depends on the compile. This script says how big the
compile-to-compile spread is and which option set makes it small and fast.

The device call (next GPU session, one H200, about 8 minutes; ``cdt-prof`` needs torch's
``TorchProfilerBenchmarker``, which torch 2.13 has and 2.11 may not: then ``plain`` takes its place):

    S="cdt;cdt-prof;cdt-all"; python3 -c "from torch._inductor.runtime.benchmarking import \
        TorchProfilerBenchmarker" 2>/dev/null || S="cdt;cdt-all;plain"
    python3 benchmarks/compile_decode.py --model llama-3-8b --batches 1,16 --prompt-len 512 --gen-len 512 \
        --variants eager,compiled_split --compiles 3 --option-sets "$S" --budget-s 420 \
        --hardware h200-1gpu --out "$OUT/compile-repro.json"

Estimate: a compile took 30-75 s on the H200 (64-74 s cold, 16-29 s with caches warm: SUMMARY.md above) and
every compile here is cold, followed by 511 teacher-forced replays and 200 timed ones (~4 s). 3 compiles x 3
sets is 9 compiles, 4.5-11 min, for batch 1 alone (18 with batch 16: 9-23 min), more than one 10-minute call
holds, so ``--budget-s`` decides: compiles go round by round (each set once, then again), and none starts
after 420 s that the longest so far would not finish by then. Expected: rounds 1 and 2 at batch 1 (6
compiles, 3.5-8 min; ``cdt-all`` times up to 3^3 more configs per kernel each time the walk stops and
``cdt-prof`` starts a profiler per timing, neither measured yet), round 3 and batch 16's compiles only if
compiles take ~40 s; batch 16's eager baseline always runs (~20 s). With imports and the 8B build (~1 min)
the call ends after about 8 minutes. What did not fit is listed in ``skipped``; the JSON is rewritten after
every compile, so a call cut short keeps what it measured. Batch 16 alike: the same with ``--batches 16``.

Graphs (``VARIANTS``): ``eager`` (the stage's forward captured, sdpa's attention: ``hpi run
--no-compile-decode``), ``compiled_sdpa`` (compiled, sdpa's attention) and ``compiled_split`` (compiled, hpi's
split-KV decode attention, ``hpi.executor.decode_attention``: what ``hpi run`` replays on a GPU now).

Option sets (``OPTION_SETS``; ``--option-sets`` names them, or writes new ones, see ``parse_option_sets``). Each
changes ``torch/_inductor/config.py`` settings on top of nothing (torch.compile's ``options=``):
- ``cdt``: ``coordinate_descent_tuning`` (what ``hpi run`` compiled with until 2026-12-05). A batch-1 matrix
  product becomes a tuned reduction (``decomposition.py``, ``mm``), and every Triton kernel's config is walked one
  field at a time to the fastest neighbour.
- ``cdt-all``: also ``coordinate_descent_check_all_directions``: when the walk stops, every combination of the
  fields' neighbour values is timed too (``check_all_tuning_directions``): a wider search that can leave a
  local optimum a noisy timing stopped at. ``hpi.executor.graphs.COMPILE_OPTIONS`` (what ``hpi run`` compiles
  with; ``DEFAULT_SET``, the default) since the compiles of benchmarks/results/2026-12-05-h200-issue20.
- ``cdt-r2``: also ``coordinate_descent_search_radius`` 2: each field's neighbours reach two powers of two
  away instead of one (``get_neighbour_values``): a wider walk.
- ``cdt-maxpw``: also ``max_autotune_pointwise``: the walk starts from the fastest of inductor's longer list of
  pointwise and reduction configs (``runtime/triton_heuristics.py``) instead of its first heuristic config.
- ``cdt-prof``: also ``use_torch_profiler_benchmarker``: each tuning timing is the kernel's device time from the
  profiler (``TorchProfilerBenchmarker``) instead of the least of up to 100 CUDA-event pairs around single
  launches of a 5-20 µs kernel (``InductorBenchmarker.benchmark_gpu``): less noisy timings, so the 0.1% steps
  of the walk follow the kernel more than the timer. Inductor reads this setting once, at import
  (``runtime/benchmarking.py``, ``benchmarker``), so this script swaps the tuning's benchmarker for the compile
  itself (``_benchmarker``).
- ``plain``: no option: cuBLAS for the batch-1 products and heuristic kernel configs (a reduction with several
  candidate configs is still timed once among them): the control for how much of the step, and of the
  spread, the tuning brings.
No repetition knob helps: ``inductor_default_autotune_rep`` exists, but ``CachingAutotuner.bench`` passes
``rep=40`` and ``InductorBenchmarker.benchmark_gpu`` ignores it (up to 100 launches, 25 ms at most).

Each compile (``--compiles N`` per compiled variant and option set) starts from scratch: ``torch._dynamo.reset()``
and a fresh inductor cache directory (``torch._inductor.utils.fresh_cache``, ``fresh_inductor_cache`` before
older torch), so no kernel, tuning choice or compiled graph of an earlier compile is reused. Per compile:
- tokens: the baseline (the first of ``--variants``) generates ``gen_len`` greedy tokens; every other graph is
  fed the same tokens (teacher forcing, its own KV cache) and its greedy choice at each position is compared
  with the baseline's: the share that agree. Random weights give small argmax margins, so this is a harsh test
  of bf16 numerics: a faster set that changes them shows here. With ``--reference`` the same weights in fp32
  (eager, teacher-forced alike) say which path agrees more often with the higher-precision choice.
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
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hpi.executor.graphs import COMPILE_OPTIONS

# The graphs compared, in order: (name, compiled, hpi's split-KV decode attention). The first of --variants is
# the baseline the others are fed tokens from and compared with.
VARIANTS = (("eager", False, False), ("compiled_sdpa", True, False), ("compiled_split", True, True))
# Named inductor option sets (the module docstring says what each changes); DEFAULT_SET is hpi run's own.
CDT = {"coordinate_descent_tuning": True}
OPTION_SETS: dict[str, dict] = {
    "cdt": dict(CDT),
    "cdt-all": {**CDT, "coordinate_descent_check_all_directions": True},
    "cdt-r2": {**CDT, "coordinate_descent_search_radius": 2},
    "cdt-maxpw": {**CDT, "max_autotune_pointwise": True},
    "cdt-prof": {**CDT, "use_torch_profiler_benchmarker": True},
    "plain": {},
}
DEFAULT_SET = next(name for name, options in OPTION_SETS.items() if options == COMPILE_OPTIONS)
# The tuning's timer, swapped per compile by this script (``_benchmarker``): inductor reads the setting once, at
# import (torch/_inductor/runtime/benchmarking.py, ``benchmarker = _make_default_benchmarker()``).
PROFILER = "use_torch_profiler_benchmarker"
# Settings read once at import that this script cannot change per compile: set them for the whole call instead.
IMPORT_TIME = {"use_experimental_benchmarker": "TORCHINDUCTOR_USE_EXPERIMENTAL_BENCHMARKER"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_SYNTAX = 'NAME or NAME={KEY:VALUE,...} separated by ";", e.g. "cdt;r3={coordinate_descent_tuning:true,' \
          'coordinate_descent_search_radius:3};plain"'


# ---- option sets ----------------------------------------------------------------------------------------------
def _value(key: str, text: str, default):
    """``text`` as the type of the config's ``default``: true/false for a bool, a literal for a number."""
    if isinstance(default, bool) or (default is None and text in ("true", "false")):
        if text not in ("true", "false"):
            raise ValueError(f"{key}:{text}: {key} is a bool: write {key}:true or {key}:false")
        return text == "true"
    if isinstance(default, (int, float)) or default is None:
        for kind in ((int,) if isinstance(default, int) else (int, float)):
            with contextlib.suppress(ValueError):
                return kind(text)
        if default is not None:
            kind = "an integer" if isinstance(default, int) else "a number"
            raise ValueError(f"{key}:{text}: {key} takes {kind}: write one, e.g. {key}:{default}")
    if isinstance(default, str) or default is None:
        return text
    raise ValueError(f"{key}: a {type(default).__name__} setting cannot be written here: choose a bool, number "
                     "or string setting of torch/_inductor/config.py")


def _options(name: str, body: str, known: dict) -> dict:
    """``KEY:VALUE,...`` (the text between the braces) as torch.compile options, each key a setting of
    ``torch._inductor.config`` (``known``) and each value of its type."""
    options: dict = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, sep, text = (s.strip() for s in item.partition(":"))
        if not sep or not key or not text:
            raise ValueError(f"{name}: {item!r} is not KEY:VALUE: write e.g. coordinate_descent_tuning:true")
        if key in options:
            raise ValueError(f"{name}: {key} is given twice: keep one")
        options[key] = _value(key, text, known.get(key))
    return options


def _check(name: str, options: dict, known: dict) -> dict:
    """``options`` if this torch can apply each of them to one compile; else ValueError naming the fix."""
    for key in options:
        if key not in known:
            raise ValueError(f"{name}: {key} is not a setting of torch._inductor.config (torch "
                             f"{torch.__version__}): check the spelling in torch/_inductor/config.py")
        if key in IMPORT_TIME:
            raise ValueError(f"{name}: {key} is read once, at import, so it cannot change per compile: drop it and "
                             f"set {IMPORT_TIME[key]} in the environment of the whole call")
    if options.get(PROFILER):
        from torch._inductor.runtime import benchmarking

        if not hasattr(benchmarking, "TorchProfilerBenchmarker"):
            raise ValueError(f"{name}: torch {torch.__version__} has no TorchProfilerBenchmarker "
                             f"(torch/_inductor/runtime/benchmarking.py): drop the set, or {PROFILER}")
    return options


def parse_option_sets(text: str) -> dict[str, dict]:
    """``--option-sets``: entries separated by ``;``, each a name of ``OPTION_SETS`` or ``NAME={KEY:VALUE,...}``
    (``NAME={}``: no option). Raises ValueError naming the fix, also for a setting this torch lacks."""
    from torch._inductor import config

    known = config.get_config_copy()
    sets: dict[str, dict] = {}
    entries = [e.strip() for e in text.split(";")]
    if not any(entries):
        raise ValueError(f"{text!r} names no set: write {_SYNTAX}")
    for entry in entries:
        name, sep, body = (s.strip() for s in entry.partition("="))
        if not _NAME.fullmatch(name):
            raise ValueError(f"{entry!r}: a set's name is letters, digits, '-' or '_': write {_SYNTAX}")
        if name in sets:
            raise ValueError(f"{name} is named twice: give each set its own name")
        if not sep:
            if name not in OPTION_SETS:
                raise ValueError(f"{name} is not a named set ({', '.join(OPTION_SETS)}): name one, or write "
                                 f"{name}={{KEY:VALUE,...}}")
            sets[name] = _check(name, dict(OPTION_SETS[name]), known)
            continue
        if not (body.startswith("{") and body.endswith("}")):
            raise ValueError(f"{entry!r}: the options go between braces: write {name}={{KEY:VALUE,...}}")
        sets[name] = _check(name, _options(name, body[1:-1], known), known)
    return sets


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
            self.first = stage(ids, self.cache, torch.arange(self.prompt_len, device=self.device)).argmax(-1)
        capture = self.device.type == "cuda"
        self.graph = DecodeGraph(step_fn, capture=capture) if graphed else torch.no_grad()(step_fn)

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """The greedy tokens after feeding ``tokens`` [b] at decode step ``t`` (position prompt_len + t)."""
        position = torch.tensor([self.prompt_len + t], device=self.device)
        return self.graph(tokens[:, None], self.cache, position).argmax(-1)

    def decode(self, gen_len: int, fed: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], float]:
        """(this run's greedy choice at each of ``gen_len`` positions, fed ``fed``, the baseline's choices, or
        with None its own; the wall time of the first decode step: a compiled graph's compile and capture)."""
        choices, first_s = [self.first], 0.0
        for t in range(gen_len - 1):
            start = time.perf_counter()
            choices.append(self.step((fed or choices)[t], t))
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


def _share(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The share of (position, row) greedy choices on which ``a`` and ``b`` agree."""
    return (torch.stack(a) == torch.stack(b)).float().mean().item()


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


@contextlib.contextmanager
def _compiled_from_scratch(stage, split_kv: bool, options: dict | None):
    """The stage's forward for one run with the attention switch set, compiled afresh when ``options`` is not
    None: dynamo reset and a fresh inductor cache, kept for the run's whole life (its first call compiles)."""
    from hpi.executor.decode_attention import use_split_kv

    use_split_kv(split_kv)
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
    """(unit, variant, split_kv, option set name or None, compile index) for every run after the baseline, the
    compile rounds outermost so that a run cut short by the budget has as many compiles of each set."""
    out = []
    for index in range(1, compiles + 1):
        for name, compiled, split in variants[1:]:
            if not compiled:
                if index == 1:
                    out.append((name, name, split, None, 1))
                continue
            out.extend((f"{name}@{s}", name, split, s, index) for s in option_sets)
    return out


def _summary(entries: list[dict], base_ms: float, limit_ms: float | None) -> dict:
    """A unit's compiles: ms per compile, min / median / max, spread, compile times and agreements."""
    ms = [e["ms"] for e in entries]
    out = {"compiles": len(entries), "ms_per_compile": ms, "ms_min": min(ms), "ms_median": statistics.median(ms),
           "ms_max": max(ms), "spread": max(ms) / min(ms), "median_over_baseline": statistics.median(ms) / base_ms,
           "compile_s_per_compile": [e["compile_s"] for e in entries],
           "agree_per_compile": [e["agree"] for e in entries]}
    if "agree_vs_fp32" in entries[0]:
        out["agree_vs_fp32_per_compile"] = [e["agree_vs_fp32"] for e in entries]
    if limit_ms is not None:
        out["best_of_limit"] = limit_ms / min(ms)
    return out


def _baseline(stage, ids: torch.Tensor, gen_len: int, replays: int, split: bool, options: dict | None):
    """(the baseline's ``gen_len`` greedy choices, each fed back; its ms a step; its first step's wall time)."""
    with _compiled_from_scratch(stage, split, options) as fn:
        base = _Run(fn, stage, ids, gen_len)
        fed, first_s = base.decode(gen_len)
        return fed, base.time_ms(fed[-1], replays), first_s


def _compile_entry(stage, ids: torch.Tensor, fed: list, ref_choices: list | None, replays: int, split: bool,
                   options: dict | None, profile_path: Path | None, title: str) -> dict:
    """One run of a graph (compiled afresh under ``options``; None: eager), teacher-forced with ``fed``: its
    agreement with the baseline (and fp32), ms a step, compile time and the compile's counters."""
    before = _counts()
    with _compiled_from_scratch(stage, split, options) as fn:
        run = _Run(fn, stage, ids, len(fed))
        choices, compile_s = run.decode(len(fed), fed)
        entry = {"ms": run.time_ms(fed[-1], replays), "compile_s": compile_s if options is not None else None,
                 "agree": _share(fed, choices)}
        if ref_choices is not None:
            entry["agree_vs_fp32"] = _share(ref_choices, choices)
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
    from hpi.executor.decode_attention import use_split_kv

    budget = budget if budget is not None else Budget(None)
    sets = option_sets if option_sets is not None else {DEFAULT_SET: dict(COMPILE_OPTIONS)}
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(batch)).to(device)
    (base_name, base_compiled, base_split), first_set = variants[0], next(iter(sets))
    entries, skipped, failed = [], [], []
    try:
        start = time.perf_counter()
        fed, base_ms, base_first_s = _baseline(stage, ids, gen_len, replays, base_split,
                                               sets[first_set] if base_compiled else None)
        budget.spent(time.perf_counter() - start)
        ref_choices = None
        if reference is not None:
            ref_choices, _ = _Run(reference, reference, ids, gen_len, graphed=False).decode(gen_len, fed)
        for unit, name, split, set_name, index in _units(variants, sets, compiles):
            if not budget.allows():
                skipped.append(f"{unit}#{index}")
                continue
            start = time.perf_counter()
            title = f"batch {batch}, {prompt_len + gen_len} cache slots: {unit}, compile {index}"
            entry = {"batch": batch, "unit": unit, "variant": name, "option_set": set_name, "compile": index}
            try:
                entry.update(_compile_entry(stage, ids, fed, ref_choices, replays, split,
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
        use_split_kv(True)  # the process default
    row = {"batch": batch, "positions": gen_len, "cache_slots": prompt_len + gen_len, "baseline": base_name,
           "baseline_ms": base_ms, "baseline_compile_s": base_first_s if base_compiled else None,
           "baseline_option_set": first_set if base_compiled else None,
           "timer": "cuda_events" if torch.device(device).type == "cuda" else "perf_counter",
           "runs": entries, "skipped": skipped, "failed": failed}
    if ref_choices is not None:
        row["agree_baseline_vs_fp32"] = _share(ref_choices, fed)
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
                   help=f"inductor option sets: {_SYNTAX}; named: {', '.join(OPTION_SETS)} "
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
