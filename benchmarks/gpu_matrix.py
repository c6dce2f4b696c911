"""Run a named matrix of hpi plans and baselines on the GPUs of this machine, side by side, in one go.

    python benchmarks/gpu_matrix.py --matrix h100 --out DIR [--only NAME,NAME] [--gen-len 32]

Every hpi entry is launched exactly as ``hpi run`` launches it (hpi.executor.launch), every baseline in its
own process (benchmarks/baselines.py). All records land in DIR/records.json (one bundle: the device
returns few files); a table of measured vs predicted, achieved host->device bandwidth against the
profile's pinned ceiling, and the baseline ratios is printed, and the last stdout line is one JSON
summary. Keep what it wrote under benchmarks/results/ with the device, date and command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The bucket and max live hpi's search offers Mixtral-8x22B's 4-bit layer leaves on one GPU: one layer in flight ahead
# of the one running, in DeepSpeed's stored elements (hpi.planner.search.with_layer_buckets; its test checks them).
MIXTRAL_Q4_LAYER_BUCKET = {"prefetch_bucket_elems": 704_267_136, "max_live_elems": 1_408_534_272}


@dataclass(frozen=True)
class Entry:
    name: str
    model: str
    hardware: str
    batch: int = 1
    plan: dict = field(default_factory=dict)  # Plan fields for an hpi run
    baseline: str | None = None  # hf-resident | accelerate | ds-examples
    baseline_args: tuple[str, ...] = ()
    gpus: int = 1
    variants: tuple[dict, ...] = ()  # more measurements on the same build (hpi.executor.spec.RUNTIME_FIELDS)
    prompt_len: int | None = None  # None: the command line's
    gen_len: int | None = None
    warmup_gen_len: int = 0  # 0: warm up with the full generation (the allocator's pool then holds every KV
    #   cache size the measured run asks for; a 2-token warm-up left cudaMalloc in the measured decode steps)
    fetch_wait: str = "stream"  # host: DeepSpeed's stock fetch wait (hpi.executor.zero3), for side-by-side ratios
    pick_aio: bool = False  # the planner picks the aio block size and queue depth (hpi.planner.search.best_aio)


def _ds_examples_knobs(model: str) -> dict:
    from hpi.planner.catalog import load_model
    from hpi.planner.specs.plan import ds_examples_knobs

    return ds_examples_knobs(load_model(model).hidden_size)


def _batches(*sizes: int, pp: int = 1) -> tuple[dict, ...]:
    """Variants at other batch sizes; with pp > 1 each batch is split into pp micro-batches."""
    return tuple({"batch_size": b, "micro_batches": pp if pp > 1 and b % pp == 0 else 1} for b in sizes)


def _graphed(*sizes: int, pp: int = 1) -> tuple[dict, ...]:
    """The entry's batch 1 as a CUDA-graphed variant, then each other batch eager and graphed (one build)."""
    out = [{"batch_size": 1, "micro_batches": 1, "decode_graphs": True}]
    for v in _batches(*sizes, pp=pp):
        out += [v, {**v, "decode_graphs": True}]
    return tuple(out)


def _compiled(*sizes: int) -> tuple[dict, ...]:
    """Each batch graphed, then graphed and compiled (hpi.executor.graphs.compiled_step), on one build."""
    out = []
    for b in sizes:
        graphed = {"batch_size": b, "micro_batches": 1, "decode_graphs": True}
        out += [graphed, {**graphed, "decode_compile": True}]
    return tuple(out)


def _skinny(*sizes: int) -> tuple[dict, ...]:
    """Each batch graphed and compiled, each with torch's products and with hpi's stacked few-row ones
    (hpi.executor.skinny_gemm), on one build: the side by side the planner's term is fitted from (cost.overhead)."""
    out = []
    for b in sizes:
        for compiled in (False, True):
            step = {"batch_size": b, "micro_batches": 1, "decode_graphs": True, "decode_compile": compiled}
            out += [step, {**step, "skinny_gemm": True}]
    return tuple(out)


def _fused(*sizes: int) -> tuple[dict, ...]:
    """The entry's batch with the fused dequantization (hpi.executor.dequant), then each other batch with
    DeepSpeed's and with the fused one, on one build."""
    out = [{"fused_dequant": True}]
    for v in _batches(*sizes):
        out += [v, {**v, "fused_dequant": True}]
    return tuple(out)


def matrices() -> dict[str, list[Entry]]:
    h100, m8, m70 = "h100-sxm-1gpu", "llama-3-8b", "llama-3-70b"
    big = str(REPO / "benchmarks" / "configs" / "llama-33b.json")
    tuned = {"prefetch_bucket_elems": 400_000_000, "max_live_elems": 3_000_000_000}
    dsx, dsx70, dsx33 = _ds_examples_knobs(m8), _ds_examples_knobs(m70), _ds_examples_knobs(big)
    x4 = "h200-4gpu"
    ds16 = str(REPO / "benchmarks" / "configs" / "deepseek-v3-16-layers.json")
    ds4 = str(REPO / "benchmarks" / "configs" / "deepseek-v3-4-layers.json")
    # 70B on 4 H200: resident needs >= 2 GPUs (141 GB of bf16 weights); offload streams 141 GB / (tp * pp) per
    # GPU per forward, so those entries generate few tokens (the median of 3 decode steps) to fit the call.
    off70 = dict(prompt_len=128, gen_len=4)
    res70 = dict(prompt_len=512, gen_len=16)
    aio_run = dict(prompt_len=32, gen_len=3, warmup_gen_len=1)
    return {
        # CUDA-graphed decode (hpi.executor.graphs) against eager decode, side by side on one build per layout
        "graphs-h200x4": [
            Entry("70b-tp4-resident-b1", m70, x4, 1, {"tp": 4}, gpus=4, variants=_graphed(32), **res70),
            Entry("70b-tp2-resident-b1", m70, x4, 1, {"tp": 2}, gpus=2, variants=_graphed(32), **res70),
            Entry("70b-pp4-resident-b1", m70, x4, 1, {"pp": 4}, gpus=4, variants=_graphed(32, pp=4), **res70),
            Entry("70b-tp2pp2-resident-b1", m70, x4, 1, {"tp": 2, "pp": 2}, gpus=4, variants=_graphed(32, pp=2),
                  **res70),
            Entry("70b-pp2-resident-b1", m70, x4, 1, {"pp": 2}, gpus=2, variants=_graphed(32, pp=2), **res70),
            Entry("70b-tp1-resident-b1", m70, x4, 1, {}, variants=_graphed(8), **res70),
        ],
        "graphs-h100": [
            Entry("8b-resident-b1", m8, h100, 1, {}, variants=_graphed(16, 64)),
        ],
        "graphs-h200x2": [
            Entry("8b-tp2-resident-b1", m8, "h200-2gpu", 1, {"tp": 2}, gpus=2, variants=_graphed(16, 64)),
            Entry("8b-pp2-resident-b1", m8, "h200-2gpu", 1, {"pp": 2}, gpus=2, variants=_graphed(16, pp=2)),
            Entry("8b-tp1-resident-b1", m8, "h200-2gpu", 1, {}, variants=_graphed(16)),
        ],
        # Beyond 70B on one H200 (125 GiB of host memory): Mixtral-8x22B (141B) with 4-bit experts streamed from
        # pinned CPU memory at batch 1 and 16, and Mixtral-8x7B at 16 bit, whose build holds its 16-bit stage on
        # the host before ZeRO-3 re-homes it (hpi.planner.cost.build): the build's host peak beside the prediction.
        "moe-h200": [
            Entry("mixtral-8x22b-q4-cpu-pinned-b1", "mixtral-8x22b", "h200-1gpu", 1,
                  {"offload": "cpu", "weight_bits": 4}, variants=_batches(16), prompt_len=128, gen_len=4),
            Entry("mixtral-8x7b-cpu-pinned-b1", "mixtral-8x7b", "h200-1gpu", 1, {"offload": "cpu"},
                  prompt_len=128, gen_len=4),
        ],
        # DeepSeek-V3 at full width, cut to the 16 layers (3 dense, 13 with 256 routed experts) whose 4-bit weights
        # fit one H200's host memory pinned: MLA, shared and routed experts through the same path.
        "deepseek-h200": [
            Entry("deepseek-v3-16l-q4-cpu-pinned-b1", ds16,
                  "h200-1gpu", 1, {"offload": "cpu", "weight_bits": 4}, variants=_batches(16), prompt_len=128,
                  gen_len=4),
        ],
        # DeepSeek-V3 at full width, 4 layers (1 dense, 3 with 256 routed experts: 768 expert leaves of 8.3 MB a
        # projection at 4 bits): does a prefetch bucket that reaches many experts ahead hide the hooks of the small
        # leaves? DeepSpeed's default bucket (5e7 elements) reaches about one expert (44 M) ahead.
        "deepseek-leaves-h200": [
            Entry(f"deepseek-v3-4l-q4-cpu-bucket{label}", ds4, "h200-1gpu", 1,
                  {"offload": "cpu", "weight_bits": 4, "prefetch_bucket_elems": bucket,
                   "max_live_elems": max(10**9, 2 * bucket)}, variants=_batches(16), prompt_len=64, gen_len=4)
            for label, bucket in (("5e7", 50_000_000), ("5e8", 500_000_000), ("2e9", 2_000_000_000))
        ],
        # issue 20, NVMe: the 8B streamed from the device's disk at three aio settings, side by side: DeepSpeed's
        # own defaults (1 MiB blocks, queue depth 8, 1 thread), hpi's fixed settings before the aio knobs
        # (DeepSpeedExamples' depth 64 and 8 threads), and the planner's pick from the drive's read grid (run with
        # --hardware h200-1gpu-aio, the profile benchmarks/aio_probe.py writes; benchmarks/aio_device.sh does both).
        # 16 GB read per forward at ~1 GB/s: a short prompt and 3 tokens (2 decode steps) keep each entry near 1 min.
        "aio-h200": [
            Entry("8b-nvme-aio-deepspeed-b1", m8, "h200-1gpu", 1,
                  {"offload": "nvme", "aio_queue_depth": 8, "aio_threads": 1, **tuned}, **aio_run),
            Entry("8b-nvme-aio-hpi-fixed-b1", m8, "h200-1gpu", 1, {"offload": "nvme", **tuned}, **aio_run),
            Entry("8b-nvme-aio-planner-b1", m8, "h200-1gpu", 1, {"offload": "nvme", **tuned}, pick_aio=True,
                  **aio_run),
            # One aio thread submitting 4 or 8 MiB blocks, 8 at a time, near the drive's best grid points (1.70 GB/s
            # for 4 MiB one at a time, 1.82 for 16 MiB 8 at a time: benchmarks/results/2026-12-03-h200-aio) where
            # 8 threads of 1-4 MiB kept 33-38 requests queued on the drive and read 1.19 GB/s. 16 MiB is refused:
            # the 8B's k and v partitions (8 MiB) would stay in host memory (DeepSpeed's min_aio_bytes).
            *(Entry(f"8b-nvme-aio-t1-{mib}m-b1", m8, "h200-1gpu", 1,
                    {"offload": "nvme", "aio_block_size_bytes": mib << 20, "aio_queue_depth": 8, "aio_threads": 1,
                     **tuned}, **aio_run) for mib in (4, 8)),
        ],
        # issue 20: the compiled graphed decode step against the eager graphed one (8B, and the 33B shape the
        # compiled per-layer time was not fitted on), and 4-bit weights streamed from pinned memory dequantized by
        # DeepSpeed's torch ops against hpi's fused kernel (70B, batch 1 and 32), each pair on one build.
        "fused-h200": [
            Entry("8b-resident-b1", m8, "h200-1gpu", 1, {}, variants=_compiled(1, 16)),
            Entry("33b-resident-b1", big, "h200-1gpu", 1, {}, variants=_compiled(1), gen_len=16),
            Entry("70b-q4-cpu-pinned-b1", m70, "h200-1gpu", 1, {"offload": "cpu", "weight_bits": 4},
                  variants=_fused(32), prompt_len=128, gen_len=4),
            # the batch-32 steps in the other order (32 first, then 1): is their floor the batch or the order?
            Entry("70b-q4-cpu-pinned-b32", m70, "h200-1gpu", 32, {"offload": "cpu", "weight_bits": 4},
                  variants=_fused(1), prompt_len=128, gen_len=4),
        ],
        # issue 20: the graphed and the compiled decode step with torch's products and with hpi's stacked few-row
        # ones (hpi.executor.skinny_gemm), batch 1 and 16, each pair on one build (--hardware: the machine's profile)
        "skinny": [
            Entry("8b-resident-b1", m8, "h200-1gpu", 1, {}, variants=_skinny(1, 16)),
        ],
        # issue 20, 4-bit streaming: does a prefetch bucket that reaches further ahead keep the copy engine busy?
        # Every 4-bit 70B run so far used DeepSpeed's 5e7-element bucket, which reaches about one weight ahead
        # (a 70B MLP projection is 235 M elements, an attention k/v 8.4 M), and its copy engine sat idle a third of
        # each step while every copy ran at the pinned ceiling (benchmarks/results/2026-12-05-h200-issue20 and
        # -h100-issue20); the 16-bit 70B streamed at 1.00 with DeepSpeedExamples' 1.3e8 (2026-11-22-h200x4). One
        # build per bucket: a layer's weights are 856 M elements, so 2.5e8 reaches a projection ahead and 1e9 a layer.
        "stream-h200": [
            Entry(f"70b-q4-cpu-pinned-bucket{label}-b1", m70, "h200-1gpu", 1,
                  {"offload": "cpu", "weight_bits": 4, "prefetch_bucket_elems": bucket,
                   "max_live_elems": max(10**9, 2 * bucket)},
                  variants=({"fused_dequant": True},
                            {"batch_size": 32, "micro_batches": 1, "fused_dequant": True}),
                  prompt_len=128, gen_len=4)
            for label, bucket in (("5e7", 50_000_000), ("2.5e8", 250_000_000), ("1e9", 1_000_000_000))
        ],
        # issue 20: each decoder layer one ZeRO-3 leaf (Plan.zero3_leaf layer: one hook pair a layer instead of 13,
        # the layer gathered by one fetch) against DeepSpeed's per-module hooks, same knobs otherwise. On a CPU the
        # leaves cut ZeRO-3's host time a layer from 2.44 to 0.93 ms (benchmarks/results/2026-12-05-cpu-zero3-leaf);
        # here: does that reach the copy engine's idle gaps? The 70B at the 1e9 bucket (a layer ahead; its module
        # twin is stream-h200's bucket1e9 entry), the 8B at DeepSpeed's defaults and at a bucket that holds a layer.
        "leaf-h200": [
            Entry("70b-q4-cpu-pinned-layerleaf-bucket1e9-b1", m70, "h200-1gpu", 1,
                  {"offload": "cpu", "weight_bits": 4, "prefetch_bucket_elems": 10**9, "max_live_elems": 2 * 10**9,
                   "zero3_leaf": "layer"},
                  variants=({"fused_dequant": True},
                            {"batch_size": 32, "micro_batches": 1, "fused_dequant": True}),
                  prompt_len=128, gen_len=4),
            *(Entry(f"8b-cpu-pinned-{leaf}leaf{label}-b1", m8, "h200-1gpu", 1,
                    {"offload": "cpu", "zero3_leaf": leaf, **knobs}, variants=_batches(16), gen_len=8)
              for leaf in ("module", "layer")
              for label, knobs in (("", {}), ("-bucket2.5e8", {"prefetch_bucket_elems": 250_000_000}))),
        ],
        # issue 20: an MoE layer leaf gathers every routed expert of the layer in one fetch (8 x 3 projections of
        # 6144 x 16384 for Mixtral-8x22B, 1.2 GB packed at 4 bits), where DeepSpeed's per-module hooks fetch them one
        # module at a time; both gather every expert (the trace prefetches what the last step ran, not what the
        # router picks). One build per row; DeepSpeed's dequantization at batch 1 (the 2026-12-03 entry's), then the
        # fused one at batch 1 and 16. A Mixtral-8x22B layer is 2.5 G weights, 7.0e8 of DeepSpeed's stored elements
        # at 4 bits (Knobs.ds_numel_per_matrix_weight): the 5e7 bucket prefetches the first of its parameters only,
        # 3e9 (max live 6e9) four layers ahead (12.7 GB gathered), the last row one layer (max live two: the bucket
        # hpi's search offers, search.with_layer_buckets). Measured 2026-12-05
        # (benchmarks/results/2026-12-05-issue20-leaf-agreement): layer leaves at 3e9 the fastest (H200), at 5e7
        # slower than per-module hooks (H100). With per-module leaves DeepSpeed gathers Mixtral's MoE block whole
        # (its default leaf classes: cost.shape.MOE_BLOCK_LEAF_FAMILIES).
        "moe-leaf-h200": [
            Entry(f"mixtral-8x22b-q4-cpu-pinned-{leaf}leaf{label}-b1", "mixtral-8x22b", "h200-1gpu", 1,
                  {"offload": "cpu", "weight_bits": 4, "zero3_leaf": leaf, **knobs},
                  variants=({"fused_dequant": True},
                            {"batch_size": 16, "micro_batches": 1, "fused_dequant": True}),
                  prompt_len=128, gen_len=4)
            for label, knobs in (("", {}), ("-bucket3e9", {"prefetch_bucket_elems": 3 * 10**9,
                                                            "max_live_elems": 6 * 10**9}))
            for leaf in ("module", "layer")
        ] + [
            Entry("mixtral-8x22b-q4-cpu-pinned-layerleaf-bucket1layer-b1", "mixtral-8x22b", "h200-1gpu", 1,
                  {"offload": "cpu", "weight_bits": 4, "zero3_leaf": "layer", **MIXTRAL_Q4_LAYER_BUCKET},
                  variants=({"fused_dequant": True},
                            {"batch_size": 16, "micro_batches": 1, "fused_dequant": True}),
                  prompt_len=128, gen_len=4),
        ],
        # issue 20: hpi's copy-ordered fetch wait (fetch_wait event: each read waits for its own copy,
        # hpi.executor.zero3.copy_ordered_fetch) against the stream-ordered one (every copy queued), side by side on
        # one machine: where cost.prefetch_lag priced a deep queue's lag (Mixtral's 3e9 bucket, copy-bound; the
        # 70B 4-bit at DeepSpeed's default knobs, its dequantization chain longer than the copies; an 8B 16-bit
        # batch-16 prefill with a 2.5e8 bucket), and Mixtral at one layer ahead, where no lag was priced.
        "event-wait": [
            *(Entry(f"mixtral-8x22b-q4-cpu-pinned-layerleaf-bucket{label}-{wait}-b1", "mixtral-8x22b", "h200-1gpu",
                    1, {"offload": "cpu", "weight_bits": 4, "zero3_leaf": "layer", **knobs},
                    variants=({"fused_dequant": True},
                              {"batch_size": 16, "micro_batches": 1, "fused_dequant": True}),
                    prompt_len=128, gen_len=4, fetch_wait=wait)
              for label, knobs in (("3e9", {"prefetch_bucket_elems": 3 * 10**9, "max_live_elems": 6 * 10**9}),
                                   ("1layer", MIXTRAL_Q4_LAYER_BUCKET))
              for wait in ("stream", "event")),
            *(Entry(f"70b-q4-cpu-pinned-dsdefaults-{wait}-b1", m70, "h200-1gpu", 1,
                    {"offload": "cpu", "weight_bits": 4}, variants=({"fused_dequant": True},), prompt_len=128,
                    gen_len=4, fetch_wait=wait) for wait in ("stream", "event")),
            # issue 20's 4-bit streaming target at batch 1 and 32, under the new default wait
            Entry("70b-q4-cpu-pinned-dsdefaults-event-b1-b32", m70, "h200-1gpu", 1,
                  {"offload": "cpu", "weight_bits": 4}, variants=_fused(32), prompt_len=128, gen_len=4,
                  fetch_wait="event"),
            *(Entry(f"8b-cpu-pinned-moduleleaf{label}-{wait}-b1", m8, "h200-1gpu", 1,
                    {"offload": "cpu", **knobs}, variants=_batches(16), gen_len=8, fetch_wait=wait)
              for label, knobs in (("-bucket2.5e8", {"prefetch_bucket_elems": 250_000_000}), ("-dsdefaults", {}))
              for wait in ("stream", "event")),
            # the new default on what it was not measured on: layer leaves (priced a tie with per-module hooks), and
            # NVMe (priced as the stream wait; its swapper reuses pinned buffers: the 16-bit tokens must agree)
            Entry("8b-cpu-pinned-layerleaf-dsdefaults-event-b1", m8, "h200-1gpu", 1,
                  {"offload": "cpu", "zero3_leaf": "layer"}, variants=_batches(16), gen_len=8, fetch_wait="event"),
            *(Entry(f"8b-nvme-{wait}-b1", m8, "h200-1gpu", 1, {"offload": "nvme", **tuned}, variants=_batches(16),
                    gen_len=4, fetch_wait=wait) for wait in ("stream", "event")),
        ],
        "smoke": [
            Entry("tiny-resident", "tiny-llama", h100, 2, {}),
            Entry("tiny-cpu-offload", "tiny-llama", h100, 2, {"offload": "cpu"}, variants=_batches(4)),
        ],
        "h100": [
            Entry("8b-resident-b1", m8, h100, 1, {}, variants=_batches(16, 64)),
            Entry("8b-cpu-pinned-dsdefaults-hostwait-b1", m8, h100, 1, {"offload": "cpu"}, fetch_wait="host"),
            Entry("8b-cpu-pinned-dsdefaults-b1", m8, h100, 1, {"offload": "cpu"}),
            Entry("8b-cpu-pinned-dsexamples-b1", m8, h100, 1, {"offload": "cpu", **dsx}),
            Entry("8b-cpu-pinned-tuned-b1", m8, h100, 1, {"offload": "cpu", **tuned}, variants=_batches(16, 64)),
            Entry("8b-cpu-pinned-tuned-kvoff-b16", m8, h100, 16, {"offload": "cpu", "kv_offload": True, **tuned},
                  variants=({"batch_size": 64},)),
            Entry("8b-cpu-pageable-b1", m8, h100, 1, {"offload": "cpu", "pin_memory": False}, gen_len=8),
            Entry("8b-cpu-pinned-q8-b1", m8, h100, 1, {"offload": "cpu", "weight_bits": 8, **dsx},
                  variants=_batches(16)),
            Entry("8b-cpu-pinned-q4-b1", m8, h100, 1, {"offload": "cpu", "weight_bits": 4, **dsx},
                  variants=_batches(16)),
            Entry("8b-resident-q4-b1", m8, h100, 1, {"weight_bits": 4}),
            Entry("8b-nvme-b1", m8, h100, 1, {"offload": "nvme", **tuned}, variants=_batches(16), gen_len=4),
            # does DeepSpeed's one-parameter-per-swap-buffer rule bound the NVMe read? 5 (default) vs 16 buffers
            Entry("8b-nvme-buf5-b1", m8, h100, 1, {"offload": "nvme", **tuned}, gen_len=3),
            Entry("8b-nvme-buf16-b1", m8, h100, 1, {"offload": "nvme", "nvme_buffer_count": 16, **tuned}, gen_len=3),
            Entry("base-hf-resident-8b-b1", m8, h100, 1, baseline="hf-resident"),
            Entry("base-ds-examples-8b-b1", m8, h100, 1, baseline="ds-examples"),
            Entry("base-ds-examples-8b-b16", m8, h100, 16, baseline="ds-examples"),
            Entry("base-accelerate-8b-b1", m8, h100, 1, baseline="accelerate"),
            Entry("33b-cpu-pinned-dsexamples-b1", big, h100, 1, {"offload": "cpu", **dsx33}, variants=_batches(16),
                  gen_len=8),
            Entry("33b-cpu-pinned-q4-b1", big, h100, 1, {"offload": "cpu", "weight_bits": 4, **dsx33}, gen_len=8),
        ],
        "h200x2": [
            Entry("8b-tp2-resident-b1", m8, "h200-2gpu", 1, {"tp": 2}, gpus=2),
            Entry("8b-pp2-resident-b8-mb2", m8, "h200-2gpu", 8, {"pp": 2, "micro_batches": 2}, gpus=2),
            Entry("8b-tp2-cpu-pinned-b1", m8, "h200-2gpu", 1, {"tp": 2, "offload": "cpu", **tuned}, gpus=2),
            Entry("8b-pp2-cpu-pinned-b8-mb2", m8, "h200-2gpu", 8,
                  {"pp": 2, "offload": "cpu", "micro_batches": 2, **tuned}, gpus=2),
            Entry("70b-tp2-cpu-pinned-b1", m70, "h200-2gpu", 1, {"tp": 2, "offload": "cpu", **tuned}, gpus=2),
            Entry("70b-tp2-cpu-pinned-b16", m70, "h200-2gpu", 16, {"tp": 2, "offload": "cpu", **tuned}, gpus=2),
        ],
        # issue 6: tp x pp with tp * pp <= 4, offload none and cpu, batch 1 and a throughput batch. Offload
        # entries use DeepSpeedExamples' knobs (2 h^2 bucket and max live): the best bs-1 streaming on the H100.
        "h200x4": [
            Entry("70b-tp4-resident-b1", m70, x4, 1, {"tp": 4}, gpus=4, variants=_batches(32), **res70),
            Entry("70b-tp2pp2-resident-b1", m70, x4, 1, {"tp": 2, "pp": 2}, gpus=4, variants=_batches(32, pp=2),
                  **res70),
            Entry("70b-pp4-resident-b1", m70, x4, 1, {"pp": 4}, gpus=4, variants=_batches(32, pp=4), **res70),
            Entry("70b-tp2-resident-b1", m70, x4, 1, {"tp": 2}, gpus=2, variants=_batches(32), **res70),
            Entry("70b-pp2-resident-b1", m70, x4, 1, {"pp": 2}, gpus=2, variants=_batches(32, pp=2), **res70),
            Entry("70b-tp4-cpu-pinned-b1", m70, x4, 1, {"tp": 4, "offload": "cpu", **dsx70}, gpus=4,
                  variants=_batches(32), **off70),
            Entry("70b-tp2pp2-cpu-pinned-b1", m70, x4, 1, {"tp": 2, "pp": 2, "offload": "cpu", **dsx70}, gpus=4,
                  variants=_batches(32, pp=2), **off70),
            Entry("70b-tp1-cpu-pinned-b1", m70, x4, 1, {"offload": "cpu", **dsx70}, variants=_batches(32), **off70),
            Entry("70b-tp2-cpu-pinned-b1", m70, x4, 1, {"tp": 2, "offload": "cpu", **dsx70}, gpus=2,
                  variants=_batches(32), **off70),
            Entry("70b-pp2-cpu-pinned-b1", m70, x4, 1, {"pp": 2, "offload": "cpu", **dsx70}, gpus=2,
                  variants=_batches(32, pp=2), **off70),
            Entry("70b-pp4-cpu-pinned-b4-mb4", m70, x4, 4, {"pp": 4, "offload": "cpu", "micro_batches": 4, **dsx70},
                  gpus=4, **off70),
            # one GPU holds the 141 GB of bf16 weights (the planner predicts a 142.9 GB peak of the 150.7 GB)
            Entry("70b-tp1-resident-b1", m70, x4, 1, {}, variants=_batches(8), **res70),
            # the 2x H200 run's TP 2 offload conditions (4e8 bucket, DeepSpeed's host wait), A/B against the fetch fix
            Entry("70b-tp2-cpu-pinned-tuned-hostwait-b1", m70, x4, 1, {"tp": 2, "offload": "cpu", **tuned}, gpus=2,
                  fetch_wait="host", **off70),
            Entry("70b-tp2-cpu-pinned-tuned-b1", m70, x4, 1, {"tp": 2, "offload": "cpu", **tuned}, gpus=2, **off70),
        ],
    }


def entry_plan(entry: Entry, workload=None):
    """The entry's Plan, with the knobs ``hpi run`` derives when they are not given: an NVMe swap buffer that
    holds the largest tensor partition (DeepSpeed asserts "More elements N than buffer size" otherwise; the
    8B's 525M-element embedding overflowed the 1e8 default on the H100); with ``pick_aio``, the aio settings the
    planner predicts fastest for ``workload`` on the entry's hardware."""
    from hpi.planner.catalog import load_model
    from hpi.planner.profiles import load_profile
    from hpi.planner.search import best_aio, nvme_buffer_elems_for
    from hpi.planner.specs.plan import Plan

    fields = dict(entry.plan)
    if fields.get("offload") == "nvme" and "nvme_buffer_elems" not in fields:
        fields["nvme_buffer_elems"] = nvme_buffer_elems_for(load_model(entry.model), fields.get("tp", 1),
                                                            fields.get("dp", 1))
    plan = Plan(batch_size=entry.batch, **fields)
    if entry.pick_aio:
        plan = best_aio(load_model(entry.model), load_profile(entry.hardware), workload, plan)
    return plan


def refuse_infeasible(entry: Entry, plan, workload) -> None:
    """Refuse, before launching, a plan the planner says cannot run, with its reasons (as ``hpi run`` does)."""
    from hpi.planner.catalog import load_model
    from hpi.planner.predict import predict
    from hpi.planner.profiles import load_profile

    est = predict(load_model(entry.model), load_profile(entry.hardware), workload, plan)
    if not est.feasible:
        raise RuntimeError(f"{entry.name} is infeasible: " + "; ".join(r.message for r in est.reasons))


def run_hpi(entry: Entry, out: Path, gen_len: int, prompt_len: int, device: str = "cuda") -> dict[str, dict]:
    """The entry's record and its variants' ({name: record}; a variant is named
    name@b<batch>[-kvoff][-graphs][-compiled][-fused][-skinny])."""
    from hpi.executor.launch import launch
    from hpi.executor.spec import RunSpec
    from hpi.planner.specs.workload import Workload
    from hpi.records import RunRecord

    workload = Workload(entry.prompt_len or prompt_len, entry.gen_len or gen_len)
    plan = entry_plan(entry, workload)
    spec = RunSpec(plan=plan, model=entry.model, workload=workload, hardware=entry.hardware, device=device,
                   dtype="bf16" if device == "cuda" else "fp32", out_dir=str(out / entry.name), warmup_steps=1,
                   warmup_gen_len=entry.warmup_gen_len,
                   nvme_path=str(out / "nvme") if plan.offload == "nvme" else None, fetch_wait=entry.fetch_wait,
                   variants=entry.variants)
    refuse_infeasible(entry, plan, spec.workload)  # the spec's workload carries the run's dtype and fetch wait
    record = launch(spec, timeout_s=900)
    records = {entry.name: record.to_json()}
    for rel in record.variant_records or ():
        variant = RunRecord.from_json(json.loads((out / entry.name / rel).read_text()))
        p = variant.plan
        c = variant.conditions
        suffix = ("-kvoff" if p["kv_offload"] else "") + ("-graphs" if c.decode_graphs else "") + \
            ("-compiled" if c.decode_compile else "") + ("-fused" if c.fused_dequant else "") + \
            ("-skinny" if c.skinny_gemm else "")
        records[f"{entry.name}@b{p['batch_size']}{suffix}"] = variant.to_json()
    return records


def run_baseline(entry: Entry, out: Path, gen_len: int, prompt_len: int) -> dict:
    script = str(REPO / "benchmarks" / "baselines.py")
    args = [entry.baseline, "--model", entry.model, "--batch", str(entry.batch), "--prompt-len", str(prompt_len),
            "--gen-len", str(gen_len), *entry.baseline_args]
    if entry.baseline == "ds-examples":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", "29533", script,
               *args]
    else:
        cmd = [sys.executable, script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    (out / f"{entry.name}.log").write_text(proc.stdout[-20000:] + "\n--- stderr ---\n" + proc.stderr[-20000:])
    if proc.returncode != 0:
        raise RuntimeError(f"{entry.name} exited {proc.returncode}: {proc.stderr.strip().splitlines()[-3:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measured_decode(record: dict) -> float:
    d = record["decode_step_s"]
    return d["median"] if isinstance(d, dict) else d


def summarize(results: dict[str, dict]) -> tuple[list[str], dict]:
    lines = [f"{'entry':34s} {'decode s':>9s} {'pred s':>8s} {'m/p':>5s} {'prefill s':>9s} {'pred':>7s} {'tok/s':>8s} "
             f"{'h2d GB/s':>8s} {'of pinned':>9s}"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:34s} ERROR {r['error'][:100]}")
            continue
        dec = _measured_decode(r)
        pred = (r.get("predicted") or {}).get("decode_step_s")
        pre_pred = (r.get("predicted") or {}).get("prefill_s")
        h2d = r.get("h2d") or {}
        frac = h2d.get("fraction_of_profile")
        lines.append(
            f"{name:34s} {dec:9.4f} {pred if pred else float('nan'):8.4f} {dec / pred if pred else float('nan'):5.2f} "
            f"{r['prefill_s']:9.3f} {pre_pred if pre_pred else float('nan'):7.3f} {r['throughput_tok_s']:8.2f} "
            f"{(h2d.get('achieved_bytes_s') or 0) / 1e9:8.1f} {frac if frac else float('nan'):9.2f}"
        )
    ratios = {}

    def ratio(a: str, b: str, key: str, label: str, invert: bool = False):
        if a in results and b in results and "error" not in results[a] and "error" not in results[b]:
            va = _measured_decode(results[a]) if key == "decode" else results[a][key]
            vb = _measured_decode(results[b]) if key == "decode" else results[b][key]
            ratios[label] = (vb / va) if invert else (va / vb)

    ratio("8b-resident-b1", "base-hf-resident-8b-b1", "decode", "hpi_resident_decode_over_hf_resident")
    ratio("8b-cpu-pinned-dsdefaults-b1", "8b-cpu-pinned-dsdefaults-hostwait-b1", "throughput_tok_s",
          "stream_ordered_fetch_over_deepspeed_host_wait_b1_throughput")
    ratio("8b-cpu-pinned-tuned-b1@b64", "base-ds-examples-8b-b16", "throughput_tok_s",
          "hpi_tuned_b64_over_ds_examples_b16_throughput")
    ratio("8b-cpu-pinned-tuned-b1", "base-ds-examples-8b-b1", "throughput_tok_s",
          "hpi_tuned_over_ds_examples_b1_throughput")
    ratio("8b-cpu-pinned-tuned-b16", "base-ds-examples-8b-b16", "throughput_tok_s",
          "hpi_tuned_over_ds_examples_b16_throughput")
    ratio("8b-cpu-pinned-tuned-b1", "base-accelerate-8b-b1", "throughput_tok_s",
          "hpi_tuned_over_accelerate_b1_throughput")
    ratio("8b-cpu-pinned-dsdefaults-b1", "base-ds-examples-8b-b1", "throughput_tok_s",
          "hpi_dsdefaults_over_ds_examples_b1_throughput")
    for name in results:  # CUDA-graphed decode against the eager decode of the same build and batch
        eager = name.removesuffix("-graphs")
        if name.endswith("-graphs") and eager.endswith("@b1") and eager.removesuffix("@b1") in results:
            eager = eager.removesuffix("@b1")
        if name != eager:
            ratio(eager, name, "decode", f"graphs_decode_speedup[{eager}]")
    # NVMe runs are bounded by the drive, not the host link: their read is set against the NVMe share instead
    streaming = {n: (r.get("h2d") or {}).get("fraction_of_profile") for n, r in results.items()
                 if "error" not in r and not r.get("nvme")}
    for n, r in results.items():
        if "error" not in r and r.get("nvme"):
            nv = r["nvme"]
            aio = nv.get("aio") or {}
            lines.append(f"{n}: NVMe read {nv['achieved_read_bytes_s'] / 1e9:.2f} GB/s"
                         + (f" (aio block {aio['block_size'] >> 20} MiB, depth {aio['queue_depth']}, "
                            f"{aio['intra_op_parallelism']} threads)" if aio else "")
                         + (f" = {nv['fraction_of_profile']:.2f} of the profile's "
                            f"{nv['profile_read_bytes_s'] / 1e9:.2f}" if nv.get("fraction_of_profile") else "")
                         + (f", drive queue depth {nv['device_avg_queue_depth']:.1f}"
                            if nv.get("device_avg_queue_depth") else ""))
    best = max((v for v in streaming.values() if v), default=None)
    lines += [f"{k}: {v:.3f}" for k, v in ratios.items()]
    if best:
        lines.append(f"best streaming fraction of the profile's pinned host->device bandwidth: {best:.3f}")
    return lines, {"ratios": ratios, "best_streaming_fraction": best, "streaming": streaming}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", required=True, choices=sorted(matrices()))
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default=None, help="per-entry run folders (default: under --out)")
    parser.add_argument("--only", default="")
    parser.add_argument("--hardware", default=None,
                        help="profile for every entry's prediction (the machine it runs on)")
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the smoke matrix in CI")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out
    work.mkdir(parents=True, exist_ok=True)
    entries = [e for e in matrices()[args.matrix] if not args.only or e.name in args.only.split(",")]
    if args.hardware:
        entries = [Entry(**{**e.__dict__, "hardware": args.hardware}) for e in entries]
    results: dict[str, dict] = {}
    bundle = out / "records.json"
    for entry in entries:
        started = time.perf_counter()
        try:
            if entry.baseline:
                got = {entry.name: run_baseline(entry, work, entry.gen_len or args.gen_len,
                                                entry.prompt_len or args.prompt_len)}
            else:
                got = run_hpi(entry, work, args.gen_len, args.prompt_len, args.device)
        except Exception as e:  # noqa: BLE001 - one failure must not lose the other entries' records
            got = {entry.name: {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}}
        for name, doc in got.items():
            doc["entry"] = entry.__dict__ | {"plan": entry.plan, "variants": list(entry.variants)}
            doc["entry_wall_s"] = time.perf_counter() - started
        results.update(got)
        print(f"[{time.strftime('%H:%M:%S')}] {entry.name}: "
              f"{'ERROR ' + results[entry.name]['error'][:300] if 'error' in results[entry.name] else 'ok'} "
              f"({results[entry.name]['entry_wall_s']:.0f} s, {len(got)} record(s))", flush=True)
        bundle.write_text(json.dumps(results, default=str))  # after every entry: nothing measured is lost
    lines, summary = summarize(results)
    print("\n".join(lines))
    print(json.dumps({"matrix": args.matrix, "entries": len(entries),
                      "errors": sum("error" in r for r in results.values()), **summary}))


if __name__ == "__main__":
    main()
