"""explain: what binds a plan, what each one-knob change would do, and how to make an infeasible plan fit.

Uses the shipped hardware profiles (through topology and layout); skipped where those do not import.
"""

from __future__ import annotations

import pytest

pytest.importorskip("hpi.planner.ranks")
pytest.importorskip("hpi.planner.topology")
profiles = pytest.importorskip("hpi.planner.profiles")

from hpi.planner.catalog import load_model  # noqa: E402
from hpi.planner.explain import (  # noqa: E402
    bindings,
    fixes,
    knob_effects,
    knob_variants,
    memory_headroom,
    persistence_steps,
)
from hpi.planner.predict import predict  # noqa: E402
from hpi.planner.search import nvme_buffer_elems_for  # noqa: E402
from hpi.planner.specs.plan import Plan  # noqa: E402
from hpi.planner.specs.workload import Workload  # noqa: E402

WORKLOAD = Workload(512, 32)


def llama8b_matrix_weights(model) -> float:
    """Every quantized matrix of the model (embedding and head included): what one forward dequantizes."""
    h, f, kv = model.hidden_size, model.ffn_hidden_size, model.n_kv_heads * model.head_dim
    return model.n_layers * (2 * h * h + 2 * h * kv + 3 * h * f) + 2 * model.vocab_size * h


@pytest.fixture(scope="module")
def a6000():
    return profiles.load_profile("a6000-workstation")


@pytest.fixture(scope="module")
def h200x2():
    return profiles.load_profile("h200-2gpu")


@pytest.fixture(scope="module")
def llama8b():
    return load_model("llama-3-8b")


def binding(est, phase="decode"):
    return next(b for b in bindings(est) if b.phase == phase and b.resource != "bubble")


# ---- bindings ---------------------------------------------------------------------------------------


def test_cpu_offloaded_16_bit_decode_is_pcie_bound(a6000, llama8b) -> None:
    est = predict(llama8b, a6000, WORKLOAD, Plan(offload="cpu"))
    b = binding(est)
    assert b.resource == "PCIe"
    assert b.share > 0.8 and b.seconds == pytest.approx(est.decode_exposed["weight_fetch_s"])
    assert "host->device" in b.detail


def test_gpu_resident_bs1_decode_is_hbm_bound(a6000, llama8b) -> None:
    est = predict(llama8b, a6000, WORKLOAD, Plan())
    assert binding(est).resource == "HBM"
    assert binding(est, "prefill").resource == "compute"  # 512 tokens a forward: FLOP-bound GEMMs


def test_nvme_offload_on_a_slow_drive_is_nvme_bound(h200x2, llama8b) -> None:
    """h200-2gpu: a 1.28 GB/s disk against 55 GB/s pinned PCIe."""
    plan = Plan(offload="nvme", nvme_buffer_elems=nvme_buffer_elems_for(llama8b, 1, 1))
    est = predict(llama8b, h200x2, WORKLOAD, plan)
    assert est.feasible
    assert binding(est).resource == "NVMe"
    assert est.decode_link["nvme_s"] > est.decode_link["h2d_s"]


def test_kv_offload_at_large_batch_binds_on_the_kv_copy(a6000, llama8b) -> None:
    est = predict(llama8b, a6000, WORKLOAD, Plan(batch_size=64, kv_offload=True))
    assert binding(est).resource == "PCIe (KV cache)"


def test_a_one_micro_batch_pipeline_reports_its_bubble(h200x2, llama8b) -> None:
    est = predict(llama8b, h200x2, WORKLOAD, Plan(pp=2, batch_size=1))
    bubble = [b for b in bindings(est) if b.resource == "bubble"]
    assert {b.phase for b in bubble} >= {"decode"}
    for b in bubble:
        assert b.share > 0.2 and "micro-batches" in b.detail


def test_bindings_shares_are_of_their_phase(a6000, llama8b) -> None:
    est = predict(llama8b, a6000, WORKLOAD, Plan(offload="cpu", batch_size=8))
    for b in bindings(est):
        step = est.decode_step_s if b.phase == "decode" else est.prefill_s
        assert b.share == pytest.approx(b.seconds / step)
        assert 0 < b.share <= 1


# ---- knob effects -----------------------------------------------------------------------------------


def test_4_bit_weights_speed_up_a_pcie_bound_plan(a6000, llama8b, without_prefetch_lag) -> None:
    """fp16 compute: DeepSpeed's fused 4-bit kernel dequantizes cheaply on the compute stream, hidden behind the
    copies like the GEMMs, so the step shrinks by about the byte ratio; bf16 compute: its torch ops (17 HBM
    bytes per weight at 0.33 of the HBM rate, longer than the 4-bit copies they run beside) eat part of the
    saving."""
    fp16 = Workload(512, 32, compute_dtype="fp16")
    est = predict(llama8b, a6000, fp16, Plan(offload="cpu"))
    effects = {e.label: e for e in knob_effects(est)}
    four = effects["4-bit weights"]
    assert four.decode_ratio < 1
    fused = four.estimate.decode_exposed["dequant_s"]
    # half a byte in, the group's fp16 scale and minimum (4 bytes per 64), 2 bytes out (cost.dequant)
    assert fused == pytest.approx(llama8b_matrix_weights(llama8b) * (0.5 + 4 / 64 + 2) / (768e9 * 0.33), rel=0.01)
    # the byte ratio (the fused dequantization hides behind the copies), and a little more: the smaller leaf
    # copies of 4-bit weights no longer cover every leaf's ZeRO-3 hooks (cost.estimate.leaf_shares)
    least = (0.5 + 4 / 64) / 2
    assert least <= four.decode_ratio <= 1.2 * least
    assert four.throughput_ratio > 1
    assert four.estimate.plan == Plan(offload="cpu", weight_bits=4)
    bf16 = {e.label: e for e in knob_effects(predict(llama8b, a6000, WORKLOAD, Plan(offload="cpu")))}["4-bit weights"]
    dequant = bf16.estimate.decode_exposed["dequant_s"]
    assert dequant == pytest.approx(llama8b_matrix_weights(llama8b) * 17 / (768e9 * 0.33), rel=0.01)
    assert four.decode_ratio < bf16.decode_ratio < 1
    assert effects["8-bit weights"].decode_ratio > four.decode_ratio
    assert effects["pinned memory off"].decode_ratio > 1
    assert effects["offload none"].decode_ratio < 0.1
    assert effects["offload none"].gpu_delta_bytes > 10e9  # the weights move onto the GPU


def test_effects_are_predictions_of_the_variant_plan(a6000, llama8b) -> None:
    est = predict(llama8b, a6000, WORKLOAD, Plan(offload="cpu", batch_size=4))
    for e in knob_effects(est):
        again = predict(llama8b, a6000, WORKLOAD, e.estimate.plan)
        assert e.decode_ratio == pytest.approx(again.decode_step_s / est.decode_step_s)
        assert e.throughput_ratio == pytest.approx(again.throughput_tok_s / est.throughput_tok_s)
        assert e.gpu_delta_bytes == pytest.approx(again.gpu_peak_bytes - est.gpu_peak_bytes)


def test_variants_that_cannot_be_built_are_left_out(a6000, llama8b) -> None:
    """One GPU: no tp 2 or pp 2; tp 0 and batch 0 are not plans at all."""
    est = predict(llama8b, a6000, WORKLOAD, Plan(offload="cpu"))
    labels = {e.label for e in knob_effects(est)}
    assert not labels & {"tp 2", "tp 0", "pp 2", "pp 0", "batch 0"}
    assert {"batch 2", "4-bit weights", "offload none", "pinned memory off", "KV offload on"} <= labels


def test_a_4bit_persistence_step_persists_the_one_tensor_it_names(a6000, llama8b) -> None:
    """The suggested threshold holds the k/v projections and nothing more: one step persists exactly their stored
    bytes (2 x 32 layers x 4096 x 1024 weights at 0.5625 bytes), one element fewer persists nothing new."""
    m, plan = llama8b, Plan(offload="cpu", weight_bits=4)
    (step, _) = persistence_steps(plan, m)
    gpu = {t: predict(m, a6000, WORKLOAD, plan.with_(persistence_threshold_elems=t)).gpu_memory_parts
           for t in (plan.persistence_threshold_elems, step - 1, step)}
    held = {t: parts["persistent_weights"] for t, parts in gpu.items()}
    assert held[step - 1] == held[plan.persistence_threshold_elems]
    assert held[step] - held[step - 1] == pytest.approx(2 * 32 * 4096 * 1024 * 0.5625)


def test_variants_of_the_zero3_thresholds_and_nvme_buffers() -> None:
    m = load_model("llama-3-8b")
    cpu = dict(knob_variants(Plan(offload="cpu"), m))
    assert cpu["max live 4,000,000,000"].max_live_elems == 4_000_000_000 and "max live 250,000,000" in cpu
    # one step either side: the k/v projections (4096 x 1024) are the smallest tensors above 1e5, and 0
    assert persistence_steps(Plan(), m) == [4096 * 1024, 0]
    assert persistence_steps(Plan(persistence_threshold_elems=0), m) == [4096]  # the norms
    assert cpu["persistence threshold 4,194,304"].persistence_threshold_elems == 4096 * 1024
    # At 4 bits DeepSpeed counts a k/v projection as stored: 4096 x 1024 x (0.5 + 4/64) / 2 = 1,179,648 elements, so
    # the step is that; the next matrices above it (q and o, 4096 x 4096) count 4,718,592.
    assert persistence_steps(Plan(weight_bits=4), m) == [1_179_648, 0]
    assert persistence_steps(Plan(weight_bits=4, persistence_threshold_elems=1_179_648), m) == [4_718_592, 0]
    assert persistence_steps(Plan(weight_bits=8), m) == [4096 * 1024 * 17 // 32, 0]  # (1 + 4/64) / 2
    nvme = dict(knob_variants(Plan(offload="nvme", nvme_buffer_elems=128256 * 4096), m))
    assert {label for label in nvme if "NVMe buffer" in label} == {
        "2 NVMe buffers", "3 NVMe buffers", "10 NVMe buffers", f"NVMe buffer {2 * 128256 * 4096:,} elements"}
    assert not any(label.startswith("max live") for label in nvme)  # the swap buffers bound an NVMe plan's gathers
    assert not any("NVMe buffer" in label for label in cpu)
    # ZeRO-3 leaf granularity: the other one, where the plan gathers and not with NVMe (Plan.problems)
    assert cpu["ZeRO-3 leaves per layer"].zero3_leaf == "layer" and "ZeRO-3 leaves per layer" not in nvme
    layer = dict(knob_variants(Plan(offload="cpu", zero3_leaf="layer"), m))
    assert layer["ZeRO-3 leaves per module"].zero3_leaf == "module" and "offload nvme" not in layer


def test_knob_variants() -> None:
    offloaded = dict(knob_variants(Plan(offload="cpu", tp=2, pp=2, batch_size=4, micro_batches=2),
                                   load_model("llama-3-8b")))
    assert offloaded["batch 8"].batch_size == 8 and offloaded["batch 2"].batch_size == 2
    assert offloaded["tp 4"].tp == 4 and offloaded["tp 1"].tp == 1
    assert offloaded["pp 4"].pp == 4 and offloaded["pp 4"].micro_batches == 1
    assert offloaded["4 micro-batches"].micro_batches == 4
    assert offloaded["prefetch bucket 0"].prefetch_bucket_elems == 0
    assert offloaded["offload none"].offload == "none"
    for label, p in offloaded.items():
        assert p != Plan(offload="cpu", tp=2, pp=2, batch_size=4, micro_batches=2), label
    resident = dict(knob_variants(Plan(), load_model("llama-3-8b")))
    assert not any(label.startswith("prefetch bucket") for label in resident)  # nothing is gathered
    assert "batch 0" not in resident and "tp 0" not in resident and "pp 0" not in resident
    assert "pinned memory off" in resident and "KV offload on" in resident


# ---- fixes ------------------------------------------------------------------------------------------


def test_fixes_for_a_model_too_big_for_the_gpu(a6000) -> None:
    """OPT-30B at 16 bit (60 GB) on a 48 GB A6000."""
    est = predict(load_model("opt-30b"), a6000, WORKLOAD, Plan())
    assert not est.feasible and [r.kind for r in est.reasons] == ["gpu_memory"]
    proposed = fixes(knob_effects(est))
    labels = [f.label for f in proposed]
    assert labels and set(labels) <= {"offload cpu", "offload nvme", "8-bit weights", "4-bit weights"}
    assert "offload cpu" in labels or "4-bit weights" in labels
    assert all(f.estimate.feasible for f in proposed)
    assert [f.estimate.decode_step_s for f in proposed] == sorted(f.estimate.decode_step_s for f in proposed)
    assert len(fixes(knob_effects(est), k=1)) == 1


def test_nvme_offload_at_16_bit_is_refused_where_its_build_does_not_fit_in_host_memory(a6000) -> None:
    """OPT-175B is 350 GB at 16 bit: the executor builds a 16-bit stage in host memory before ZeRO-3 swaps it
    out to NVMe (cost.build), which the workstation's 227 GB cannot hold; at 4 bits DeepSpeed builds each
    module on the GPU and NVMe offload fits."""
    model = load_model("opt-175b")
    buffer = nvme_buffer_elems_for(model, 1, 1)
    nvme = predict(model, a6000, WORKLOAD, Plan(offload="nvme", nvme_buffer_elems=buffer))
    assert [r.kind for r in nvme.reasons] == ["build_memory"]
    assert nvme.build_transient_bytes == pytest.approx(model.params_total * 2, rel=0.01)
    assert "--quant-bits 8 or 4" in nvme.reasons[0].message
    four = predict(model, a6000, WORKLOAD, Plan(offload="nvme", weight_bits=4, nvme_buffer_elems=buffer))
    assert four.feasible and four.build_transient_bytes == 0.0


def test_fixes_lists_only_feasible_variants(a6000, llama8b) -> None:
    est = predict(llama8b, a6000, WORKLOAD, Plan(offload="cpu"))
    assert all(f.estimate.feasible for f in fixes(knob_effects(est), k=10))


# ---- memory headroom --------------------------------------------------------------------------------


def test_memory_headroom_tightest_first(a6000, llama8b) -> None:
    est = predict(llama8b, a6000, WORKLOAD, Plan(offload="cpu"))
    rows = memory_headroom(est)
    names = [r[0] for r in rows]
    assert set(names) == {"GPU memory", "CPU memory", "pinned memory"}
    ratios = [used / cap for _, used, cap in rows]
    assert ratios == sorted(ratios, reverse=True)
    pinned = dict((n, (u, c)) for n, u, c in rows)["pinned memory"]
    assert pinned == (est.pinned_bytes, a6000.host.pinnable_bytes)
    resident = memory_headroom(predict(llama8b, a6000, WORKLOAD, Plan()))
    assert [r[0] for r in resident][0] == "GPU memory" and "pinned memory" not in [r[0] for r in resident]


def test_explain_offers_cuda_graphs_where_the_plan_allows_them(h200x2, llama8b) -> None:
    """A resident TP plan decoding eagerly: 'CUDA graphs' is a predicted change (the same plan, the workload's
    decode_graphs on), faster than now; an offloaded plan or an already graphed workload gets no such row."""
    est = predict(llama8b, h200x2, WORKLOAD, Plan(tp=2))
    row = next(e for e in knob_effects(est) if e.label.startswith("CUDA graphs"))
    again = predict(llama8b, h200x2, Workload(WORKLOAD.prompt_len_tokens, WORKLOAD.gen_len_tokens, decode_graphs=True),
                    Plan(tp=2))
    assert row.estimate.decode_step_s == pytest.approx(again.decode_step_s)
    assert row.decode_ratio < 0.9 and row.estimate.plan == est.plan
    assert not any(e.label.startswith("CUDA graphs")
                   for e in knob_effects(predict(llama8b, h200x2, WORKLOAD, Plan(offload="cpu"))))
    assert not any(e.label.startswith("CUDA graphs") for e in knob_effects(again))
