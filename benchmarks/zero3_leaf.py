"""ZeRO-3's host time a decoder layer at DeepSpeed's per-module hooks and with each layer one leaf, side by side in
one run on the CPU (issue 20, streaming; ``Plan.zero3_leaf``, ``Efficiency.offload_layer_leaf_share``).

DeepSpeed hooks every submodule of a ZeRO-3 model: a Llama decoder layer is 13 hooked modules (the layer, attention,
four projections, the MLP, three projections, the activation, two norms), and each hook runs Python (trace, status,
prefetch walk, release). Naming each layer a leaf (DeepSpeed's ``zero_optimization.leaf_module``) leaves one hook
pair a layer that gathers all of its parameters at once. The host time is the same code on a CPU as beside a GPU,
so a CPU says how much of it the leaves remove; what it buys on a GPU (copies the hooks no longer delay) is for the
device matrix ``leaf-h200`` (benchmarks/gpu_matrix.py).

Three builds of one Llama-shaped model (``--layers`` layers of width 64, fp32, random weights, one rank), each through
``hpi.executor.launch`` as ``hpi run --device cpu`` runs it:
- ``plain``: the model resident, no ZeRO-3: the layers' own compute and launches;
- ``module``: ZeRO-3 with the weights offloaded to CPU memory, every parameter gathered each forward (persistence
  threshold 0), DeepSpeed's hooks on every module;
- ``layer``: the same with ``zero3_leaf`` layer.
ZeRO-3's host time a layer = (decode step - plain's) / layers; ``layer_over_module`` is the share the leaves leave.
The three must decode the same tokens. Repeated ``--reps`` times, interleaved; medians.

    DS_ACCELERATOR=cpu python benchmarks/zero3_leaf.py --out DIR [--layers 16] [--reps 3]

Writes DIR/zero3_leaf.json (every record's step and the summary) and prints one line per build and the summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

BUILDS = ("plain", "module", "layer")


def model_config(layers: int) -> dict:
    """A Llama-shaped config small enough that ZeRO-3's host time dominates each layer's."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "intermediate_size": 176, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256, "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}


def plan_of(build: str):
    from hpi.planner.specs.plan import Plan

    if build == "plain":
        return Plan()
    # persistence 0: every parameter is gathered every forward, as a large model's are (the default 1e5 would keep
    # this small model's matrices resident and leave the hooks with nothing to fetch)
    return Plan(offload="cpu", pin_memory=False, persistence_threshold_elems=0, zero3_leaf=build)


def run_one(build: str, model: str, prompt_len: int, gen_len: int, out_dir: Path) -> dict:
    """One build's record (``hpi.executor.launch``): its median decode step and its tokens."""
    from hpi.executor.launch import launch
    from hpi.executor.spec import RunSpec
    from hpi.planner.specs.workload import Workload

    spec = RunSpec(plan=plan_of(build), model=model, workload=Workload(prompt_len_tokens=prompt_len,
                                                                       gen_len_tokens=gen_len),
                   device="cpu", dtype="fp32", out_dir=str(out_dir))
    record = launch(spec, timeout_s=600).to_json()
    return {"build": build, "decode_step_s": record["decode_step_s"]["median"], "tokens": record["tokens"]}


def summarize(runs: list[dict], layers: int) -> dict:
    """Median decode step per build, ZeRO-3's host time a layer at each granularity and their ratio."""
    step = {b: statistics.median(r["decode_step_s"] for r in runs if r["build"] == b) for b in BUILDS}
    per_layer = {b: (step[b] - step["plain"]) / layers for b in ("module", "layer")}
    tokens = {b: next(r["tokens"] for r in runs if r["build"] == b) for b in BUILDS}
    return {"layers": layers, "decode_step_s": step, "zero3_host_s_per_layer": per_layer,
            "layer_over_module": per_layer["layer"] / per_layer["module"] if per_layer["module"] > 0 else None,
            "same_tokens": all(t == tokens["plain"] for t in tokens.values())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--gen-len", type=int, default=16)
    args = ap.parse_args(argv)
    for flag, value in (("--layers", args.layers), ("--reps", args.reps), ("--prompt-len", args.prompt_len),
                        ("--gen-len", args.gen_len)):
        if value < (2 if flag == "--gen-len" else 1):
            ap.exit(2, f"zero3_leaf.py: {flag} {value} is too small: give a positive count (--gen-len at least 2)\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "config.json"
        model.write_text(json.dumps(model_config(args.layers)))
        for rep in range(args.reps):
            for build in BUILDS:
                run = run_one(build, str(model), args.prompt_len, args.gen_len, Path(tmp) / f"{build}-{rep}")
                runs.append({"rep": rep, **run})
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "tokens"}), flush=True)
    summary = summarize(runs, args.layers)
    (out / "zero3_leaf.json").write_text(json.dumps({"kind": "hpi.Zero3Leaf", "runs": runs,
                                                     "summary": summary}, indent=1) + "\n")
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
