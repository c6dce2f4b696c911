"""hpi.executor.probe.kernels: the layer cost fit, real decoder layers timed on the executor's graphed path
(on the CPU here), and every GPU measurement where there is a GPU."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hpi.executor.probe import ProbeSettings


def test_layer_fit_recovers_a_line_holds_the_ceiling_and_falls_back_to_the_given_rate():
    from hpi.executor.probe import fit_layer_cost

    line = [(b, 120e-6 + b / 4.0e12) for b in (436e6, 1711e6)]  # 8B and 70B layers, 120 us fixed, 4 TB/s
    fit = fit_layer_cost(line, ceiling_bytes_s=4.26e12)
    assert fit.how == "fit" and fit.fixed_s == pytest.approx(120e-6) and fit.read_bytes_s == pytest.approx(4.0e12)
    fast = fit_layer_cost(line, ceiling_bytes_s=3.5e12)  # faster than the copy ceiling: held there
    assert fast.how == "ceiling" and fast.read_bytes_s == 3.5e12
    assert fast.fixed_s == pytest.approx(np.mean([t - b / 3.5e12 for b, t in line]))
    one = fit_layer_cost(line[:1], ceiling_bytes_s=4.26e12, given_bytes_s=3.72e12)  # one shape: the GEMV's rate
    assert one.how == "given" and one.fixed_s == pytest.approx(120e-6 + 436e6 / 4.0e12 - 436e6 / 3.72e12)
    backwards = fit_layer_cost([(436e6, 300e-6), (1711e6, 250e-6)], ceiling_bytes_s=4.26e12)  # disturbed: no line
    assert backwards.how == "given" and backwards.read_bytes_s == 4.26e12
    assert fit_layer_cost([(1e9, 1e-4)], ceiling_bytes_s=4e12).fixed_s == 0.0  # never below zero
    with pytest.raises(ValueError):
        fit_layer_cost([], ceiling_bytes_s=4e12)


def test_a_layer_shape_that_does_not_fit_is_skipped_and_the_others_kept(monkeypatch):
    torch = pytest.importorskip("torch")
    import hpi.executor.probe.kernels as kernels

    def fake_time(torch_, settings, config, model, dev, dtype):
        if model == "llama-3-70b":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"model": model, "layer_s": 2e-4}

    monkeypatch.setattr(kernels, "time_layers", fake_time)  # measure_decoder_layers looks it up in its module
    out = kernels.measure_decoder_layers(torch, ProbeSettings.full(), device="cpu")
    assert [s["model"] for s in out["shapes"]] == ["llama-3-8b"]
    assert out["skipped"] == {"llama-3-70b": "out of GPU memory"}
    with pytest.raises(RuntimeError, match="no decoder layer shape fits"):
        kernels.measure_decoder_layers(torch, dataclasses.replace(ProbeSettings.full(), layer_models=("llama-3-70b",)),
                                     device="cpu")


@pytest.mark.filterwarnings("ignore")
def test_decoder_layers_are_timed_on_the_executors_graphed_path_on_cpu():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from dataclasses import replace

    from hpi.executor.probe import measure_decoder_layers

    settings = replace(ProbeSettings.small(), layer_models=("tiny-llama",), layer_counts=(1, 3), layer_prompt_len=8,
                       layer_gen_len=5, layer_reps=2)
    out = measure_decoder_layers(torch, settings, device="cpu")
    (shape,) = out["shapes"]
    # tiny-llama: hidden 64, 4 heads, 2 kv heads of 16, MLP 176, two norms; fp32 on the CPU
    assert shape["layer_bytes"] == 4 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 176 + 2 * 64)
    assert shape["head_bytes"] == 4 * 32000 * 64
    assert set(shape["step_s"]) == {"1", "3"} and all(t > 0 for t in shape["step_s"].values())
    assert shape["layer_s"] == pytest.approx((shape["step_s"]["3"] - shape["step_s"]["1"]) / 2)
    assert set(shape["eager_step_s"]) == {"1", "3"} and all(t > 0 for t in shape["eager_step_s"].values())
    assert shape["eager_layer_s"] == pytest.approx((shape["eager_step_s"]["3"] - shape["eager_step_s"]["1"]) / 2)


@pytest.mark.gpu
def test_gpu_measurements_on_this_machine(cuda_gpus):
    if cuda_gpus == 0:
        pytest.skip("needs CUDA")
    import torch

    from hpi.executor.probe import measure_copies, measure_decode_kernels, measure_hbm, measure_matmul

    settings = ProbeSettings.small()
    copies = measure_copies(torch, cuda_gpus, settings)
    assert all(r > 0 for r in copies["h2d_pinned"]["alone"] + copies["d2h_pageable"]["together"])
    assert measure_matmul(torch, settings)["flops"]["bf16"] > 1e12
    assert measure_hbm(torch, settings)["bytes_s"] > 1e11
    kernels = measure_decode_kernels(torch, settings)
    assert kernels["gemv_bytes_s"] > 1e11 and 0 < kernels["tiny_kernel_s"] < 50e-6
    from hpi.executor.probe import measure_decoder_layers

    (layer,) = measure_decoder_layers(torch, settings)["shapes"]  # an 8B layer, 436 MB in bf16
    assert layer["layer_bytes"] == pytest.approx(436.2e6, rel=1e-3)
    assert layer["layer_bytes"] / 5e12 < layer["layer_s"] < 2e-3  # slower than any HBM read, faster than eager
