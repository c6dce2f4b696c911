"""Fixtures shared across the test tree.

Synthetic RunRecords for the calibration and validation tests: the cost model's own predictions on a
profile with known ("true") coefficients, as ``hpi.records.RunRecord``s with the parts calibration reads."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from hpi.planner.catalog import load_model
from hpi.planner.predict import predict
from hpi.planner.profiles import load_profile
from hpi.planner.specs.hardware import HardwareProfile
from hpi.planner.specs.plan import Plan
from hpi.planner.specs.workload import Workload
from hpi.records import DecodeSteps, ModelInfo, RankReport, RunRecord, Timings

PROFILE = "h200-2gpu"
# The coefficients the synthetic records are generated with (the profile's priors differ from each).
TRUE = dict(
    h2d_stream_pinned=0.70, h2d_stream_pageable=0.90, layer_overhead_s=0.6e-3, step_overhead_s=1.0e-3,
    matmul_prefill=0.75, collective_drift_factor=1.6, offload_layer_overhead_s=2.0e-3,
    gpu_workspace_bytes=30e6,
)  # fmt: skip
TUNED = dict(prefetch_bucket_elems=400_000_000, max_live_elems=3_000_000_000)
# One plan per effect: host-bound resident decode (8B and tiny: layer vs step overhead), a compute-bound
# pipelined prefill, TP's collectives, pinned and pageable streaming, ZeRO-3 hooks on a tiny model.
PLANS = {
    "tiny-resident": ("tiny-llama", Plan(batch_size=2)),
    "tiny-offload": ("tiny-llama", Plan(offload="cpu", batch_size=2)),
    "8b-resident": ("llama-3-8b", Plan()),
    "8b-pp2-resident": ("llama-3-8b", Plan(pp=2, batch_size=8, micro_batches=2)),
    "8b-tp2-resident": ("llama-3-8b", Plan(tp=2)),
    "8b-cpu-pinned": ("llama-3-8b", Plan(offload="cpu")),
    "8b-cpu-pinned-b16": ("llama-3-8b", Plan(offload="cpu", batch_size=16, **TUNED)),
    "8b-cpu-pageable": ("llama-3-8b", Plan(offload="cpu", pin_memory=False)),
    # TP 2 with DeepSpeed's host fetch wait: the hooks join the host chain that the drift stretches, which
    # tells the drift factor apart from the per-collective issue cost (resident TP alone cannot).
    "8b-tp2-cpu-hostwait": ("llama-3-8b", Plan(offload="cpu", tp=2)),
}
WORKLOADS = {"8b-tp2-cpu-hostwait": Workload(512, 32, fetch_wait="host")}  # the others: Workload(512, 32)


def true_profile(**changes) -> HardwareProfile:
    prior = load_profile(PROFILE, calibrated=False)
    return dataclasses.replace(prior, efficiency=dataclasses.replace(prior.efficiency, **{**TRUE, **changes}))


def synthetic_record(name: str, model: str, plan: Plan, profile: HardwareProfile, *, scale: float = 1.0,
                     hardware: str = PROFILE, workload: Workload | None = None) -> RunRecord:
    """A RunRecord whose measurements are the model's predictions on ``profile`` (times ``scale``)."""
    workload = workload or WORKLOADS.get(name, Workload(512, 32))
    est = predict(load_model(model), profile, workload, plan)
    allocated = est.gpu_peak_bytes - est.gpu_memory_parts["framework"]
    decode = est.decode_step_s * scale
    return RunRecord(
        spec={"plan": plan.to_dict(), "model": model, "hardware": hardware, "out_dir": f"/tmp/runs/{name}",
              "workload": {"prompt_len_tokens": workload.prompt_len_tokens, "gen_len_tokens": workload.gen_len_tokens},
              "dtype": workload.compute_dtype, "fetch_wait": workload.fetch_wait},
        plan=plan.to_dict(),
        model=ModelInfo(model),
        hardware=hardware,
        timings=Timings(prefill_s=est.prefill_s * scale, decode_step_s=DecodeSteps(decode, decode, decode, (decode,))),
        ranks=tuple(RankReport(rank=r, peak_allocated_bytes=int(allocated)) for r in range(plan.world_size)),
        entry={"name": name},
    )


def synthetic_records(profile: HardwareProfile | None = None, names=None) -> dict[str, RunRecord]:
    profile = profile or true_profile()
    return {n: synthetic_record(n, *PLANS[n], profile) for n in (names or PLANS)}


@pytest.fixture(scope="session")
def synth() -> SimpleNamespace:
    return SimpleNamespace(PROFILE=PROFILE, TRUE=TRUE, PLANS=PLANS, true_profile=true_profile,
                           record=synthetic_record, records=synthetic_records)


def _tiny_llama_checkpoint(tmp_path_factory, folder: str, tokenizer_for):
    """tiny-llama's random weights (seed 0, fp32, several safetensors shards) saved in a fresh ``folder``, with
    ``tokenizer_for(vocab_size)`` saved beside them."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from hpi.executor.modeling import load_hf_config
    from hpi.executor.weights import save_checkpoint

    config = load_hf_config("tiny-llama")
    ckpt = save_checkpoint(config, seed=0, out_dir=tmp_path_factory.mktemp(folder), dtype=torch.float32,
                           shard_size_bytes=4 * 2**20)
    tokenizer_for(config.vocab_size).save_pretrained(ckpt)
    return ckpt


@pytest.fixture(scope="session")
def word_checkpoint(tmp_path_factory):
    """A local tiny-llama checkpoint (seed 0, fp32, several safetensors shards) with its own word-level
    tokenizer covering the whole vocabulary: "w{i}" is token i, words split on spaces, decoded joined by
    spaces. No pad, BOS or EOS token of its own (the pad id falls back to 0)."""
    pytest.importorskip("tokenizers")
    from hpi.serve.tokens import word_tokenizer

    return _tiny_llama_checkpoint(tmp_path_factory, "ckpt", word_tokenizer)


@pytest.fixture(scope="session")
def task_checkpoint(tmp_path_factory):
    """The same tiny-llama checkpoint (seed 0, fp32) with a word-level tokenizer that spells the offline lm-eval
    tasks (``hpi.evaluation.offline_tasks.task_tokenizer``: BOS 1, EOS 2, the tasks' words, then ``w{i}``)."""
    pytest.importorskip("tokenizers")
    from hpi.evaluation.offline_tasks import task_tokenizer

    return _tiny_llama_checkpoint(tmp_path_factory, "eval-ckpt", task_tokenizer)
