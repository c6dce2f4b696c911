"""hpi.executor.probe.efficiency: the profile's efficiency figures from the timed all-reduces, kernels and
decoder layers, and the shipped profiles' figures re-derived from the kept probe documents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpi.planner.profiles import load_profile
from hpi.planner.specs.hardware import Efficiency


def test_allreduce_alpha_is_the_least_latency_bound_time_not_a_disturbed_smallest_size(fake_doc, load_built):
    """The 4x H200 probe of 2026-11-22 timed 8 KB at 185 us and 1 MB at 37 us over 4 GPUs (its JSON is kept
    under benchmarks/results/2026-11-22-h200x4): alpha is the 1 MB figure, not the disturbed 8 KB one."""
    doc = fake_doc(4, "h200x4_nvswitch.txt", sockets=2)
    doc["nccl"]["seconds"]["4"].update({"8192": 184.75e-6, "1048576": 36.55e-6})
    profile = load_built(doc)
    assert profile.efficiency.allreduce_latency_s == pytest.approx(36.55e-6)
    assert "1 MB" in profile.provenance["efficiency.allreduce_latency_s"].note
    assert profile.efficiency.collective_host_overhead_s == Efficiency().collective_host_overhead_s  # no graph: prior


@pytest.mark.parametrize("eager_us, host_us", [(60.0, 60.0), (24.0, None)], ids=["host-bound", "device-bound"])
def test_graphed_allreduce_is_the_device_alpha_and_a_slower_eager_loop_the_host_cost(eager_us, host_us, fake_doc,
                                                                                     load_built):
    doc = fake_doc(2, "h200x2.txt")
    doc["nccl"]["seconds"]["2"].update({"8192": eager_us * 1e-6, "1048576": (eager_us + 4) * 1e-6})
    doc["nccl"]["graphed_seconds"] = {"2": {"8192": 20e-6, "1048576": 23e-6}}
    doc["nccl"]["graphed_calls"] = 20
    profile = load_built(doc)
    assert profile.efficiency.allreduce_latency_s == pytest.approx(20e-6)
    assert "CUDA graph" in profile.provenance["efficiency.allreduce_latency_s"].note
    if host_us is None:  # 24 us eager against 20 us graphed: within HOST_BOUND_RATIO, nothing says the host bound it
        assert profile.efficiency.collective_host_overhead_s == Efficiency().collective_host_overhead_s
        assert "efficiency.collective_host_overhead_s" not in profile.provenance
    else:
        assert profile.efficiency.collective_host_overhead_s == pytest.approx(host_us * 1e-6)
        assert profile.provenance["efficiency.collective_host_overhead_s"].source == "probed"


def test_decode_kernels_give_the_hbm_fraction_and_the_layers_fixed_device_time(fake_doc, load_built):
    doc = fake_doc(1, None)
    doc["kernels"] = {"gemv_shape": [28672, 8192], "gemv_bytes_s": 4.05e12, "tiny_kernels": 200,
                      "tiny_kernel_s": 2.4e-6}
    profile = load_built(doc)
    assert profile.efficiency.hbm == pytest.approx(4.05e12 / 4.26e12, rel=1e-3)  # of the probed device copy
    assert profile.efficiency.layer_device_overhead_s == pytest.approx(40 * 2.4e-6)
    assert "CUDA graph" in profile.provenance["efficiency.layer_device_overhead_s"].note
    doc["kernels"]["gemv_bytes_s"] = 4.5e12  # faster than the copy: the fraction is clipped, the note says so
    clipped = load_built(doc, name="probed-clipped")
    assert clipped.efficiency.hbm == 1.0 and "clipped" in clipped.provenance["efficiency.hbm"].note
    bare = load_built(fake_doc(1, None), name="probed-bare")  # not measured: the defaults stay
    assert bare.efficiency.hbm == Efficiency().hbm
    assert bare.efficiency.layer_device_overhead_s == Efficiency().layer_device_overhead_s


def test_timed_decoder_layers_give_hbm_fixed_layer_time_and_step_overhead(fake_doc, load_built):
    doc = fake_doc(1, None)
    shapes = []
    for model, layer_bytes, head_bytes in (("llama-3-8b", 436.2e6, 1050.7e6), ("llama-3-70b", 1711.3e6, 2101.3e6)):
        layer_s = 125e-6 + layer_bytes / 3.9e12
        step = {"2": 0.4e-3 + 2 * layer_s + head_bytes / 3.9e12}
        step["6"] = step["2"] + 4 * layer_s
        shapes.append({"model": model, "layer_bytes": layer_bytes, "head_bytes": head_bytes, "layer_s": layer_s,
                       "step_s": step})
    doc["kernels"] = {"gemv_shape": [28672, 8192], "gemv_bytes_s": 3.72e12, "tiny_kernels": 200,
                      "tiny_kernel_s": 1.06e-6,
                      "layers": {"counts": [2, 6], "prompt_len": 128, "gen_len": 32, "batch": 1, "shapes": shapes}}
    profile = load_built(doc)
    assert profile.efficiency.hbm == pytest.approx(3.9e12 / 4.26e12, rel=1e-3)  # the layers' rate, not the GEMV's
    assert profile.efficiency.layer_device_overhead_s == pytest.approx(125e-6, rel=1e-3)  # not 40 x 1.06 us
    assert profile.efficiency.graphed_step_overhead_s == pytest.approx(0.4e-3, rel=1e-3)
    assert profile.efficiency.step_overhead_s == Efficiency().step_overhead_s  # eager: not what a graph times
    note = profile.provenance["efficiency.layer_device_overhead_s"].note
    assert "llama-3-8b" in note and "graphed decode" in note and "a line through" in note
    doc["kernels"]["layers"]["shapes"] = shapes[:1]  # one shape: the GEMV's rate, the note says so
    one = load_built(doc, name="probed-one-shape")
    assert one.efficiency.hbm == pytest.approx(3.72e12 / 4.26e12, rel=1e-3)
    assert "the GEMV's read rate" in one.provenance["efficiency.hbm"].note


RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results"


@pytest.mark.parametrize("profile_name, probe_json", [
    ("h100-sxm-1gpu", "2026-12-05-h100-issue20/call2/h100-1gpu-probed.probe.json"),  # 2026-11-22's run13 before
    ("h200-2gpu", "2026-11-22-h200x4/run5-probe/h200-4gpu.probe.json"),  # the same H200 GPU
    ("h200-4gpu", "2026-11-22-h200x4/run5-probe/h200-4gpu.probe.json"),
])
def test_shipped_decode_figures_re_derive_from_the_kept_probe(profile_name, probe_json):
    """The profiles' hbm, layer_device_overhead_s and step_overhead_s are what the probe's layer timings give
    against each profile's own HBM ceiling (rounded as the profile writer rounds): traceable, not hand-tuned."""
    from hpi.executor.probe import layer_figures

    doc = json.loads((RESULTS / probe_json).read_text())
    profile = load_profile(profile_name)
    derived = layer_figures(doc["kernels"]["layers"], profile.gpu.hbm_bandwidth_bytes_s, doc["kernels"]["gemv_bytes_s"],
                             doc["date"])
    for name, figure in derived.items():
        assert getattr(profile.efficiency, name) == pytest.approx(figure["value"], rel=2e-3), name
        assert profile.provenance[f"efficiency.{name}"].source == "probed", name


@pytest.mark.parametrize("eager_layer_us, host_bound", [(1300.0, (True, False)), (140.0, (False, False)),
                                                       (1300.0, (True, True))], ids=["8b-bound", "none", "both"])
def test_eager_layers_give_the_host_time_a_layer_and_the_eager_step_overhead(eager_layer_us, host_bound, fake_doc,
                                                                            load_built):
    """Eager 8B decode on the H200 took 41-46 ms a step where the graphed step took 7 (issue 20): a host-bound
    eager layer's time is its host time (layer_overhead_s); a shape whose eager layer is within HOST_BOUND_RATIO of
    its graphed one says nothing about the host, and where no shape is host-bound the priors stay."""
    doc = fake_doc(1, None)
    shapes = []
    for (model, layer_bytes, head_bytes), bound in zip((("llama-3-8b", 436.2e6, 1050.7e6),
                                                         ("llama-3-70b", 1711.3e6, 2101.3e6)), host_bound):
        layer_s = 125e-6 + layer_bytes / 3.9e12
        eager_layer = eager_layer_us * 1e-6 if bound else 1.1 * layer_s
        step = {"2": 0.4e-3 + 2 * layer_s + head_bytes / 3.9e12}
        step["6"] = step["2"] + 4 * layer_s
        eager = {"2": 2.0e-3 + 2 * eager_layer + head_bytes / 3.9e12}
        eager["6"] = eager["2"] + 4 * eager_layer
        shapes.append({"model": model, "layer_bytes": layer_bytes, "head_bytes": head_bytes, "layer_s": layer_s,
                       "step_s": step, "eager_step_s": eager, "eager_layer_s": eager_layer})
    doc["kernels"] = {"gemv_shape": [28672, 8192], "gemv_bytes_s": 3.72e12, "tiny_kernels": 200,
                      "tiny_kernel_s": 1.06e-6,
                      "layers": {"counts": [2, 6], "prompt_len": 128, "gen_len": 32, "batch": 1, "shapes": shapes}}
    profile = load_built(doc)
    if not any(host_bound):
        assert profile.efficiency.layer_overhead_s == Efficiency().layer_overhead_s
        assert profile.efficiency.step_overhead_s == Efficiency().step_overhead_s
        assert "efficiency.layer_overhead_s" not in profile.provenance
        return
    assert profile.efficiency.layer_overhead_s == pytest.approx(eager_layer_us * 1e-6, rel=1e-3)
    assert profile.efficiency.step_overhead_s == pytest.approx(2.0e-3, rel=1e-3)
    note = profile.provenance["efficiency.layer_overhead_s"].note
    assert profile.provenance["efficiency.layer_overhead_s"].source == "probed"
    assert "llama-3-8b 1,300 us eager" in note and ("llama-3-70b" in note) == all(host_bound)
