"""DeepSpeed's dequantization of 8/4-bit weights against hpi's fused kernel (``hpi.executor.dequant``), per weight.

    python benchmarks/dequant_bench.py                          # H200: the 70B's weight shapes, bf16
    python benchmarks/dequant_bench.py --device cpu --small     # tiny shapes, to check that it runs

For each weight shape of Llama-3-70B (q/o 8192x8192, k/v 1024x8192, gate/up 28672x8192, down 8192x28672) and
4 and 8 bits: a random weight quantized by DeepSpeed's ``Quantizer`` (group 64 along the input dimension, as
``zero.Init``'s quantized initialization does), then ``DeQuantizer.dequantize`` (DeepSpeed: torch element-wise
ops in bf16, its CUDA kernel in fp16 where its op loads) and ``fused_dequantize`` (ours: one inductor kernel)
timed alternately. On CUDA each call sits between two events, after a 256 MiB write that evicts the L2 (the
weights arrive from the host, not from a cache); the median of ``--reps`` after ``--warmup`` calls. GB/s is
the 16-bit output written per second (the planner's ``src/planner/cost/dequant.py`` prices the traffic:
~17 bytes an element for DeepSpeed's 4-bit bf16 path, ~2.6 for the fused one). ``identical`` is the fraction
of output elements whose bits equal DeepSpeed's (1.0 expected: ``EXACT_OPTIONS``). ``*_host_us``: the host's
time to issue one call (a 70B decode step issues 560: 7 matrices x 80 layers), its median.

One JSON line per case, then a summary JSON line (kind ``hpi.DequantBench``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

SHAPES_70B = ((8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672))
SHAPES_SMALL = ((256, 256), (64, 256), (448, 256), (256, 448))
GROUP = 64
L2_FLUSH_BYTES = 256 << 20
DTYPES = ("bf16", "fp16", "fp32")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes (a CPU check that the script runs)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="compute dtype (default bf16)")
    p.add_argument("--bits", default="4,8", help="comma-separated bit widths (default 4,8)")
    p.add_argument("--reps", type=int, default=20, help="timed calls per side (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per side first (default 3)")
    return p.parse_args(argv)


class Timer:
    """Seconds of one call: CUDA events around it after an L2 flush, or the host clock on the CPU."""

    def __init__(self, device) -> None:
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"
        self.flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if self.cuda else None

    def __call__(self, fn) -> tuple[float, float]:
        """(device seconds, host seconds to issue the call): 560 dequantizations a 70B decode step issue."""
        torch = self.torch
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            took = time.perf_counter() - t0
            return took, took
        self.flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        fn()
        host = time.perf_counter() - t0
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, host


def identical_fraction(a, b) -> float:
    """Share of elements with the same bits (a float compare would call -0 == 0 and NaN != NaN)."""
    import torch

    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return (a.view(ints) == b.view(ints)).double().mean().item()


def one_case(shape, bits: int, dtype, device, timer: Timer, a: argparse.Namespace) -> dict:
    import torch
    from deepspeed.inference.quantization.utils import DeQuantizer, Quantizer

    from hpi.executor.dequant import fused_dequantize

    cfg = {"num_bits": bits, "group_size": GROUP, "group_dim": 1, "symmetric": False}
    gen = torch.Generator(device=device).manual_seed(0)
    packed, scale, minimum = Quantizer(cfg).quantize(torch.randn(shape, generator=gen, device=device, dtype=dtype))
    del gen
    ds = DeQuantizer(cfg, dtype)

    def theirs():
        return ds.dequantize(packed, scale, minimum)

    def ours():
        return fused_dequantize(packed, scale, minimum, bits=bits, group_size=GROUP)

    t0 = time.perf_counter()
    ours()
    first_call_s = time.perf_counter() - t0  # the compile, for the first case of a bit width
    for _ in range(a.warmup):
        theirs()
        ours()
    times = {"deepspeed": [], "fused": []}
    for _ in range(a.reps):  # alternate, so drift (clocks, thermals) hits both alike
        times["deepspeed"].append(timer(theirs))
        times["fused"].append(timer(ours))
    identical = identical_fraction(ours(), theirs())
    out_bytes = shape[0] * shape[1] * torch.tensor([], dtype=dtype).element_size()
    med = {k: statistics.median(t for t, _ in v) for k, v in times.items()}
    host = {k: statistics.median(h for _, h in v) for k, v in times.items()}
    return {"shape": list(shape), "bits": bits, "dtype": a.dtype, "reps": a.reps,
            "deepspeed_s": med["deepspeed"], "fused_s": med["fused"], "speedup": med["deepspeed"] / med["fused"],
            "deepspeed_out_gb_s": out_bytes / med["deepspeed"] / 1e9, "fused_out_gb_s": out_bytes / med["fused"] / 1e9,
            "deepspeed_host_us": host["deepspeed"] * 1e6, "fused_host_us": host["fused"] * 1e6,
            "identical": identical, "first_fused_call_s": first_call_s}


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    import torch

    device = torch.device("cuda", 0) if a.device == "cuda" else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    timer = Timer(device)
    cases = []
    for bits in (int(b) for b in a.bits.split(",")):
        for shape in SHAPES_SMALL if a.small else SHAPES_70B:
            case = one_case(shape, bits, dtype, device, timer, a)
            print(json.dumps(case), flush=True)
            cases.append(case)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    total = {k: sum(c[k] for c in cases) for k in ("deepspeed_s", "fused_s")}
    summary = {"kind": "hpi.DequantBench", "device": torch.cuda.get_device_name(device) if a.device == "cuda"
               else platform.processor() or "cpu", "torch": torch.__version__, "dtype": a.dtype, "small": a.small,
               "cases": len(cases), "deepspeed_total_s": total["deepspeed_s"], "fused_total_s": total["fused_s"],
               "speedup_total": total["deepspeed_s"] / total["fused_s"],
               "speedup_min": min(c["speedup"] for c in cases), "speedup_max": max(c["speedup"] for c in cases),
               "identical_min": min(c["identical"] for c in cases),
               "all_identical": all(c["identical"] == 1.0 for c in cases)}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
