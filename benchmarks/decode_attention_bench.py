"""The split-KV decode attention kernel (``hpi.executor.decode_attention``) at several grid sizes, side by side in one
process, against sdpa over the same cache (issue 20, resident: the batch-16 step).

Why: on one H100 the compiled Llama-3-8B step took 7.55 ms at batch 16 against 5.96 ms at batch 1 (1.27x;
benchmarks/results/2026-12-05-h100-issue20), where issue 20 asks for 1.15x. Pass 1's splits come from
``TARGET_PROGRAMS`` (256: about two programs per SM) divided by rows x KV heads, so at batch 16 (128 row-head pairs)
the cache of 1,024 slots is cut in 2 splits of 512 slots: 128 programs that each walk 8 blocks one after another,
one program an SM, where at batch 1 every program reads one block. This script times the kernel at each
``--targets`` value (the module constant, set for the call) so the grid that reads the cache fastest shows in one run.

Each call is captured in a CUDA graph (as the decode step replays it) and replayed ``--replays`` times between two CUDA
events: µs a call. The cache holds ``--slots`` slots of which the first ``--position`` + 1 are attended (a graphed
step's static causal mask at that position); its bytes read are the attended keys and values. Every output is
compared with sdpa's (``grouped_sdpa``) on the same inputs: ``max_abs_err``.

    python3 benchmarks/decode_attention_bench.py --batches 1,16,64 --targets 256,512,1024,2048 --out $OUT/attn.json

``--blocks``, ``--warps`` and ``--stages`` sweep pass 1's launch too (the module's ``BLOCK_N``, ``WARPS``, ``STAGES``),
and ``--walks`` how a program walks its split (the module's ``WALK``, one of ``WALKS``): every combination with
every target. Each row names its µs over the module's own walk at the same launch (``over_default_walk``) and the
walk the launch ran (``walk_launched``: a split of one block walks untrimmed, ``decode_attention.launched_walk``).
``--positions`` times several decode positions of one cache (a generation's start, middle and end).

On a CPU (``--device cpu``, ``TRITON_INTERPRET=1``) the kernels run in Triton's interpreter, timed with
``time.perf_counter`` (``"timer": "perf_counter"``; not a GPU number): the tests run it so on tiny shapes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from graph_timing import time_us

from hpi.executor import decode_attention as da


def _inputs(batch: int, heads: int, kv_heads: int, head_dim: int, slots: int, position: int, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(batch)
    q = torch.randn(batch, heads, head_dim, generator=g).to(device, dtype)
    k = torch.randn(batch, kv_heads, slots, head_dim, generator=g).to(device, dtype)
    v = torch.randn(batch, kv_heads, slots, head_dim, generator=g).to(device, dtype)
    allowed = (torch.arange(slots) <= position)[None, :].to(device)
    return q, k, v, allowed


def measure(batch: int, targets: list[int], *, heads: int, kv_heads: int, head_dim: int, slots: int, position: int,
            replays: int, device: torch.device, dtype: torch.dtype,
            launches: list[tuple[int, int, int]] | None = None, walks: list[str] | None = None) -> list[dict]:
    """One row for sdpa and one per target of pass 1's programs, launch (block of slots, warps, stages; default
    the module's own) and walk (default the module's), on the same inputs."""
    q, k, v, allowed = _inputs(batch, heads, kv_heads, head_dim, slots, position, device, dtype)
    scale = head_dim ** -0.5
    reference = da.grouped_sdpa(q, k, v, allowed, scale).float()
    kv_bytes = 2 * batch * kv_heads * (position + 1) * head_dim * k.element_size()
    base = dict(batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim, slots=slots, position=position,
                dtype=str(dtype).removeprefix("torch."), kv_bytes=kv_bytes)

    def row(kernel: str, us: float, timer: str, out: torch.Tensor, **extra) -> dict:
        return {**base, "kernel": kernel, **extra, "us_per_call": round(us, 3), "timer": timer,
                "kv_gb_s": round(kv_bytes / us / 1e3, 2),
                "max_abs_err": float((out.float() - reference).abs().max())}

    us, timer = time_us(lambda: da.grouped_sdpa(q, k, v, allowed, scale), replays, device)
    rows = [row("sdpa", us, timer, reference)]
    saved = (da.TARGET_PROGRAMS, da.BLOCK_N, da.WARPS, da.STAGES, da.WALK)
    try:
        for target, (block, warps, stages), walk in itertools.product(targets, launches or [saved[1:4]],
                                                                      walks or [saved[4]]):
            da.TARGET_PROGRAMS, da.BLOCK_N, da.WARPS, da.STAGES, da.WALK = target, block, warps, stages, walk
            launch = dict(target_programs=target, block=block, warps=warps, stages=stages, walk=walk)
            try:
                out = da.triton_decode_attention(q, k, v, allowed, scale)
            except Exception as e:  # a launch this GPU cannot hold (Triton's OutOfResources: shared memory)
                rows.append({**base, "kernel": "split_kv", **launch, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            us, timer = time_us(lambda: da.triton_decode_attention(q, k, v, allowed, scale), replays, device)
            rows.append(row("split_kv", us, timer, out, **launch, splits=da.splits_for(batch, kv_heads, slots),
                            walk_launched=da.launched_walk(da.split_slots(batch, kv_heads, slots))))
    finally:
        da.TARGET_PROGRAMS, da.BLOCK_N, da.WARPS, da.STAGES, da.WALK = saved
    return _over_default_walk(rows, saved[4])


def _over_default_walk(rows: list[dict], default: str) -> list[dict]:
    """Each timed kernel row gets ``over_default_walk``: its µs over the row of the module's own walk with the same
    target and launch, measured in this process on these inputs (absent where that walk was not among --walks)."""
    def launch(r: dict) -> tuple:
        return r["target_programs"], r["block"], r["warps"], r["stages"]

    timed = [r for r in rows if r["kernel"] == "split_kv" and "us_per_call" in r]
    base = {launch(r): r["us_per_call"] for r in timed if r["walk"] == default}
    for r in timed:
        if launch(r) in base:
            r["over_default_walk"] = round(r["us_per_call"] / base[launch(r)], 3)
    return rows


def _ints(text: str, least: int = 1) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < least:
        what = "positive integers" if least == 1 else f"integers >= {least}"
        raise argparse.ArgumentTypeError(f"{text!r}: give {what} separated by commas, e.g. {least},16")
    return values


def _positions(text: str) -> list[int]:
    return _ints(text, least=0)  # position 0: the first token attends to its own slot alone


def _walks(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names or any(n not in da.WALKS for n in names):
        raise argparse.ArgumentTypeError(f"{text!r}: give walks among {', '.join(da.WALKS)}, separated by commas")
    return names


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=_ints, default=[1, 16, 64])
    p.add_argument("--targets", type=_ints, default=[256, 512, 1024, 2048],
                   help="pass 1's programs to aim for (hpi.executor.decode_attention.TARGET_PROGRAMS)")
    p.add_argument("--blocks", type=_ints, default=None, help="pass 1's slots a block (default: BLOCK_N)")
    p.add_argument("--warps", type=_ints, default=None, help="pass 1's warps a program (default: WARPS)")
    p.add_argument("--stages", type=_ints, default=None, help="pass 1's pipeline stages (default: STAGES)")
    p.add_argument("--walks", type=_walks, default=None, help="pass 1's walks of its split (default: WALK)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--slots", type=int, default=1024, help="static cache slots (prompt + gen of the step's graph)")
    p.add_argument("--positions", type=_positions, default=[512],
                   help="decode positions, each a run of its own: slots 0..position are attended")
    p.add_argument("--replays", type=int, default=200)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", default=None, metavar="PATH.json")
    args = p.parse_args(argv)
    if args.heads % args.kv_heads:
        p.error(f"heads({args.heads}) % kv_heads({args.kv_heads}) != 0: give a head count that the KV heads divide")
    if max(args.positions) >= args.slots:
        p.error(f"position {max(args.positions)} not in [0, slots({args.slots})): attend inside the cache")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU, or pass --device cpu with TRITON_INTERPRET=1")
    if args.device == "cpu" and not da.INTERPRETED:
        p.error("--device cpu runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    launches = list(itertools.product(args.blocks or [da.BLOCK_N], args.warps or [da.WARPS],
                                      args.stages or [da.STAGES]))
    rows = []
    for batch, position in itertools.product(args.batches, args.positions):
        for r in measure(batch, args.targets, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                         slots=args.slots, position=position, replays=args.replays, device=device,
                         dtype=dtype, launches=launches, walks=args.walks):
            print(json.dumps(r), flush=True)
            rows.append(r)
    if args.out:
        Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
