"""What one GPU's kernels reach: dense matmuls per dtype, the HBM device copy, a decode GEMV, a tiny kernel's
fixed cost in a CUDA graph, and real decoder layers on the executor's graphed decode path
(``measure_decoder_layers``, ``time_layers``), with the fit of a layer's cost to ``fixed + bytes / rate``
(``fit_layer_cost``). torch is passed in by the caller; transformers and the executor are imported where
the layers are built."""

from __future__ import annotations

import statistics
from copy import deepcopy
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np

from hpi.executor.probe.settings import ProbeSettings

__all__ = [
    "TINY_KERNELS",
    "measure_matmul",
    "measure_hbm",
    "measure_decode_kernels",
    "measure_decoder_layers",
    "time_layers",
    "LayerFit",
    "fit_layer_cost",
]


def measure_matmul(torch: Any, settings: ProbeSettings) -> dict[str, Any]:
    """Dense matmul FLOP/s on GPU0 per dtype (tf32 = fp32 inputs with TF32 tensor cores allowed)."""
    n, iters = settings.matmul_n, settings.matmul_iters
    flops: dict[str, float] = {}
    errors: dict[str, str] = {}
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("tf32", torch.float32),
                             ("int8", torch.int8)):
            try:
                if dtype is torch.int8:
                    a = torch.randint(-8, 8, (n, n), dtype=torch.int8, device="cuda:0")
                    b = torch.randint(-8, 8, (n, n), dtype=torch.int8, device="cuda:0")
                    op = lambda: torch._int_mm(a, b)  # noqa: E731
                else:
                    a = torch.randn(n, n, dtype=dtype, device="cuda:0")
                    b = torch.randn(n, n, dtype=dtype, device="cuda:0")
                    op = lambda: torch.mm(a, b)  # noqa: E731
                flops[label] = 2.0 * n**3 / _event_time(torch, op, iters)
            except (RuntimeError, AttributeError) as exc:
                errors[label] = str(exc).splitlines()[0][:200]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return {"n": n, "iters": iters, "flops": flops, "errors": errors}


def _event_time(torch: Any, op: Callable[[], Any], iters: int) -> float:
    """Median seconds of op on the current stream, timed with CUDA events, after 3 warm-ups."""
    for _ in range(3):
        op()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        op()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_hbm(torch: Any, settings: ProbeSettings) -> dict[str, Any]:
    size = settings.hbm_bytes
    src = torch.ones(size, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty_like(src)
    seconds = _event_time(torch, lambda: dst.copy_(src), settings.matmul_iters)
    return {"buffer_bytes": size, "bytes_s": 2.0 * size / seconds, "method": "device-to-device copy, read+write bytes"}


TINY_KERNELS = 200  # kernels per captured graph when timing a kernel's fixed cost


def measure_decode_kernels(torch: Any, settings: ProbeSettings) -> dict[str, Any]:
    """What a decode step's kernels reach on GPU0: the read rate of a bf16 GEMV (one token through a weight
    matrix, the bulk of a decode step) and the device time of a tiny kernel in a CUDA graph (the fixed cost
    every kernel pays: the gap between two kernels, ramp and tail; what a layer's norms, rotary, residual adds
    and cache writes cost)."""
    rows, cols = settings.gemv_shape
    w = torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda:0")
    x = torch.randn(1, cols, dtype=torch.bfloat16, device="cuda:0")
    gemv_s = _event_time(torch, partial(torch.nn.functional.linear, x, w), settings.matmul_iters)
    del w
    from hpi.executor.graphs import capture

    a = torch.zeros(256, device="cuda:0")

    def tiny_kernels() -> None:
        for _ in range(TINY_KERNELS):
            a.add_(1.0)

    graph, _ = capture(tiny_kernels)
    graph_s = _event_time(torch, graph.replay, max(5, settings.matmul_iters))
    return {"gemv_shape": [rows, cols], "gemv_s": gemv_s, "gemv_bytes_s": rows * cols * 2 / gemv_s,
            "tiny_kernels": TINY_KERNELS, "tiny_kernel_s": graph_s / TINY_KERNELS,
            "method": "bf16 F.linear of one row, weight bytes / median event time; a CUDA graph of "
                      f"{TINY_KERNELS} in-place adds on 256 floats, replay time / kernels"}


def _with_layers(config: Any, n: int) -> Any:
    cfg = deepcopy(config)
    cfg.num_hidden_layers = n
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:n]
    return cfg


def measure_decoder_layers(torch: Any, settings: ProbeSettings, device: str = "cuda:0") -> dict[str, Any]:
    """Real decoder layers on the executor's own graphed decode path (``hpi.executor.generate`` with
    ``decode_graphs``, ``hpi.executor.graphs``), and on its eager path alike: each of ``settings.layer_models``
    built with each of the two ``layer_counts`` (seeded random weights, bf16 on a GPU), batch 1, the median decode
    step over ``layer_reps`` generations after one warm-up. The step difference over the layer difference is one
    layer's time, free of the embedding, the head and the loop; the layer's bytes come from its parameters.
    Where the tiny kernel (``measure_decode_kernels``) gives every kernel's floor, this gives what a real
    layer's norms, rotary, attention and small GEMVs cost: the 8B's graphed step ran 13-38% slower than
    that floor predicts (``hpi validate``, 2026-11-22)."""
    from hpi.executor.modeling import load_hf_config

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shapes, skipped = [], {}
    for model in settings.layer_models:
        try:
            shapes.append(time_layers(torch, settings, load_hf_config(model), model, dev, dtype))
        except torch.cuda.OutOfMemoryError:  # a small GPU: the shapes that fit still make the figures
            skipped[model] = "out of GPU memory"
            torch.cuda.empty_cache()
    if not shapes:
        raise RuntimeError(f"no decoder layer shape fits this GPU: {skipped}")
    return {"counts": list(settings.layer_counts), "prompt_len": settings.layer_prompt_len,
            "gen_len": settings.layer_gen_len, "batch": 1, "shapes": shapes, "skipped": skipped,
            "method": "executor graphed decode, bs 1; per layer = step difference / layer difference"}


def time_layers(torch: Any, settings: ProbeSettings, config: Any, model: str, dev: Any, dtype: Any,
                 batch: int = 1) -> dict[str, Any]:
    """One shape of ``measure_decoder_layers``: its step at each layer count, and one layer's time and bytes
    (``benchmarks/layer_scaling.py`` times it at other batches and prompt lengths)."""
    from transformers import DynamicCache

    from hpi.executor.generate import PipelineGenerator, Sampler
    from hpi.executor.groups import Groups
    from hpi.executor.modeling import ShardSpec, build_stage

    prompt_len, gen_len = settings.layer_prompt_len, settings.layer_gen_len
    ids = torch.randint(3, config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    step_s: dict[str, float] = {}
    eager_step_s: dict[str, float] = {}
    param_bytes: dict[int, int] = {}
    for n in settings.layer_counts:
        stage = build_stage(_with_layers(config, n), ShardSpec.whole(n), dtype=dtype, device=dev, seed=0).eval()
        param_bytes[n] = sum(p.numel() * p.element_size() for p in stage.parameters())
        head_bytes = stage.lm_head.weight.numel() * stage.lm_head.weight.element_size()

        def generate(stage: Any, graphs: bool) -> list[float]:
            g = PipelineGenerator(stage=stage, groups=Groups.alone(), new_cache=DynamicCache,
                                  hidden_size=config.hidden_size, dtype=dtype, device=dev, micro_batches=1,
                                  sampler=Sampler(), decode_graphs=graphs)
            g.run(ids, batch, prompt_len, gen_len, chat=False)
            ends = g.times.forward_end_s
            return [b - a for a, b in zip(ends[1:], ends[2:])]  # decode steps after the (captured) first one

        for graphs, into in ((True, step_s), (False, eager_step_s)):
            generate(stage, graphs)  # warm-up: allocator pools, cuBLAS heuristics
            into[str(n)] = statistics.median([s for _ in range(settings.layer_reps) for s in generate(stage, graphs)])
        del stage
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    lo, hi = settings.layer_counts
    return {"model": model, "batch": batch, "prompt_len": prompt_len, "step_s": step_s, "head_bytes": head_bytes,
            "layer_bytes": (param_bytes[hi] - param_bytes[lo]) / (hi - lo),
            "layer_s": (step_s[str(hi)] - step_s[str(lo)]) / (hi - lo),
            "eager_step_s": eager_step_s, "eager_layer_s": (eager_step_s[str(hi)] - eager_step_s[str(lo)]) / (hi - lo)}


@dataclass(frozen=True)
class LayerFit:
    """A decoder layer's graphed decode time as the cost model prices it: ``fixed_s + bytes / read_bytes_s``
    (``cost.overhead.layer_device_time`` plus the roofline of ``cost.compute`` at ``hbm`` of the ceiling)."""

    fixed_s: float
    read_bytes_s: float
    how: str  # "fit": a line through the shapes; "ceiling": the fitted rate beat the copy ceiling, held there;
    #           "given": one shape (or a line with no physical reading), the rate given, the fixed time its residual


def fit_layer_cost(points: Sequence[tuple[float, float]], ceiling_bytes_s: float,
                   given_bytes_s: float | None = None) -> LayerFit:
    """``fixed_s`` and ``read_bytes_s`` of ``seconds = fixed_s + bytes / read_bytes_s`` through (bytes, seconds)
    of real layers: least squares where the points have two sizes or more. A rate above the ceiling (the
    profile's HBM copy rate, which ``hbm`` is a fraction of) is held at the ceiling, and so is a rate given;
    with the rate held, the fixed time is the mean residual (at least 0)."""
    if not points:
        raise ValueError("fit_layer_cost: no (bytes, seconds) point")
    b = np.array([p[0] for p in points], dtype=float)
    t = np.array([p[1] for p in points], dtype=float)

    def held(rate: float, how: str) -> LayerFit:
        return LayerFit(max(0.0, float(np.mean(t - b / rate))), rate, how)

    if len(set(b.tolist())) >= 2:
        slope, intercept = np.polyfit(b, t, 1)
        if slope > 0 and intercept >= 0:
            rate = 1.0 / slope
            return (LayerFit(float(intercept), float(rate), "fit") if rate <= ceiling_bytes_s
                    else held(ceiling_bytes_s, "ceiling"))
    return held(min(given_bytes_s or ceiling_bytes_s, ceiling_bytes_s), "given")
