"""DeepSpeed's dequantization of 8/4-bit weights against hpi's fused kernels (``hpi.executor.dequant``), per weight.

    python benchmarks/dequant_bench.py                          # H200: the 70B's weight shapes, bf16
    python benchmarks/dequant_bench.py --block-elems 4096       # the Triton kernel with another block
    python benchmarks/dequant_bench.py --device cpu --small     # tiny shapes, to check that it runs

For each weight shape of Llama-3-70B (q/o 8192x8192, k/v 1024x8192, gate/up 28672x8192, down 8192x28672) and
4 and 8 bits: a random weight quantized by DeepSpeed's ``Quantizer`` (group 64 along the input dimension, as
``zero.Init``'s quantized initialization does), then, timed alternately, each path of ``--paths``:
``deepspeed`` (``DeQuantizer.dequantize``: torch element-wise ops in bf16, its CUDA kernel in fp16 where its op
loads), ``triton`` (``triton_dequantize``: hpi's hand-written Triton kernel, what ``fused_dequantize`` runs on CUDA;
on the CPU Triton's interpreter, slow) and ``inductor`` (``inductor_dequantize``: the ``torch.compile``'d kernel,
hpi's CPU path and its CUDA path before the Triton kernel). Both hpi paths include ``fused_dequantize``'s checks.
On CUDA each call sits between two events, after a 256 MiB write that evicts the L2 (the weights arrive from the
host, not from a cache); the median of ``--reps`` after ``--warmup`` calls. GB/s is the 16-bit output written
per second (the planner's ``src/planner/cost/dequant.py`` prices the traffic: ~17 bytes an element for
DeepSpeed's 4-bit bf16 path, ~2.6 for a fused one). ``<path>_identical`` is the fraction of output elements whose
bits equal DeepSpeed's (1.0 expected). ``<path>_host_us``: the host's time to issue one call (a 70B decode step
issues 560: 7 matrices x 80 layers), its median: the Triton kernel is there to cut it (inductor's measured
151-334 µs against DeepSpeed's 78-283 on one H200: ``benchmarks/results/2026-12-04-h200-fused/call2``).

One JSON line per case, then a summary JSON line (kind ``hpi.DequantBench``) with each path's totals and the
median and largest host time per call.
"""

from __future__ import annotations

import argparse
import functools
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
PATHS = ("deepspeed", "triton", "inductor")
DEFAULT_PATHS = {"cuda": PATHS, "cpu": ("deepspeed", "inductor")}  # the interpreter's times mean nothing


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes (a CPU check that the script runs)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="compute dtype (default bf16)")
    p.add_argument("--bits", default="4,8", help="comma-separated bit widths (default 4,8)")
    p.add_argument("--reps", type=int, default=20, help="timed calls per side (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per side first (default 3)")
    p.add_argument("--paths", help=f"comma-separated, deepspeed first, of {','.join(PATHS)} (default: all on "
                   f"cuda; {','.join(DEFAULT_PATHS['cpu'])} on cpu)")
    p.add_argument("--block-elems", type=int, help="the Triton kernel's output elements per program, a power of "
                   "two (default: hpi.executor.dequant_triton.BLOCK_ELEMS)")
    a = p.parse_args(argv)
    a.paths = tuple(a.paths.split(",")) if a.paths else DEFAULT_PATHS[a.device]
    if a.paths[0] != "deepspeed" or len(set(a.paths)) != len(a.paths) or not set(a.paths) <= set(PATHS):
        p.error(f"--paths {','.join(a.paths)}: deepspeed first (the reference), then any of triton, inductor once")
    if a.block_elems is not None and (a.block_elems < 1 or a.block_elems & (a.block_elems - 1)):
        p.error(f"--block-elems {a.block_elems} must be a power of two (tl.arange)")
    return a


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


def path_fns(packed, scale, minimum, bits: int, ds, paths) -> dict:
    """Each path's call on one quantized weight."""
    from hpi.executor import dequant

    hpi = {"triton": dequant.triton_dequantize, "inductor": dequant.inductor_dequantize}
    fns = {"deepspeed": lambda: ds.dequantize(packed, scale, minimum)}
    for name in paths[1:]:
        fns[name] = functools.partial(hpi[name], packed, scale, minimum, bits=bits, group_size=GROUP)
    return fns


def one_case(shape, bits: int, dtype, device, timer: Timer, a: argparse.Namespace) -> dict:
    import torch
    from deepspeed.inference.quantization.utils import DeQuantizer, Quantizer

    cfg = {"num_bits": bits, "group_size": GROUP, "group_dim": 1, "symmetric": False}
    gen = torch.Generator(device=device).manual_seed(0)
    packed, scale, minimum = Quantizer(cfg).quantize(torch.randn(shape, generator=gen, device=device, dtype=dtype))
    del gen
    fns = path_fns(packed, scale, minimum, bits, DeQuantizer(cfg, dtype), a.paths)
    case = {"shape": list(shape), "bits": bits, "dtype": a.dtype, "reps": a.reps}
    for name in a.paths[1:]:
        t0 = time.perf_counter()
        fns[name]()
        case[f"first_{name}_call_s"] = time.perf_counter() - t0  # the compile, for the first case of a bit width
    for _ in range(a.warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in a.paths}
    for _ in range(a.reps):  # alternate, so drift (clocks, thermals) hits every path alike
        for name, fn in fns.items():
            times[name].append(timer(fn))
    theirs = fns["deepspeed"]()
    out_bytes = shape[0] * shape[1] * torch.tensor([], dtype=dtype).element_size()
    for name, pairs in times.items():
        med = statistics.median(t for t, _ in pairs)
        case[f"{name}_s"] = med
        case[f"{name}_out_gb_s"] = out_bytes / med / 1e9
        case[f"{name}_host_us"] = statistics.median(h for _, h in pairs) * 1e6
        if name != "deepspeed":
            case[f"{name}_speedup"] = case["deepspeed_s"] / med
            case[f"{name}_identical"] = identical_fraction(fns[name](), theirs)
    return case


def summarize(cases: list[dict], a: argparse.Namespace, device_name: str, torch_version: str) -> dict:
    """Per path: total median seconds over the cases, speedup over DeepSpeed's, host µs per call (median, max)."""
    summary = {"kind": "hpi.DequantBench", "device": device_name, "torch": torch_version, "dtype": a.dtype,
               "small": a.small, "cases": len(cases), "paths": list(a.paths)}
    if "triton" in a.paths:
        from hpi.executor import dequant_triton

        summary["triton_block_elems"] = dequant_triton.BLOCK_ELEMS
    for name in a.paths:
        summary[f"{name}_total_s"] = sum(c[f"{name}_s"] for c in cases)
        hosts = [c[f"{name}_host_us"] for c in cases]
        summary[f"{name}_host_us_median"] = statistics.median(hosts)
        summary[f"{name}_host_us_max"] = max(hosts)
        if name != "deepspeed":
            summary[f"{name}_speedup_total"] = summary["deepspeed_total_s"] / summary[f"{name}_total_s"]
            summary[f"{name}_speedup_min"] = min(c[f"{name}_speedup"] for c in cases)
            summary[f"{name}_speedup_max"] = max(c[f"{name}_speedup"] for c in cases)
            summary[f"{name}_identical_min"] = min(c[f"{name}_identical"] for c in cases)
    summary["all_identical"] = all(c[f"{name}_identical"] == 1.0 for c in cases for name in a.paths[1:])
    return summary


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    import torch

    if a.block_elems is not None:
        from hpi.executor import dequant_triton

        dequant_triton.BLOCK_ELEMS = a.block_elems
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
    name = torch.cuda.get_device_name(device) if a.device == "cuda" else platform.processor() or "cpu"
    print(json.dumps(summarize(cases, a, name, torch.__version__)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
