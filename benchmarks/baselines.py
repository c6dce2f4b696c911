"""Baselines hpi is compared with, side by side in the same GPU session (issue 3). One per process:

    python benchmarks/baselines.py hf-resident  --model llama-3-8b --batch 1 [--prompt-len 512 --gen-len 32]
    python benchmarks/baselines.py accelerate   --model llama-3-8b --batch 1 --gpu-gib 4
    torchrun --nproc-per-node 1 benchmarks/baselines.py ds-examples --model llama-3-8b --batch 1 [--no-pin]

- hf-resident: the model on one GPU, transformers ``generate`` (the plain way, where the model fits).
- accelerate: HF Accelerate big-model inference: ``infer_auto_device_map`` with ``max_memory`` forcing
  the decoder layers to CPU, ``dispatch_model``; weights are copied to the GPU layer by layer each forward
  (no prefetch, one device at a time).
- ds-examples: DeepSpeedExamples' ZeRO-Inference recipe (inference/huggingface/zero_inference/run_model.py):
  the whole HF model under ZeRO-3 with offload_param cpu, stage3_prefetch_bucket_size = 2*h^2,
  stage3_max_live_parameters = 2*h^2, stage3_param_persistence_threshold = h, then HF ``generate``.

All build the model from its config with the same seeded random weights as hpi (hpi.executor.weights), drawn
on the GPU tensor by tensor and moved where the baseline keeps them. Timing follows run_model.py: a
warm-up call, then prefill = a 1-token generate, total = a gen_len generate, decode step =
(total - prefill) / (gen_len - 1), throughput = batch * gen_len / total. The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def _config(model: str):
    from hpi.executor.modeling import load_hf_config

    return load_hf_config(model)


def _materialize(config, dtype: torch.dtype, where: str):
    """An HF CausalLM with hpi's seeded weights, on ``where`` ("cuda" or "cpu"), drawn on the GPU."""
    import transformers

    from hpi.executor.weights import RandomSource

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    src = RandomSource(config, 0, dtype, "cuda")
    state = {}
    for name, info in src.table.items():
        if info.source != name and info.source in state:
            state[name] = state[info.source]
        else:
            tensor = src.full(name)
            state[name] = tensor if where == "cuda" else tensor.to("cpu")
            del tensor
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    with torch.device(where):  # non-persistent buffers (rotary frequencies) were built on meta
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    left = [name for name, buf in model.named_buffers() if buf.device.type == "meta"]
    if left:
        raise RuntimeError(f"buffers left on the meta device: {left}")
    return model.eval()


def _time_generate(model, ids: torch.Tensor, gen_len: int, sync) -> dict:
    kw = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        sync()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        sync()
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=gen_len, min_new_tokens=gen_len, **kw)
        sync()
        total = time.perf_counter() - t0
    batch = ids.shape[0]
    decode = (total - prefill) / max(gen_len - 1, 1)
    return {"prefill_s": prefill, "ttft_s": prefill, "total_s": total, "decode_step_s": decode,
            "throughput_tok_s": batch * gen_len / total, "tokens": out[:, ids.shape[1]:].tolist()}


def _ids(config, batch: int, prompt_len: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, config.vocab_size, (batch, prompt_len), generator=gen, dtype=torch.int64)


def hf_resident(args) -> dict:
    config = _config(args.model)
    model = _materialize(config, torch.bfloat16, "cuda")
    ids = _ids(config, args.batch, args.prompt_len).cuda()
    result = _time_generate(model, ids, args.gen_len, torch.cuda.synchronize)
    result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return result


def accelerate_offload(args) -> dict:
    from accelerate import dispatch_model, infer_auto_device_map

    config = _config(args.model)
    model = _materialize(config, torch.bfloat16, "cpu")
    no_split = [type(model.model.layers[0]).__name__]
    device_map = infer_auto_device_map(model, max_memory={0: f"{args.gpu_gib}GiB", "cpu": "1000GiB"},
                                       no_split_module_classes=no_split, dtype=torch.bfloat16)
    on_cpu = sum(1 for d in device_map.values() if d == "cpu")
    model = dispatch_model(model, device_map=device_map, main_device=0)
    ids = _ids(config, args.batch, args.prompt_len).cuda()
    result = _time_generate(model, ids, args.gen_len, torch.cuda.synchronize)
    result.update({"modules_on_cpu": on_cpu, "modules_total": len(device_map),
                   "peak_allocated_bytes": torch.cuda.max_memory_allocated()})
    return result


def ds_examples(args) -> dict:
    import deepspeed
    import torch.distributed as dist

    dist.init_process_group("nccl", device_id=torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    config = _config(args.model)
    h = config.hidden_size
    ds_config = {
        "train_micro_batch_size_per_gpu": args.batch,
        "bf16": {"enabled": True},
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "cpu", "pin_memory": not args.no_pin},
            "stage3_prefetch_bucket_size": 2 * h * h,
            "stage3_param_persistence_threshold": h,
            "stage3_max_live_parameters": 2 * h * h,
        },
        "steps_per_print": 2000,
        "wall_clock_breakdown": False,
    }
    model = _materialize(config, torch.bfloat16, "cpu")
    engine = deepspeed.initialize(model=model, config=ds_config)[0]
    engine.module.eval()
    ids = _ids(config, args.batch, args.prompt_len).cuda()
    result = _time_generate(engine.module, ids, args.gen_len, torch.cuda.synchronize)
    result.update({"ds_config": ds_config, "peak_allocated_bytes": torch.cuda.max_memory_allocated()})
    dist.destroy_process_group()
    return result


BASELINES = {"hf-resident": hf_resident, "accelerate": accelerate_offload, "ds-examples": ds_examples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", choices=sorted(BASELINES))
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--gpu-gib", type=float, default=4.0, help="accelerate: GPU memory it may use")
    parser.add_argument("--no-pin", action="store_true", help="ds-examples: pageable host memory")
    args = parser.parse_args()
    started = time.perf_counter()
    result = BASELINES[args.baseline](args)
    result.update({"baseline": args.baseline, "model": args.model, "batch_size": args.batch,
                   "prompt_len": args.prompt_len, "gen_len": args.gen_len, "wall_s": time.perf_counter() - started,
                   "device_name": torch.cuda.get_device_name(0)})
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
