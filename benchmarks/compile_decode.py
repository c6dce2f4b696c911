"""Compiled vs eager graphed decode of a GPU-resident model, side by side in one process (issue 20, resident).

    python benchmarks/compile_decode.py --model llama-3-8b --batches 1,16 --prompt-len 128 --gen-len 512 \
        --hardware h200-1gpu --out compile.json

One stage holds the whole model (hpi's seeded random weights, bf16). For each batch size:

- tokens: the eager graphed step (``DecodeGraph`` over the stage, what ``hpi run --no-compile-decode`` replays)
  generates ``gen_len`` greedy tokens; the compiled graphed step (``graphs.compiled_step``) is fed the same
  tokens (teacher forcing, its own KV cache) and its greedy choice at each position is compared with the eager
  one: the share of positions where they agree. Random weights give small argmax margins, so this is a harsh
  test of bf16 numerics; free-running generations would diverge at the first disagreement and say less.
  With ``--reference`` the same weights in fp32 (eager, teacher-forced alike) say which of the two bf16 paths
  agrees more often with the higher-precision choice.
- time: each graph replayed ``--replays`` times at a fixed position (the step's cache write is idempotent), CUDA
  events around all of them: ms per step, the weights' bytes over it against the profile's HBM ceiling
  (``hbm_bytes_s``), and the compiled step over the eager one.
- compile: the wall time of the compiled graph's first call (torch.compile's work, then the capture).
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
    or the stage's eager forward."""

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


def measure(stage, vocab: int, batch: int, prompt_len: int, gen_len: int, replays: int, device,
            reference=None, profile_path: Path | None = None) -> dict:
    from hpi.executor.graphs import compiled_step

    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=g).to(device)
    eager, compiled = _Run(stage, stage, ids, gen_len), _Run(compiled_step(stage), stage, ids, gen_len)
    ref = _Run(reference, reference, ids, gen_len, graphed=False) if reference is not None else None
    agree = {"compiled_vs_eager": [_share(eager.first, compiled.first)], "eager_vs_fp32": [], "compiled_vs_fp32": []}

    def vs_reference(choice_ref, choice_eager, choice_compiled):
        agree["eager_vs_fp32"].append(_share(choice_ref, choice_eager))
        agree["compiled_vs_fp32"].append(_share(choice_ref, choice_compiled))

    if ref is not None:
        vs_reference(ref.first, eager.first, compiled.first)
    tokens = eager.first
    t0 = time.perf_counter()
    compiled_tokens = compiled.step(tokens, 0)
    compile_s = time.perf_counter() - t0
    for t in range(gen_len - 1):
        eager_tokens = eager.step(tokens, t)
        compiled_tokens = compiled_tokens if t == 0 else compiled.step(tokens, t)
        agree["compiled_vs_eager"].append(_share(eager_tokens, compiled_tokens))
        if ref is not None:
            vs_reference(ref.step(tokens, t), eager_tokens, compiled_tokens)
        tokens = eager_tokens  # every path is fed the eager path's choice
    eager_ms = eager.time_ms(tokens, replays)
    compiled_ms = compiled.time_ms(tokens, replays)
    if profile_path is not None:
        _profile({"eager graph": eager, "compiled graph": compiled}, tokens, profile_path,
                 f"batch {batch}, {prompt_len + gen_len} cache slots")
    shares = {k: sum(v) / len(v) for k, v in agree.items() if v}
    return {"batch": batch, "positions": len(agree["compiled_vs_eager"]), "agree": shares["compiled_vs_eager"],
            **{f"agree_{k}": v for k, v in shares.items() if k != "compiled_vs_eager"}, "eager_ms": eager_ms,
            "compiled_ms": compiled_ms, "compiled_over_eager": compiled_ms / eager_ms, "compile_s": compile_s}


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
    p.add_argument("--out", required=True)
    args = p.parse_args()
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
                      reference, Path(args.profile) if args.profile else None)
        row.update(model=args.model, weight_bytes=weight_bytes, hbm_limit_ms=limit_ms,
                   eager_of_limit=limit_ms / row["eager_ms"], compiled_of_limit=limit_ms / row["compiled_ms"],
                   torch=torch.__version__, device=torch.cuda.get_device_name(device))
        rows.append(row)
        print(json.dumps(row), flush=True)
    b1 = next((r for r in rows if r["batch"] == 1), None)
    summary = {"rows": rows}
    if b1:
        summary["batch_over_b1"] = {r["batch"]: {"eager": r["eager_ms"] / b1["eager_ms"],
                                                 "compiled": r["compiled_ms"] / b1["compiled_ms"]} for r in rows}
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary.get("batch_over_b1", {})))


if __name__ == "__main__":
    main()
