"""hpi's few-row product kernel (``hpi.executor.skinny_gemm``) against cuBLAS (``F.linear``) on a model's decode
products, side by side in one process, every launch configuration the runtime tuner times (issue 20, resident:
the batch-16 step).

Why: on one H100 the compiled Llama-3-8B step took 7.29-7.55 ms at batch 16 against 5.86-5.96 ms at batch 1
(1.24-1.27x), where issue 20 asks for 1.15x; its products ran at about 0.85 of the HBM copy rate in the step
(benchmarks/results/2026-12-06-issue20-ds-numel, call 2). This script says, per product shape of the model and
per row count, how fast each path reads the weight.

Timing as a decode step meets the products: each shape's weight is allocated in enough copies to fill
``--stream-mb`` (well past L2, so every product reads its weight from HBM, as a step over 32 layers does), one CUDA
graph runs the product over every copy back to back, and ``--replays`` replays between two CUDA events give µs a
product and the weight's GB/s. Per row count: cuBLAS, then every configuration of ``skinny_gemm.candidates``
(``config``, ``us``), the one the runtime tuner picks (``triton.testing.do_bench`` on one copy, L2 cleared; what
``hpi run`` uses: ``tuned``), and around the graph's best its warps and pipeline stages (``--sweep``); on a GPU with
dependent launches (Hopper on) the tuned pick and the best again as dependent launches (``tuned_pdl``, ``best_pdl``,
timed once where the best is the tuned pick: ``hpi.executor.dependent_launch``; each product may warm L2 with its
first weight tiles while the one before finishes). Every output is
compared with a float64 product: ``max_abs_err``. The model's step: each shape's µs times its products per step
(``step_products_ms``), for cuBLAS, the tuned pick and the best found.

    python3 benchmarks/skinny_gemm_bench.py --model llama-3-8b --rows 1,2,4,8,16 --out $OUT/skinny.json

On a CPU (``--device cpu``, ``TRITON_INTERPRET=1``) the kernels run in Triton's interpreter, timed with
``time.perf_counter`` (``"timer": "perf_counter"``; not a GPU number): the tests run it so on tiny shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from graph_timing import time_us

from hpi.executor import dependent_launch
from hpi.executor import skinny_gemm as sg

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_products(model: str, stacked: bool = False) -> dict[tuple[int, int], dict]:
    """{(N, K): {"names": [...], "per_step": products a decode step runs}} of a dense decoder's linears, from its
    config (``hpi.executor.modeling.load_hf_config``): the attention's and MLP's per layer, the LM head once.
    ``stacked``: q/k/v as one product and gate/up as one (``skinny_gemm.SIBLINGS``), as ``hpi run`` runs them."""
    from hpi.executor.modeling import load_hf_config

    c = load_hf_config(model)
    h, layers = c.hidden_size, c.num_hidden_layers
    d = getattr(c, "head_dim", None) or h // c.num_attention_heads
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    linears = [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q),
               ("gate_proj", c.intermediate_size, h), ("up_proj", c.intermediate_size, h),
               ("down_proj", h, c.intermediate_size)]
    if stacked:
        linears = [("q_proj+k_proj+v_proj", q + 2 * kv, h), ("o_proj", h, q),
                   ("gate_proj+up_proj", 2 * c.intermediate_size, h), ("down_proj", h, c.intermediate_size)]
    shapes: dict[tuple[int, int], dict] = {}
    for name, n, k in linears:
        entry = shapes.setdefault((n, k), {"names": [], "per_step": 0})
        entry["names"].append(name)
        entry["per_step"] += layers
    head = shapes.setdefault((c.vocab_size, h), {"names": [], "per_step": 0})
    head["names"].append("lm_head")
    head["per_step"] += 1
    return shapes


class _Product:
    """One shape's weights (enough copies to stream ``stream_mb``), inputs and outputs, and its timers."""

    def __init__(self, n: int, k: int, rows: int, stream_mb: float, device, dtype) -> None:
        g = torch.Generator().manual_seed(n * 7 + k)
        w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, dtype)
        copies = max(2, int(-(-stream_mb * 1e6 // w.nbytes))) if device.type == "cuda" else 1
        self.weights = [w] + [w.clone() for _ in range(copies - 1)]
        self.x = torch.randn(rows, k, generator=g).to(device, dtype)
        self.reference = self.x.double() @ w.double().T
        self.device = device
        self.bytes = w.nbytes

    def time_us(self, fn, replays: int) -> tuple[float, str, float]:
        """(µs a product, timer, max abs error of the first copy's output) of ``fn(x, w)`` over every copy, back to
        back in one graph (``graph_timing.time_us``)."""
        err = float((fn(self.x, self.weights[0]).double() - self.reference).abs().max())
        us, timer = time_us(lambda: [fn(self.x, w) for w in self.weights], replays, self.device)
        return us / len(self.weights), timer, err


def _sweep_around(best: sg.Config) -> list[sg.Config]:
    """The best config's tiles and split with other warps and pipeline stages."""
    return [replace(best, warps=w, stages=s) for w in (2, 4, 8) for s in (3, 4, 5, 6)
            if (w, s) != (best.warps, best.stages)]


def measure(n: int, k: int, rows: int, *, stream_mb: float, replays: int, sweep: bool, device, dtype) -> dict:
    """One shape at one row count: cuBLAS, every candidate, the tuner's pick and (``sweep``) around the best."""
    p = _Product(n, k, rows, stream_mb, device, dtype)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    out = {"n": n, "k": k, "rows": rows, "weight_bytes": p.bytes, "copies": len(p.weights)}

    def row(us: float, timer: str, err: float, **extra) -> dict:
        return {"us": us, "gb_s": p.bytes / us / 1e3, "timer": timer, "max_abs_err": err, **extra}

    out["cublas"] = row(*p.time_us(lambda x, w: F.linear(x, w), replays))
    configs = sg.candidates(n, k, sms)
    out["configs"] = [row(*p.time_us(lambda x, w, c=c: sg.triton_linear(x, w, None, c), replays), config=c.__dict__)
                      for c in configs]
    best = min(out["configs"], key=lambda r: r["us"])
    if device.type == "cuda":
        tuned = sg.config_for(p.x, p.weights[0], None)
        out["tuned"] = next(r for r in out["configs"] if r["config"] == tuned.__dict__)
        if sweep:
            around = _sweep_around(sg.Config(**best["config"]))
            out["sweep"] = [row(*p.time_us(lambda x, w, c=c: sg.triton_linear(x, w, None, c), replays),
                                config=c.__dict__) for c in around]
            best = min([best, *out["sweep"]], key=lambda r: r["us"])
    out["best"] = best
    out["best_over_cublas"] = out["cublas"]["us"] / best["us"]
    if dependent_launch.capable(device):  # the same launches again as dependent launches
        for path in ("tuned", "best") if out["best"] is not out.get("tuned") else ("tuned",):
            config = sg.Config(**out[path]["config"])
            dependent_launch.use(True)
            try:
                out[f"{path}_pdl"] = row(*p.time_us(lambda x, w, c=config: sg.triton_linear(x, w, None, c),
                                                    replays), config=config.__dict__)
            finally:
                dependent_launch.use(False)
        out.setdefault("best_pdl", out["tuned_pdl"])  # the best config is the tuned one: timed once
    return out


def step_products(rows: list[dict], shapes: dict, copy_gb_s: float | None) -> dict:
    """Per row count: ms of one decode step's products under cuBLAS, the tuned pick and the best found."""
    out = {}
    for m in sorted({r["rows"] for r in rows}):
        at = [r for r in rows if r["rows"] == m]
        total = {path: sum(r[path]["us"] * shapes[(r["n"], r["k"])]["per_step"] for r in at if path in r) / 1e3
                 for path in ("cublas", "tuned", "best", "tuned_pdl", "best_pdl")}
        weight = sum(r["weight_bytes"] * shapes[(r["n"], r["k"])]["per_step"] for r in at)
        out[m] = {f"{path}_ms": ms for path, ms in total.items() if ms > 0}
        out[m]["weight_gb"] = weight / 1e9
        if copy_gb_s:
            out[m]["copy_limit_ms"] = weight / copy_gb_s / 1e6
    return out


def hbm_copy_gb_s(device) -> float | None:
    """The device's HBM copy rate as ``hpi probe`` measures it (``hpi.executor.probe.kernels.measure_hbm``: a
    device-to-device copy of 1 GiB, read plus written bytes over the median time): the step's limit."""
    if device.type != "cuda":
        return None
    from hpi.executor.probe.kernels import measure_hbm
    from hpi.executor.probe.settings import ProbeSettings

    return measure_hbm(torch, ProbeSettings.full())["bytes_s"] / 1e9


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, f"skinny_gemm_bench.py: {message}\n")


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip().lstrip("-").isdigit()]
    if not values or len(values) != len(text.split(",")) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers separated by commas, e.g. 1,2,16")
    return values


def _shape(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give a product's shape as NxK (output x input), e.g. 4096x14336")
    return int(parts[0]), int(parts[1])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="skinny_gemm_bench.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3-8b", help="the model whose decode products are timed")
    p.add_argument("--shapes", type=lambda t: [_shape(s) for s in t.split(",")],
                   help="NxK,... instead of the model's products (each counted once a step)")
    p.add_argument("--stacked", action="store_true", help="the model's q/k/v and gate/up stacked, as hpi runs them")
    p.add_argument("--rows", type=_ints, default=[1, 2, 4, 8, 16], help="row counts (batch), each at most 16")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--stream-mb", type=float, default=512.0, help="weight bytes one graph streams per shape")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the warps x stages sweep")
    p.add_argument("--out", default="skinny.json")
    args = p.parse_args(argv)
    if max(args.rows) > sg.MAX_ROWS:
        p.error(f"--rows {max(args.rows)} > MAX_ROWS({sg.MAX_ROWS}): the kernel takes at most {sg.MAX_ROWS} rows")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--device cpu runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("skinny_gemm_bench.py: --device cuda but torch sees no GPU: run on a GPU, or give --device cpu with "
              "TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    if args.shapes:
        shapes = {s: {"names": [f"{s[0]}x{s[1]}"], "per_step": 1} for s in args.shapes}
    else:
        shapes = model_products(args.model, args.stacked)
    copy_gb_s = hbm_copy_gb_s(device)
    rows = []
    for m in args.rows:
        for (n, k), entry in shapes.items():
            r = measure(n, k, m, stream_mb=args.stream_mb, replays=args.replays, sweep=args.sweep,
                        device=device, dtype=DTYPES[args.dtype])
            r["names"] = entry["names"]
            rows.append(r)
            print(json.dumps({key: r[key] for key in ("names", "rows", "best_over_cublas")}
                             | {"cublas_us": r["cublas"]["us"], "best_us": r["best"]["us"],
                                "best": r["best"]["config"], "tuned_us": r.get("tuned", {}).get("us"),
                                "tuned_pdl_us": r.get("tuned_pdl", {}).get("us")}), flush=True)
    summary = {"kind": "hpi.SkinnyGemmBench", "model": None if args.shapes else args.model, "dtype": args.dtype,
               "stacked": args.stacked,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "hbm_copy_gb_s": copy_gb_s,
               "step_products": step_products(rows, shapes, copy_gb_s), "rows": rows}
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({"step_products": summary["step_products"], "hbm_copy_gb_s": copy_gb_s}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
