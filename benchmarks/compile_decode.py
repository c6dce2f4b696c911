"""Graphed decode of a GPU-resident model three ways, side by side in one process (issue 20, resident).

    python benchmarks/compile_decode.py --model llama-3-8b --batches 1,16 --prompt-len 512 --gen-len 32 \
        --hardware h200-1gpu --out compile.json

One stage holds the whole model (hpi's seeded random weights, bf16). The graphs (``VARIANTS``): ``eager`` (the
stage's forward captured, sdpa's attention: what ``hpi run --no-compile-decode`` replayed before the split-KV
kernel), ``compiled_sdpa`` (the forward compiled by torch.compile, sdpa's attention: the compiled step of
2026-12-04) and ``compiled_split`` (compiled, hpi's split-KV decode attention, ``hpi.executor.decode_attention``:
what ``hpi run`` replays on a GPU now). For each batch size:

- tokens: the eager graph generates ``gen_len`` greedy tokens; the others are fed the same tokens (teacher
  forcing, each its own KV cache) and their greedy choice at each position is compared with the eager one: the
  share of positions where they agree. Random weights give small argmax margins, so this is a harsh test of bf16
  numerics; free-running generations would diverge at the first disagreement and say less. With
  ``--reference`` the same weights in fp32 (eager, teacher-forced alike) say which bf16 path agrees more often
  with the higher-precision choice.
- time: each graph replayed ``--replays`` times at the first decode position (``prompt_len``; the step's cache
  write is idempotent), CUDA events around all of them: ms per step, the weights' bytes over it against the
  profile's HBM ceiling (``hbm_bytes_s``), and the ratios. sdpa attends over every cache slot behind the mask;
  the split-KV kernel loads only the slots the mask allows (``prompt_len + 1`` here).
- compile: the wall time of each compiled graph's first call (torch.compile's work, then the capture).
- with ``--profile FILE``: ``torch.profiler``'s kernel table of 20 replays of each graph (device time per kernel
  name), appended to FILE: where the step's time goes beyond the weights' read.

Prints one JSON line per batch and writes them all to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch


def _stage(model: str, device: torch.device):
    from hpi.executor.modeling import ShardSpec, build_stage, load_hf_config

    config = load_hf_config(model)
    stage = build_stage(config, ShardSpec.whole(config.num_hidden_layers), dtype=torch.bfloat16, device=device,
                        seed=0).eval()
    return config, stage


def _weight_bytes_per_step(stage: torch.nn.Module) -> int:
    """Bytes of the weights a decode step reads: every parameter but the input embedding table (a step reads
    one row of it per token)."""
    embed = {id(p) for name, p in stage.named_parameters() if "embed_tokens" in name}
    return sum(p.numel() * p.element_size() for p in stage.parameters() if id(p) not in embed)


class _Run:
    """One batch's prefill into its own static cache, then decode steps through a ``DecodeGraph`` (``graphed``)
    or the stage's eager forward. ``tokens``/``compile_s``: the first decode step's choice and wall time."""

    tokens: torch.Tensor
    compile_s: float

    def __init__(self, step_fn, stage, ids: torch.Tensor, gen_len: int, graphed: bool = True) -> None:
        from hpi.executor.graphs import DecodeGraph, StaticKVCache

        self.prompt_len = ids.shape[1]
        self.cache = StaticKVCache(self.prompt_len + gen_len)
        self.device = ids.device
        with torch.no_grad():
            self.first = stage(ids, self.cache, torch.arange(self.prompt_len, device=self.device)).argmax(-1)
        self.graph = DecodeGraph(step_fn, capture=True) if graphed else torch.no_grad()(step_fn)

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """The greedy tokens after feeding ``tokens`` [b] at decode step ``t`` (position prompt_len + t)."""
        position = torch.tensor([self.prompt_len + t], device=self.device)
        return self.graph(tokens[:, None], self.cache, position).argmax(-1)

    def time_ms(self, tokens: torch.Tensor, replays: int) -> float:
        position = torch.tensor([self.prompt_len], device=self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(3):
            self.graph(tokens[:, None], self.cache, position)
        start.record()
        for _ in range(replays):
            self.graph(tokens[:, None], self.cache, position)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / replays


def _share(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a == b).float().mean().item()


def _profile(runs: dict[str, _Run], tokens: torch.Tensor, path: Path, title: str) -> None:
    """Append each run's kernel table (20 replays) to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    with path.open("a") as out:
        for name, run in runs.items():
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run.time_ms(tokens, 20)
            out.write(f"== {title}: {name}, 20 replays ==\n")
            out.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30) + "\n")


# The graphs compared, in order: (name, compiled, hpi's split-KV decode attention). The first is the baseline the
# others are fed tokens from and compared with; the last is what ``hpi run`` replays on a GPU now.
VARIANTS = (("eager", False, False), ("compiled_sdpa", True, False), ("compiled_split", True, True))


def _variant_run(stage, ids: torch.Tensor, gen_len: int, compiled: bool, split_kv: bool,
                 feed: torch.Tensor | None) -> _Run:
    """A run whose first decode step is captured now, with the attention switch set for it: a captured graph
    keeps the kernels it recorded, so the switch may change for the next variant. Each compiled variant is
    traced afresh (``torch._dynamo.reset``) with its own switch. ``feed``: the first decode step's input tokens
    (the baseline's prefill choice; None: this run's own)."""
    from hpi.executor.decode_attention import use_split_kv
    from hpi.executor.graphs import COMPILE_OPTIONS

    use_split_kv(split_kv)
    if compiled:
        torch._dynamo.reset()
    step_fn = torch.compile(stage, dynamic=False, options=COMPILE_OPTIONS) if compiled else stage
    run = _Run(step_fn, stage, ids, gen_len)
    t0 = time.perf_counter()
    run.tokens = run.step(run.first if feed is None else feed, 0)
    run.compile_s = time.perf_counter() - t0
    return run


def measure(stage, vocab: int, batch: int, prompt_len: int, gen_len: int, replays: int, device,
            reference=None, profile_path: Path | None = None, variants: tuple = VARIANTS) -> dict:
    """One batch's row: every graph of ``variants`` (the first the baseline) timed and compared."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=g).to(device)
    runs: dict[str, _Run] = {}
    for name, compiled, split in variants:
        feed = runs[variants[0][0]].first if runs else None
        runs[name] = _variant_run(stage, ids, gen_len, compiled, split, feed)
    base_name = variants[0][0]
    base = runs[base_name]
    ref = _Run(reference, reference, ids, gen_len, graphed=False) if reference is not None else None
    agree = {name: [_share(base.first, run.first)] for name, run in runs.items() if run is not base}
    if ref is not None:
        for name, run in runs.items():
            agree[f"{name}_vs_fp32"] = [_share(ref.first, run.first)]
    tokens = base.first
    for t in range(gen_len - 1):
        choices = {name: run.tokens if t == 0 else run.step(tokens, t) for name, run in runs.items()}
        for name in runs:
            if runs[name] is not base:
                agree[name].append(_share(choices[base_name], choices[name]))
        if ref is not None:
            ref_choice = ref.step(tokens, t)
            for name in runs:
                agree[f"{name}_vs_fp32"].append(_share(ref_choice, choices[name]))
        tokens = choices[base_name]  # every path is fed the baseline's choice
    ms = {name: run.time_ms(tokens, replays) for name, run in runs.items()}
    if profile_path is not None:
        _profile(runs, tokens, profile_path, f"batch {batch}, {prompt_len + gen_len} cache slots")
    row = {"batch": batch, "positions": gen_len, "cache_slots": prompt_len + gen_len, "baseline": base_name}
    row.update({f"agree_{k}": sum(v) / len(v) for k, v in agree.items()})
    row.update({f"{name}_ms": v for name, v in ms.items()})
    row.update({f"{name}_compile_s": runs[name].compile_s for name, compiled, _ in variants if compiled})
    for name, _, _ in variants[:-1]:
        row[f"{variants[-1][0]}_over_{name}"] = ms[variants[-1][0]] / ms[name]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=512)
    p.add_argument("--replays", type=int, default=200)
    p.add_argument("--hardware", default="h200-1gpu", help="profile whose HBM ceiling the step is compared with")
    p.add_argument("--reference", action="store_true", help="also teacher-force the same weights in fp32")
    p.add_argument("--profile", default=None, metavar="FILE", help="append torch.profiler kernel tables to FILE")
    p.add_argument("--variants", default=",".join(v[0] for v in VARIANTS),
                   help="graphs to compare, the first the baseline (default: all of " +
                        ", ".join(v[0] for v in VARIANTS) + ")")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    known = {v[0]: v for v in VARIANTS}
    names = args.variants.split(",")
    if not names or any(n not in known for n in names):
        p.error(f"--variants {args.variants}: choose from {', '.join(known)}")
    variants = tuple(known[n] for n in names)
    from hpi.planner.profiles import load_profile

    device = torch.device("cuda")
    config, stage = _stage(args.model, device)
    weight_bytes = _weight_bytes_per_step(stage)
    hbm = load_profile(args.hardware).gpu.hbm_bandwidth_bytes_s
    limit_ms = weight_bytes / hbm * 1e3
    reference = copy.deepcopy(stage).float() if args.reference else None
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        row = measure(stage, config.vocab_size, batch, args.prompt_len, args.gen_len, args.replays, device,
                      reference, Path(args.profile) if args.profile else None, variants)
        row.update(model=args.model, weight_bytes=weight_bytes, hbm_limit_ms=limit_ms,
                   **{f"{name}_of_limit": limit_ms / row[f"{name}_ms"] for name, _, _ in variants},
                   torch=torch.__version__, device=torch.cuda.get_device_name(device))
        rows.append(row)
        print(json.dumps(row), flush=True)
    b1 = next((r for r in rows if r["batch"] == 1), None)
    summary = {"rows": rows}
    if b1:
        summary["batch_over_b1"] = {r["batch"]: {name: r[f"{name}_ms"] / b1[f"{name}_ms"] for name, _, _ in variants}
                                    for r in rows}
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary.get("batch_over_b1", {})))


if __name__ == "__main__":
    main()
