"""Does asking L2 for a small product's weights while the attention runs make the product faster? (issue 20, the
H200's batch-1 step.)

Why: in the compiled Llama-3-8B batch-1 step each decoder layer runs its attention between the q/k/v product and
o_proj (rotary and cache write, the split pass, the combine: ~10 µs on one H200, benchmarks/results/
2026-12-04-h200-split/call2/profile-544.txt) while HBM sits nearly idle: those kernels read ~2 MB of cache. Then
o_proj reads its 33.5 MB weight at ~3 TB/s, ramp and tail included, where the big FFN products read at 4.1 TB/s.
On the H200, whose HBM limit is 3.54 ms a step, those fixed costs are what stand between 4.45 ms and 4.42 (0.8 of
it). If the weight is asked of L2 before the attention, the attention's idle HBM time fills it and o_proj reads
from L2.

What this measures, each in one CUDA graph of ``--layers`` repetitions, replayed ``--replays`` times between two
CUDA events (µs a repetition, median of ``--repeats`` timings), all in one process:

- ``evict``: a ``--evict-mb`` product (the FFN's gate/up stand-in: it streams past L2, as a step does), then a
  spin of ``--window-us`` (the attention stand-in: ``torch.cuda._sleep``, one SM and no memory traffic).
- ``plain``: ``evict``, then the small product (``F.linear``, 1 row, ``--n`` x ``--k``); its cost is plain - evict.
- ``bulk``: ``evict`` with a bulk L2 prefetch of the small weight launched before the spin
  (``cp.async.bulk.prefetch.L2.global``, sm_90: one instruction per ``--chunk-kb`` of the weight), then the product.
- ``lines``: the same with one ``prefetch.global.L2`` per 128-byte line (any sm_80+ GPU; the issuing threads wait
  on the memory system, so the prefetch kernel may hold the stream as long as the copy takes).
- ``hot``: ``plain`` with the product run twice; the second reads L2 (``hot`` - ``plain``: the product from L2).
- ``bulk_only``: ``evict`` with the bulk prefetch and no product (what the prefetch costs the stream).
- ``bulk_side`` / ``lines_side``: the prefetch on a side stream forked before the spin and joined after it, so it
  runs beside the spin.

Printed: each variant's µs a repetition, the product's µs under each (variant - evict), and ratios against plain.

    python3 benchmarks/l2_prefetch_bench.py --windows 0,5,10,20 --out $OUT/l2.json

GPU only (sm_80+; ``bulk`` needs sm_90): it exits 2 with one line elsewhere.

Measured (one H100, 2026-12-07, benchmarks/results/2026-12-07-l2-prefetch): the bulk kernel holds its stream ~10 µs
for 33.6 MB; beside a 10 µs spin, on a side stream, the product took 0.78x its plain time (``hot``: 0.77x), on its own
stream 1.5-1.6x; in the 8B's batch-1 step both forms were slower, so hpi does not prefetch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from graph_timing import captured, replay_us

LINE = 128


def _kernels():
    """(bulk, lines): one ``cp.async.bulk.prefetch.L2.global`` a thread for a chunk of the weight (sm_90), or one
    ``prefetch.global.L2`` a thread for each of its 128-byte lines."""
    import triton
    import triton.language as tl

    @triton.jit
    def bulk(base_ptr, nbytes, CHUNK: tl.constexpr, PER_PROGRAM: tl.constexpr):
        c = tl.program_id(0) * PER_PROGRAM + tl.arange(0, PER_PROGRAM)
        start = c.to(tl.int64) * CHUNK
        inside = start < nbytes
        start = tl.where(inside, start, 0)  # a thread past the end asks for the first 16 bytes again
        size = tl.where(inside, tl.minimum(nbytes - start, CHUNK), 16).to(tl.int32)
        tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; // dummy $0", "=r,l,r",
                                  [base_ptr + start, size], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def lines(base_ptr, nbytes, PER_PROGRAM: tl.constexpr, LINE_BYTES: tl.constexpr):
        off = (tl.program_id(0) * PER_PROGRAM + tl.arange(0, PER_PROGRAM)).to(tl.int64) * LINE_BYTES
        off = tl.minimum(off, nbytes - 1)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [base_ptr + off],
                                  dtype=tl.int32, is_pure=False, pack=1)

    return bulk, lines


def launch_grid(nbytes: int, kind: str, chunk_bytes: int) -> tuple[int, int]:
    """(programs, per program) that ask for ``nbytes``: 32 chunks a one-warp program ("bulk"), or 1,024 lines a
    four-warp program ("lines")."""
    per_program, unit = (32, chunk_bytes) if kind == "bulk" else (1024, LINE)
    return -(-nbytes // (unit * per_program)), per_program


def prefetcher(weight: torch.Tensor, kind: str, chunk_bytes: int):
    """A call that asks L2 for every byte of ``weight`` (contiguous, 16-byte aligned, a multiple of 16 bytes)."""
    flat = weight.reshape(-1).view(torch.uint8)
    nbytes = flat.numel()
    assert flat.data_ptr() % 16 == 0 and nbytes % 16 == 0 and chunk_bytes % 16 == 0, "bulk prefetch: 16-byte units"
    bulk, lines = _kernels()
    programs, per_program = launch_grid(nbytes, kind, chunk_bytes)
    if kind == "bulk":
        return lambda: bulk[(programs,)](flat, nbytes, CHUNK=chunk_bytes, PER_PROGRAM=per_program, num_warps=1)
    return lambda: lines[(programs,)](flat, nbytes, PER_PROGRAM=per_program, LINE_BYTES=LINE, num_warps=4)


def spin_cycles(window_us: float) -> int:
    """``torch.cuda._sleep`` cycles for about ``window_us`` µs at the GPU's clock (timed, not assumed)."""
    if window_us <= 0:
        return 0
    probe = 1_000_000
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(probe)
    begin.record()
    torch.cuda._sleep(probe)
    end.record()
    torch.cuda.synchronize()
    return max(1, int(probe * window_us / (begin.elapsed_time(end) * 1e3)))


def graph_us(body, layers: int, replays: int, repeats: int) -> float:
    """µs one ``body`` takes, as the median over ``repeats`` of a graph of ``layers`` bodies replayed ``replays``
    times between events (the first replay outside the timing)."""
    def repeated():
        for _ in range(layers):
            body()

    graph = captured(repeated)
    return statistics.median(replay_us(graph, replays) / layers for _ in range(repeats))


def measure(args, window_us: float) -> dict:
    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    big_n = int(args.evict_mb * 1e6 / (2 * args.k))
    w_big = torch.randn(big_n, args.k, device=dev, dtype=dt, generator=gen)
    w = torch.randn(args.n, args.k, device=dev, dtype=dt, generator=gen)
    x = torch.randn(1, args.k, device=dev, dtype=dt, generator=gen)
    cycles = spin_cycles(window_us)
    bulk, lines = prefetcher(w, "bulk", args.chunk_kb * 1024), prefetcher(w, "lines", 16)
    sm90 = torch.cuda.get_device_capability(dev) >= (9, 0)

    side = torch.cuda.Stream()

    def body(prefetch=None, products=0, beside=False):
        def run():
            F.linear(x, w_big)
            main = torch.cuda.current_stream()
            if prefetch is not None and beside:  # forked before the spin, joined before the product
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    prefetch()
            elif prefetch is not None:
                prefetch()
            if cycles:
                torch.cuda._sleep(cycles)
            if prefetch is not None and beside:
                main.wait_stream(side)
            for _ in range(products):
                F.linear(x, w)
        return run

    variants = {"evict": body(), "plain": body(products=1), "hot": body(products=2), "lines": body(lines, 1),
                "lines_side": body(lines, 1, beside=True)}
    if sm90:
        variants |= {"bulk": body(bulk, 1), "bulk_only": body(bulk), "bulk_side": body(bulk, 1, beside=True)}
    us = {name: graph_us(fn, args.layers, args.replays, args.repeats) for name, fn in variants.items()}
    product = {name: us[name] - us["evict"] for name in ("plain", "lines", "bulk", "lines_side", "bulk_side")
               if name in us}
    product["hot"] = us["hot"] - us["plain"]
    weight_bytes = args.n * args.k * 2
    return {"window_us": window_us, "spin_cycles": cycles, "us": us, "product_us": product,
            "product_tb_s": {k: weight_bytes / (v * 1e-6) / 1e12 for k, v in product.items() if v > 0},
            "vs_plain": {k: v / product["plain"] for k, v in product.items()}}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, f"l2_prefetch_bench: {message}\n")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096, help="the small product's outputs (Llama-3-8B o_proj: 4096)")
    p.add_argument("--k", type=int, default=4096, help="its inputs")
    p.add_argument("--evict-mb", type=float, default=235.0, help="the product before, streamed past L2 (gate/up)")
    p.add_argument("--windows", type=lambda t: [float(v) for v in t.split(",")], default=[0.0, 5.0, 10.0, 20.0],
                   help="µs of the attention stand-in between the prefetch and the product")
    p.add_argument("--chunk-kb", type=int, default=64, help="bytes a bulk prefetch instruction asks for")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="l2.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        print("l2_prefetch_bench: needs a CUDA GPU of sm_80 or newer; run it on the device", file=sys.stderr)
        return 2
    rows = [measure(args, window) for window in args.windows]
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args), "rows": rows}
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"{record['device']}: product {args.n}x{args.k} bf16 ({args.n * args.k * 2 / 1e6:.1f} MB) after a "
          f"{args.evict_mb:.0f} MB product and a spin; µs a repetition, median of {args.repeats}")
    for row in rows:
        us, prod, ratio = row["us"], row["product_us"], row["vs_plain"]
        print(f"window {row['window_us']:5.1f} µs: evict {us['evict']:7.2f} | product plain {prod['plain']:6.2f}"
              + "".join(f" | {k} {prod[k]:6.2f} ({ratio[k]:.2f}x)"
                        for k in ("lines", "bulk", "lines_side", "bulk_side", "hot") if k in prod)
              + (f" | bulk_only {us['bulk_only'] - us['evict']:+.2f}" if "bulk_only" in us else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
