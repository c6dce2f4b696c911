"""One rank of a run: groups, its model shard, ZeRO-3, the pipeline stage, generate, measure.

Started by ``hpi.executor.launch`` through torchrun as ``python -m hpi.executor.worker <out_dir>/spec.json``
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment). Rank 0 writes the RunRecord to
``<out_dir>/record.json`` (atomically) and prints it as its last stdout line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

# torchrun's error recorder writes each failing rank's traceback to error.json; the launcher reads it to
# name the rank that failed first and show why.
from torch.distributed.elastic.multiprocessing.errors import record as record_errors

from hpi.executor import diskstats, hostmem
from hpi.executor.generate import LeftPadding, PipelineGenerator, Sampler, StepTimes, left_pad
from hpi.executor.groups import Groups, build_groups
from hpi.executor.profiling import profiled
from hpi.executor.record import build_record
from hpi.executor.spec import RunSpec, write_json_atomic
from hpi.executor.watchdog import HEARTBEAT_EVERY, heartbeat_line
from hpi.planner.specs.plan import decode_graph_blocker
from hpi.records import ModelInfo, RankReport, RunRecord

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _device(spec: RunSpec) -> torch.device:
    if spec.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _init_distributed(device: torch.device) -> None:
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")


def uses_deepspeed(spec: RunSpec) -> bool:
    """ZeRO-3 is needed to offload, to partition over dp > 1 or to quantize; a resident dp=1 plan runs plain."""
    return not spec.plan.runs_without_zero3


def _ds_config(spec: RunSpec, hidden_size: int, stage_layers: int | None = None) -> dict:
    from hpi.executor.render import ds_config

    return ds_config(spec.plan, dtype=spec.dtype, hidden_size=hidden_size, nvme_path=spec.nvme_path,
                     stage_layers=stage_layers)


def zero3_stage(module: torch.nn.Module, spec: RunSpec, g: Groups, hidden_size: int):
    """Hand the stage to DeepSpeed ZeRO-3 with every knob of the plan written explicitly."""
    from hpi.executor.zero3 import wrap_zero3

    return wrap_zero3(module, _ds_config(spec, hidden_size, len(module.layers)), g, fetch_wait=spec.fetch_wait)


def check_quantizable(meta_stage: torch.nn.Module) -> None:
    """DeepSpeed quantizes each Linear/Embedding weight in groups of 64 along its input dimension."""
    from hpi.planner.specs.plan import QUANT_GROUP_SIZE

    for name, module in meta_stage.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and weight.shape[-1] % QUANT_GROUP_SIZE:
            raise ValueError(
                f"{name}.weight has {weight.shape[-1]} input features per rank, not a multiple of the quantization "
                f"group ({QUANT_GROUP_SIZE}): use --quant-bits 16 or a tp that keeps the width a multiple of 64"
            )


def build_quantized_stage(config, shard, spec: RunSpec, g: Groups, dtype: torch.dtype, device: torch.device):
    """8/4-bit weights: DeepSpeed quantizes each weight as its module is built inside ``zero.Init``.

    The modules use their own initializers (not hpi's seeded weights): quantized runs measure speed and
    memory; their tokens are not compared across layouts.
    """
    import deepspeed

    from hpi.executor.modeling import build_stage

    if spec.checkpoint:
        raise ValueError("loading a checkpoint into 8/4-bit weights is not supported yet: use --quant-bits 16")
    check_quantizable(build_stage(config, shard, tp_group=g.tp_group, dtype=dtype, device="meta"))
    with deepspeed.zero.Init(config_dict_or_path=_ds_config(spec, config.hidden_size), data_parallel_group=g.dp_group):
        return build_stage(config, shard, tp_group=g.tp_group, dtype=dtype, device=device, framework_init=True)


def prepare_dequant(spec: RunSpec, dtype: torch.dtype, device: torch.device) -> None:
    """8/4-bit plans where a measurement fuses the dequantization (``RunSpec.fused_dequant``): compile the fused
    kernel now, inside the build, so that no measured forward pays for the compile, and check it on this device
    against DeepSpeed's torch ops bit for bit (``hpi.executor.dequant.warm_up``)."""
    if spec.plan.is_quantized and any(one.fused_dequant for one in spec.measurements()):
        from hpi.executor.dequant import warm_up

        warm_up(spec.plan.weight_bits, dtype, device)


def use_dequant(spec: RunSpec) -> dict[str, int] | None:
    """Switch DeepSpeed's dequantization of 8/4-bit weights to the fused kernel or back, as this measurement
    asks; returns the patch's call counts so far (``check_dequant``), None for a 16-bit plan."""
    if not spec.plan.is_quantized:
        return None
    from hpi.executor import dequant

    dequant.use_fused(spec.fused_dequant)
    return dequant.calls()


def check_dequant(spec: RunSpec, before: dict[str, int] | None) -> None:
    """A measurement that asked for the fused dequantization must have dequantized through the patch."""
    from hpi.executor import dequant

    if before is not None and spec.fused_dequant and dequant.calls() == before:
        raise RuntimeError("fused_dequant was asked, but no weight was dequantized through hpi.executor.dequant's "
                           "patch of DeQuantizer.dequantize: DeepSpeed's quantized F.linear no longer calls it; "
                           "run with --no-fused-dequant and report this")


def zero3_transfer_bytes(module: torch.nn.Module) -> tuple[int, int, int]:
    """(bytes copied host->device per forward, pinned host bytes, bytes read from NVMe per forward) of this
    rank's ZeRO-3 partitions. An NVMe-offloaded partition is read into a pinned swap buffer and then copied
    to the device, so it counts in both directions' per-forward bytes."""
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    per_forward = pinned = nvme = 0
    for p in module.parameters():
        part = getattr(p, "ds_tensor", None)
        if part is None or getattr(p, "ds_persist", False):
            continue
        on_nvme = getattr(part, "final_location", None) == OffloadDeviceEnum.nvme
        n = (part.ds_numel if on_nvme else part.numel()) * part.element_size()
        if on_nvme:
            nvme += n
            per_forward += n
        elif part.device.type == "cpu":
            per_forward += n
            if part.is_pinned():
                pinned += n
    return per_forward, pinned, nvme


@dataclass(frozen=True, eq=False)
class Prompts:
    """The batch's prompt ids [batch, prompt_len], left-padded to the longest, and which columns are real.

    Every rank builds it from the spec (text prompts tokenized by each rank's own tokenizer, random ids
    from the seed), so every stage and TP rank holds the same padding without a message."""

    ids: torch.Tensor
    padding: LeftPadding

    def rows(self, start: int, stop: int) -> "Prompts":
        return Prompts(self.ids[start:stop], self.padding.rows(start, stop))


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS, else 0: pads are never attended, the id only has to exist."""
    for token_id in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if token_id is not None:
            return int(token_id)
    return 0


def prompt_batch(spec: RunSpec, vocab_size: int, tokenizer=None) -> Prompts:
    """The given prompts tokenized and left-padded, or seeded random ids of the workload's prompt length
    (the same for every layout; no row padded)."""
    wl, batch = spec.workload, spec.plan.batch_size
    if spec.prompts:
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer: pass --checkpoint DIR with tokenizer files")
        texts = [spec.prompts[i % len(spec.prompts)] for i in range(batch)]
        enc = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
        empty = [t for t, e in zip(texts, enc) if not e]
        if empty:
            raise ValueError(f"prompt {empty[0]!r} tokenizes to no tokens: give prompts with some text")
        return Prompts(*left_pad(enc, pad_token_id(tokenizer)))
    gen = torch.Generator().manual_seed(spec.seed)
    ids = torch.randint(0, vocab_size, (batch, wl.prompt_len_tokens), generator=gen, dtype=torch.int64)
    return Prompts(ids, LeftPadding((wl.prompt_len_tokens,) * batch, wl.prompt_len_tokens))


def load_tokenizer(spec: RunSpec):
    """The checkpoint's tokenizer, or None when there is no checkpoint or it holds no tokenizer files."""
    if not spec.checkpoint:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec.checkpoint)
    except (OSError, ValueError, TypeError):
        return None


class LineStreamer:
    """Chat output of the first sequence, written to stdout a whole line at a time (torchrun relays lines)."""

    def __init__(self, tokenizer, eos_token_id: int | None) -> None:
        self.tokenizer, self.eos = tokenizer, eos_token_id
        self.ids: list[int] = []
        self.written = 0
        self.finished = False

    def __call__(self, forward: int, tokens: list[torch.Tensor]) -> None:
        if self.finished:
            return
        token = int(tokens[0][0])
        if token == self.eos:
            self.finished = True
            return self.close()
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = text.rfind("\n")
        if cut >= self.written:
            sys.stdout.write(text[self.written : cut + 1])
            sys.stdout.flush()
            self.written = cut + 1

    def close(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.written:
            sys.stdout.write(text[self.written :] + "\n")
            sys.stdout.flush()
        self.written = len(text) + 1


def _prediction(spec: RunSpec, planner_model) -> tuple[dict | None, float | None]:
    if not spec.hardware:
        return None, None
    from hpi.planner.predict import predict
    from hpi.planner.profiles import load_profile

    est = predict(planner_model, load_profile(spec.hardware), spec.workload, spec.plan)
    return est.to_dict(), est.placement.h2d_pinned_bytes_s


def run(spec: RunSpec) -> list[RunRecord] | None:
    """Build this rank's stage once, then measure the spec and each of its variants on it.

    Returns rank 0's records (the spec's own first), None on other ranks.
    """
    from hpi.executor.modeling import ShardSpec, build_stage, load_hf_config
    from hpi.planner.catalog import load_model

    device = _device(spec)
    _init_distributed(device)
    plan = spec.plan
    g = build_groups(plan.tp, plan.dp, plan.pp)
    config = load_hf_config(spec.model, spec.checkpoint)
    planner_model = load_model(spec.checkpoint or spec.model)
    for one in spec.measurements():  # RunSpec checked the plans; the model is known only here
        blocker = decode_graph_blocker(one.plan, planner_model) if one.decode_graphs else None
        if blocker:
            raise ValueError(f"CUDA graphs cannot run {one.plan.label}: {blocker}; drop --cuda-graphs")
    counts = spec.stage_layer_counts(planner_model)
    shard = ShardSpec.for_stage(counts, g.stage, tp_rank=g.tp_rank, tp_size=g.tp)
    dtype = DTYPES[spec.dtype]

    deepspeed_path = uses_deepspeed(spec)
    if deepspeed_path:  # its import (~0.2 GB resident) is not part of the build's host peak
        import deepspeed  # noqa: F401
    t0 = time.perf_counter()
    hostmem.reset_peak()
    rss_before_build = hostmem.resident_bytes()
    build_device = torch.device("cpu") if plan.is_offloaded else device
    if plan.is_quantized:
        module = build_quantized_stage(config, shard, spec, g, dtype, device)
        prepare_dequant(spec, dtype, device)
    else:  # seeded random weights drawn on the accelerator (fast), kept where the plan stores them
        module = build_stage(config, shard, tp_group=g.tp_group, dtype=dtype, device=build_device, seed=spec.seed,
                             checkpoint=spec.checkpoint, init_device=device)
    module.eval()
    from hpi.executor.zero3 import hooked_modules

    stage = zero3_stage(module, spec, g, config.hidden_size) if deepspeed_path else module.to(device)
    built = _Built(stage=stage, groups=g, config=config, planner_model=planner_model, dtype=dtype, device=device,
                   transfer_bytes=zero3_transfer_bytes(module) if deepspeed_path else (0, 0, 0),
                   zero3_hooked=hooked_modules(module) if deepspeed_path else None,
                   build_s=time.perf_counter() - t0, tokenizer=load_tokenizer(spec),
                   host_build_bytes=(rss_before_build, hostmem.peak_bytes()))
    if spec.mode != "serve":  # the watchdog watches this rank's progress from here (hpi.executor.watchdog)
        print(heartbeat_line(g.rank, f"built its stage in {built.build_s:.1f} s"), flush=True)
    if spec.mode == "serve":  # the model stays loaded and answers requests until the front says stop
        from hpi.executor.serve_loop import serve

        use_dequant(spec)
        serve(spec, built)
        dist.destroy_process_group()
        return None
    records = []
    for one in spec.measurements():
        if device.type == "cuda":
            torch.cuda.empty_cache()  # a variant's peak reserved memory must not inherit the last one's cache
        record = measure(one, built)
        if record is not None:
            records.append(record)
    dist.barrier()
    dist.destroy_process_group()
    return records if g.rank == 0 else None


class Heartbeat:
    """A heartbeat line (``hpi.executor.watchdog``) after the first forward (the prefill), every
    ``HEARTBEAT_EVERY`` forwards and after the last: how far this rank got, and how fast."""

    def __init__(self, rank: int, what: str) -> None:
        self.rank, self.what, self.start = rank, what, time.perf_counter()

    def __call__(self, forward: int, forwards: int) -> None:
        done = forward + 1
        if forward == 0 or done % HEARTBEAT_EVERY == 0 or done == forwards:
            print(heartbeat_line(self.rank, f"{self.what} forward {done}/{forwards} after "
                                            f"{time.perf_counter() - self.start:.2f} s"), flush=True)


@dataclass
class _Built:
    """What one build gives every measurement on it."""

    stage: object
    groups: Groups
    config: object
    planner_model: object
    dtype: torch.dtype
    device: torch.device
    transfer_bytes: tuple[int, int, int]  # zero3_transfer_bytes
    zero3_hooked: int | None  # hpi.executor.zero3.hooked_modules of the stage; None without ZeRO-3
    build_s: float
    tokenizer: object
    host_build_bytes: tuple[int, int] = (0, 0)  # (resident set before the build, its high-water mark during it)


def measure(spec: RunSpec, b: _Built) -> RunRecord | None:
    """Warm up, generate once under the timers, gather every rank's report; rank 0 returns the record."""
    from transformers import DynamicCache

    plan, g, device, config = spec.plan, b.groups, b.device, b.config
    kv_offload = plan.kv_offload and device.type == "cuda"  # on the CPU the cache already lives in host memory
    prompts = prompt_batch(spec, config.vocab_size, b.tokenizer)
    eos = getattr(config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    streamer = None
    if spec.mode == "chat" and b.tokenizer is not None and g.rank == 0 and g.is_last_stage:
        streamer = LineStreamer(b.tokenizer, eos)
    rows = plan.batch_per_replica
    mine = prompts.rows(g.dp_rank * rows, (g.dp_rank + 1) * rows)
    prompt_len = prompts.padding.prompt_len
    generator = PipelineGenerator(
        stage=b.stage,
        groups=g,
        new_cache=lambda: DynamicCache(offloading=kv_offload),
        hidden_size=config.hidden_size,
        dtype=b.dtype,
        device=device,
        micro_batches=plan.micro_batches,
        sampler=Sampler(spec.temperature, spec.top_p, spec.seed),
        eos_token_id=eos if spec.mode == "chat" else None,
        decode_graphs=spec.decode_graphs,
        decode_compile=spec.decode_compile,
        skinny_gemm=spec.skinny_gemm,
    )
    dequant_calls = use_dequant(spec)
    max_new = spec.workload.gen_len_tokens
    captures: list[float] = []  # first graphed steps, warm-ups included: a compile is paid in the first of its shape
    for i in range(spec.warmup_steps):
        warm = replace(generator, times=StepTimes(), on_forward=Heartbeat(g.rank, f"warm-up {i + 1}"))
        # the measured run's cache slots: a graphed warm-up of fewer tokens compiles and captures its shapes
        warm.run(mine.ids, rows, prompt_len, spec.warmup_tokens, chat=False, padding=mine.padding,
                 cache_slots=prompt_len + max_new)
        captures += warm.times.capture_s
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _tp_allreduce_seconds(reset=True)  # count the measured run only, not the warm-up
    dist.barrier()
    generator.on_tokens = streamer
    generator.on_forward = Heartbeat(g.rank, "measured")
    disk_before = diskstats.snapshot(spec.nvme_path) if plan.offload == "nvme" and spec.nvme_path else None
    with profiled(spec.out_dir, g.rank):  # HPI_TORCH_PROFILE=1: where the measured run's time went (profiling.py)
        new_tokens = generator.run(mine.ids, rows, prompt_len, max_new, chat=spec.mode == "chat",
                                   padding=mine.padding)
    check_dequant(spec, dequant_calls)
    disk = diskstats.between(disk_before, diskstats.snapshot(spec.nvme_path) if disk_before else None)
    if streamer is not None:
        streamer.close()

    h2d_per_forward, pinned, nvme_per_forward = b.transfer_bytes
    report = RankReport(
        rank=g.rank,
        coords=g.coords,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        forward_end_s=tuple(generator.times.forward_end_s),
        busy_s=tuple(generator.times.busy_s),
        compile_s=max(captures + generator.times.capture_s) if spec.decode_compile else None,
        peak_allocated_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        peak_reserved_bytes=torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0,
        host_rss_bytes=hostmem.resident_bytes(),
        host_rss_before_build_bytes=b.host_build_bytes[0],
        host_build_peak_bytes=b.host_build_bytes[1],
        pinned_bytes=pinned,
        h2d_bytes_per_forward=h2d_per_forward,
        nvme_bytes_per_forward=nvme_per_forward,
        nvme_device=disk.device if disk else None,
        nvme_read_bytes=disk.read_bytes if disk else None,
        nvme_read_interval_s=disk.interval_s if disk else None,
        nvme_avg_queue_depth=disk.avg_queue_depth if disk else None,
        tp_allreduce_s=_tp_allreduce_seconds(),
        zero3_hooked_modules=b.zero3_hooked,
        build_s=b.build_s,
        tokens=tuple(map(tuple, torch.cat(new_tokens).tolist())) if new_tokens else (),
    )
    gathered: list[RankReport | None] = [None] * g.world_size if g.rank == 0 else None
    dist.gather_object(report, gathered, dst=0)
    if g.rank != 0:
        return None
    record = _fold(spec, gathered, g, b.planner_model)
    texts = None
    if b.tokenizer is not None:
        texts = tuple(b.tokenizer.decode(_until(list(t), eos if spec.mode == "chat" else None),
                                         skip_special_tokens=True)
                      for t in record.output.tokens)
    output = replace(record.output, prompt_len_tokens_actual=prompt_len,  # the padded width: the longest prompt
                     prompt_tokens_per_row=tuple(prompts.padding.lengths) if spec.prompts else None, texts=texts)
    return replace(record, output=output)


def _until(tokens: list[int], eos: int | None) -> list[int]:
    """Tokens up to (not including) the first EOS, when one is given."""
    return tokens[: tokens.index(eos)] if eos is not None and eos in tokens else tokens


def _tp_allreduce_seconds(reset: bool = False) -> float:
    from hpi.executor.tp import tp_allreduce_seconds

    return tp_allreduce_seconds(reset)


def _fold(spec: RunSpec, reports: list[RankReport], g: Groups, planner_model) -> RunRecord:
    """Rank 0: the tokens of every replica in batch order, the prediction, the record."""
    last_stage = g.pp - 1
    tokens: list[list[int]] = []
    for dp_idx in range(g.dp):
        owner = next(r for r in reports if r.coords == (0, dp_idx, last_stage))
        tokens += [list(t) for t in owner.tokens]
    prediction, profile_bw = _prediction(spec, planner_model)
    model_info = ModelInfo(planner_model.name, planner_model.params_total, planner_model.params_active)
    return build_record(spec.to_dict(), reports, tokens, prediction, profile_bw, model_info)


@record_errors
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.stderr.write("usage: python -m hpi.executor.worker SPEC.json\n")
        return 2
    spec = RunSpec.read(argv[0])
    records = run(spec)
    if records is not None:
        record, variants = records[0], records[1:]
        for one, variant in zip(spec.measurements()[1:], variants):
            write_json_atomic(os.path.join(one.out_dir, "record.json"), variant.to_json())
        if variants:  # where the variants' records are, relative to this run's folder
            record = replace(record, variant_records=tuple(f"variant-{i}/record.json"
                                                           for i in range(1, len(variants) + 1)))
        doc = record.to_json()
        write_json_atomic(os.path.join(spec.out_dir, "record.json"), doc)
        sys.stdout.write(json.dumps(doc, default=str) + "\n")
        sys.stdout.flush()
    return 0


def exit_now(code: int) -> None:
    """End the rank without the interpreter's teardown, once its outputs are flushed.

    Why: at finalization, C++ libraries a rank has loaded (gloo's worker threads, DeepSpeed's ops) are
    destroyed in an order Python does not control, and a thread still joinable then calls std::terminate.
    A CPU CI run saw exactly that: a rank of a finished 4-rank run aborted ("terminate called without an
    active exception"), then faulthandler hit a bus error dumping thread states already freed; the
    pattern is pytorch/pytorch PR 179291's (gloo threads outliving the interpreter). Everything a rank
    owes is on disk or in its pipes by now (records are written atomically, the process group destroyed),
    so skipping teardown loses nothing and takes that race away."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to deliver
            pass
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
