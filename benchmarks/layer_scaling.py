"""How a graphed decoder layer's time grows with the batch and the context, on one GPU.

``hpi probe`` times real layers at batch 1 (``hpi.executor.probe.measure_decoder_layers``), which gives the
cost model's ``hbm`` and ``layer_device_overhead_s``. The graphed 8B records grow faster with the batch than
the model says (H200 tp 2: 6.6 / 7.5 / 8.7 ms at bs 1 / 16 / 64, predicted 6.3 / 6.4 / 6.9 ms; README's
fidelity section). This times the same layers, on the same path, over a grid of batch and prompt length, so
the growth can be split into what the context adds (KV reads, attention) and what the batch adds at a fixed
context (skinny GEMMs instead of GEMVs). Each cell: the step at 2 and at 6 layers, per layer = difference / 4.

    python benchmarks/layer_scaling.py --out DIR [--model llama-3-8b] [--batches 1,16,64] [--prompts 128,1024]

Writes DIR/layer_scaling.json; prints one line per cell with the layer's time, its weight bytes and the KV
bytes it reads at the last step.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path


def kv_bytes_per_layer(model: str, batch: int, context: int, dtype_bytes: int = 2) -> float:
    """Keys and values one decoder layer reads at one decode step over ``context`` cached tokens, as the
    planner counts a token's cache (``ModelSpec.kv_cache_elems_per_token_per_layer``)."""
    from hpi.planner.catalog import load_model

    return float(batch * context * load_model(model).kv_cache_elems_per_token_per_layer * dtype_bytes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompts", default="128,1024")
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)

    import torch

    from hpi.executor.modeling import load_hf_config
    from hpi.executor.probe import ProbeSettings, time_layers

    dev = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    config = load_hf_config(args.model)
    cells = []
    for prompt in (int(p) for p in args.prompts.split(",")):
        settings = replace(ProbeSettings.full(), layer_prompt_len=prompt, layer_gen_len=args.gen_len,
                           layer_reps=args.reps)
        for batch in (int(b) for b in args.batches.split(",")):
            t0 = time.perf_counter()
            cell = time_layers(torch, settings, config, args.model, dev, dtype, batch=batch)
            cell["kv_bytes_last_step"] = kv_bytes_per_layer(args.model, batch, prompt + args.gen_len - 1,
                                                            torch.finfo(dtype).bits // 8)
            cell["seconds"] = time.perf_counter() - t0
            cells.append(cell)
            print(f"b{batch:<3} prompt {prompt:5}  layer {cell['layer_s'] * 1e6:7.1f} us  weights "
                  f"{cell['layer_bytes'] / 1e6:6.0f} MB  kv {cell['kv_bytes_last_step'] / 1e6:7.1f} MB", flush=True)
    out = {"kind": "hpi.LayerScaling", "date": time.strftime("%Y-%m-%d"), "model": args.model,
           "torch": torch.__version__,
           "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "gen_len": args.gen_len,
           "reps": args.reps, "counts": list(ProbeSettings.full().layer_counts), "cells": cells}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "layer_scaling.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
