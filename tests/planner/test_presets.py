"""presets: Latency / Balanced / Throughput chosen by their definitions, explained, with expert overrides whose
predicted effects are the cost model's own, the profile's provenance, and confirmation by a kept run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hpi.planner.catalog import load_model
from hpi.planner.predict import predict
from hpi.planner.presets import (
    BALANCED_DECODE_BOUND,
    GRAPHS_CONDITION,
    KNOB_NOTES,
    PRESET_NAMES,
    PresetError,
    choose,
    knob_of,
    preset_space,
    select_presets,
    valid_values,
)
from hpi.planner.profiles import load_profile, profile_from_text, profile_names
from hpi.planner.search import candidate_arrangements, nvme_buffer_elems_for, search
from hpi.planner.specs.knob import knob_fields
from hpi.planner.specs.plan import Plan
from hpi.planner.specs.workload import Workload
from hpi.record_files import load_records
from hpi.records import DecodeSteps, RunRecord, Timings

WORKLOAD = Workload(512, 32)
MODELS = ("llama-3-8b", "llama-3-70b", "mixtral-8x7b")  # 8B, 70B and a mixture of experts
@pytest.mark.parametrize("hardware", profile_names())
@pytest.mark.parametrize("model", MODELS)
def test_every_profile_and_model_gets_three_ordered_presets(hardware, model):
    s = select_presets(load_model(model), load_profile(hardware), WORKLOAD, concurrency=16)
    lat, bal, thr = (s.named(n).estimate for n in PRESET_NAMES)
    assert [p.name for p in s.presets] == list(PRESET_NAMES)
    assert all(e.feasible for e in (lat, bal, thr))
    assert lat.plan.batch_size == 1
    assert lat.decode_step_s <= bal.decode_step_s <= BALANCED_DECODE_BOUND * lat.decode_step_s
    assert thr.throughput_tok_s >= max(lat.throughput_tok_s, bal.throughput_tok_s)
    assert max(e.plan.batch_size for e in (lat, bal, thr)) <= 16


def test_70b_on_wsl2_fits_its_pinned_memory_with_three_nvme_buffers():
    """DeepSpeed pins its NVMe swap buffers whatever pin_memory says (partitioned_param_swapper.py
    ``_configure_aio``: ``new_cpu_locked_tensor``), each holding the largest partition, the 1,050,673,152-element
    embedding: 5 buffers (its default) pin 10.5 GB > WSL2's 8 GB, and pageable CPU offload overflows the 28.8 GB
    the VM may use. 3 buffers (one module being read, one copied, one computed: every Llama module swaps one
    partition) pin 6.3 GB at the same predicted times."""
    model, hw = load_model("llama-3-70b"), load_profile("rtx4090-wsl2")
    s = select_presets(model, hw, WORKLOAD, concurrency=16)
    buffer = nvme_buffer_elems_for(model, 1, 1)
    assert buffer == 128256 * 8192
    for p in s.presets:
        e = p.estimate
        assert (p.plan.offload, p.plan.nvme_buffer_count, p.plan.nvme_buffer_elems) == ("nvme", 3, buffer)
        assert e.feasible and e.pinned_bytes <= hw.host.pinnable_bytes < 5 * buffer * 2
        assert e.pinned_bytes >= 3 * buffer * 2 and e.cpu_bytes <= hw.usable_dram_bytes
        default = predict(model, hw, WORKLOAD, p.plan.with_(nvme_buffer_count=5))
        assert not default.feasible and {r.kind for r in default.reasons} == {"pinned_memory"}
        assert (default.decode_step_s, default.ttft_s) == (e.decode_step_s, e.ttft_s)


def test_a_machine_where_nothing_fits_at_batch_1_says_so_and_points_to_hpi_plan():
    # 4 GB pinnable holds one 2.1 GB swap buffer of the 70B, not the 3 that overlap reads, copies and compute
    path = Path(__file__).resolve().parents[2] / "src/planner/hardware_profiles/rtx4090-wsl2.yaml"
    hw = profile_from_text(path.read_text().replace("value: 8.0e9", "value: 4.0e9"), "rtx4090-wsl2.yaml")
    assert hw.host.pinnable_bytes == 4e9
    with pytest.raises(PresetError, match="no feasible plan of llama-3-70b on rtx4090-wsl2 at batch 1 .*hpi plan"):
        select_presets(load_model("llama-3-70b"), hw, WORKLOAD, concurrency=16)


def test_choices_follow_the_definitions_over_the_whole_search():
    model, hw = load_model("llama-3-8b"), load_profile("h200-2gpu")
    result = search(model, hw, WORKLOAD, preset_space(hw, 16))
    chosen = {name: flat for name, (flat, _) in choose(result).items()}
    f = result.feasible
    # latency: nothing feasible at batch 1 decodes faster
    assert result.batch_size[chosen["latency"]] == 1
    assert result.decode_step_s[chosen["latency"]] == result.decode_step_s[f & (result.batch_size == 1)].min()
    assert result.plan(chosen["latency"]) == result.plan(result.ranked("latency", batch_size=1)[0])
    # throughput: nothing feasible generates more tokens per second
    assert result.throughput_tok_s[chosen["throughput"]] == result.throughput_tok_s[f].max()
    # balanced: nothing within the decode bound generates more
    floor = result.decode_step_s[chosen["latency"]]
    within = f & (result.decode_step_s >= floor) & (result.decode_step_s <= 2 * floor)
    assert result.throughput_tok_s[chosen["balanced"]] == result.throughput_tok_s[within].max()
    # and on this machine the three differ: the bound binds (Throughput's own step is more than 2x Latency's or
    # Balanced is Throughput; either way Balanced beats Latency's tokens/s at batch > 1)
    assert result.batch_size[chosen["balanced"]] > 1
    assert result.throughput_tok_s[chosen["balanced"]] > 5 * result.throughput_tok_s[chosen["latency"]]


def test_concurrency_one_gives_batch_one_everywhere_and_zero_is_refused():
    s = select_presets(load_model("llama-3-8b"), load_profile("a6000-workstation"), WORKLOAD, concurrency=1)
    assert {p.plan.batch_size for p in s.presets} == {1}
    with pytest.raises(PresetError, match="concurrency 0 must be >= 1"):
        select_presets(load_model("llama-3-8b"), load_profile("a6000-workstation"), WORKLOAD, concurrency=0)


def test_concurrency_that_is_not_a_power_of_two_is_searched():
    space = preset_space(load_profile("a6000-workstation"), 12)
    assert space.batch_sizes == (1, 2, 4, 8, 12)


def test_native_windows_presets_never_offload_to_nvme():
    path = Path(__file__).resolve().parents[2] / "src/planner/hardware_profiles/rtx4090-wsl2.yaml"
    yaml_text = path.read_text().replace("os: wsl2", "os: windows").replace("name: rtx4090-wsl2", "name: rtx4090-win")
    hw = profile_from_text(yaml_text, "rtx4090-win.yaml")
    assert hw.os == "windows" and hw.has_nvme
    assert "nvme" not in preset_space(hw, 4).offloads
    s = select_presets(load_model("llama-3-8b"), hw, WORKLOAD, concurrency=4)
    assert all(p.plan.offload != "nvme" for p in s.presets)
    offload = next(o for o in s.named("latency").overrides if o.knob == "offload")
    assert offload.valid == {"choices": ["none", "cpu"]}


@pytest.fixture(scope="module")
def a6000_70b():
    return select_presets(load_model("llama-3-70b"), load_profile("a6000-workstation"), WORKLOAD, concurrency=16)


def test_overrides_cover_every_knob_with_its_valid_values(a6000_70b):
    model, hw = load_model("llama-3-70b"), load_profile("a6000-workstation")
    for preset in a6000_70b.presets:
        by_knob = {o.knob: o for o in preset.overrides}
        assert [k.name for k in knob_fields(Plan)] == [k for k in by_knob if k != GRAPHS_CONDITION]
        arrangements = candidate_arrangements(model, hw, preset_space(hw, 16))
        assert by_knob["tp"].valid == {"choices": sorted({a[0] for a in arrangements})}
        assert by_knob["pp"].valid == {"choices": sorted({a[1] for a in arrangements})}
        assert by_knob["offload"].valid == {"choices": ["none", "cpu", "nvme"]}  # the workstation has an NVMe
        assert by_knob["nvme_buffer_elems"].valid == {"minimum": nvme_buffer_elems_for(model, preset.plan.tp,
                                                                                      preset.plan.dp)}
        assert by_knob["batch_size"].valid == {"minimum": 1}
        for o in preset.overrides:
            assert o.value == getattr(preset.plan, o.knob, preset.estimate.workload.decode_graphs)


def test_override_effects_are_the_cost_models_predictions(a6000_70b):
    preset = a6000_70b.named("balanced")
    model, hw = load_model("llama-3-70b"), load_profile("a6000-workstation")
    seen = 0
    for o in preset.overrides:
        for e in o.effects:
            if o.knob == GRAPHS_CONDITION:
                continue
            assert knob_of(preset.plan, e.estimate.plan) == o.knob
            again = predict(model, hw, WORKLOAD, e.estimate.plan)
            assert again.decode_step_s == pytest.approx(e.estimate.decode_step_s)
            assert e.decode_ratio == pytest.approx(again.decode_step_s / preset.estimate.decode_step_s)
            assert e.throughput_ratio == pytest.approx(again.throughput_tok_s / preset.estimate.throughput_tok_s)
            seen += 1
    assert seen >= 8  # batch, bits, offload, pinning, KV offload, ... each predicted
    weight_bits = next(o for o in preset.overrides if o.knob == "weight_bits")
    assert {e.estimate.plan.weight_bits for e in weight_bits.effects} == {16, 8, 4} - {preset.plan.weight_bits}


def test_zero3_and_nvme_overrides_are_priced_or_say_why_not():
    """The ZeRO-3 thresholds and NVMe buffer knobs of an NVMe preset: each change predicted by the cost model (memory
    per tier, and the buffer count's overlap), or a note that says the model does not price it."""
    model, hw = load_model("llama-3-70b"), load_profile("rtx4090-wsl2")
    preset = select_presets(model, hw, WORKLOAD, concurrency=16).named("latency")
    by_knob = {o.knob: o for o in preset.overrides}
    buffer_bytes = preset.plan.nvme_buffer_elems * 2
    for knob in ("prefetch_bucket_elems", "persistence_threshold_elems", "nvme_buffer_count", "nvme_buffer_elems"):
        o = by_knob[knob]
        assert o.applies and o.effects and o.note.startswith(KNOB_NOTES[knob])
        for e in o.effects:
            again = predict(model, hw, WORKLOAD, e.estimate.plan)
            assert (again.pinned_bytes, again.gpu_peak_bytes) == (e.estimate.pinned_bytes, e.estimate.gpu_peak_bytes)
            assert again.decode_step_s == pytest.approx(e.estimate.decode_step_s)
    counts = {e.estimate.plan.nvme_buffer_count: e for e in by_knob["nvme_buffer_count"].effects}
    assert sorted(counts) == [2, 5, 6]  # the searched counts and twice the preset's 3
    assert counts[2].decode_ratio > 1 and counts[5].decode_ratio == 1  # 2: reads wait for copies
    assert counts[5].estimate.pinned_bytes - preset.estimate.pinned_bytes == pytest.approx(2 * buffer_bytes)
    assert not counts[5].estimate.feasible  # 10.5 GB pinned > 8 GB
    assert by_knob["nvme_buffer_count"].valid == {"minimum": 1}  # every Llama module swaps in one partition
    persist = {e.estimate.plan.persistence_threshold_elems: e for e in by_knob["persistence_threshold_elems"].effects}
    # the k/v projections are the next tensors up, at 4 bits 1024 x 8192 x (0.5 + 4/64) / 2 stored elements
    kv = 1024 * 8192 * 9 // 32
    assert sorted(persist) == [0, kv]
    assert persist[kv].estimate.gpu_peak_bytes > preset.estimate.gpu_peak_bytes
    # max live does not bound an NVMe plan's gathers in the cost model: no effect, and the note says so
    live = by_knob["max_live_elems"]
    assert live.applies and not live.effects and "does not price it here" in live.note
    # a knob that changes nothing in this plan shows no effect
    pin = by_knob["pin_memory"]
    assert not pin.applies and not pin.effects and "changes nothing in this plan" in pin.note
    for o in preset.overrides:
        assert o.note.startswith(KNOB_NOTES[o.knob]) and (o.effects or "no effect is predicted" in o.note
                                                           or "No other value is valid" in o.note)


def test_knob_of_names_the_leading_change_not_its_followers():
    base = Plan(tp=1, pp=2, batch_size=4, micro_batches=2)
    assert knob_of(base, base.with_(pp=4, micro_batches=1)) == "pp"
    assert knob_of(base, base.with_(batch_size=8)) == "batch_size"
    assert knob_of(base, base.with_(micro_batches=4)) == "micro_batches"
    assert knob_of(base, base.with_(offload="nvme", nvme_buffer_elems=200_000_000)) == "offload"
    assert knob_of(base, base) == GRAPHS_CONDITION


def test_valid_micro_batches_divide_the_batch_per_replica():
    model, hw = load_model("llama-3-8b"), load_profile("h200-2gpu")
    plan = Plan(pp=2, batch_size=12, micro_batches=2)
    assert valid_values(model, hw, plan, preset_space(hw, 16))["micro_batches"] == {"choices": [1, 2, 3, 4, 6, 12]}
    assert valid_values(model, hw, Plan(), preset_space(hw, 16))["micro_batches"] == {"choices": [1]}


def test_reasons_name_the_criterion_and_what_binds(a6000_70b):
    lat, bal, thr = (a6000_70b.named(n) for n in PRESET_NAMES)
    assert lat.reason.startswith("lowest decode step at batch 1 (")
    assert "within 2x Latency's" in bal.reason and f"batch {bal.plan.batch_size}" in bal.reason
    assert thr.reason.startswith("highest throughput (")
    assert all("decode binds on " in p.reason for p in a6000_70b.presets)


def test_provenance_counts_every_field_of_the_profile(a6000_70b):
    doc = a6000_70b.to_dict()["provenance"]
    hw = load_profile("a6000-workstation")
    assert sum(doc["sources"].values()) == len(hw.provenance) == len(doc["fields"])
    assert doc["calibrated"] == ("calibrated" in doc["sources"])
    assert set(doc["sources"]) <= {"datasheet", "probed", "measured", "published", "calibrated", "assumed"}


def _record(plan: Plan, *, hardware="a6000-workstation", model="llama-3-70b", prompt=512, gen=32, simulated=False):
    return RunRecord(spec={"model": model, "hardware": hardware,
                           "workload": {"prompt_len_tokens": prompt, "gen_len_tokens": gen}},
                     plan=plan.to_dict(), hardware=hardware, simulated=simulated,
                     timings=Timings(ttft_s=0.9, decode_step_s=DecodeSteps(2.5, 2.7, 2.55), throughput_tok_s=0.4))


def test_a_kept_run_of_the_same_plan_confirms_the_preset(tmp_path):
    model, hw = load_model("llama-3-70b"), load_profile("a6000-workstation")
    plan = select_presets(model, hw, WORKLOAD).named("latency").plan
    (tmp_path / "run.json").write_text(json.dumps(_record(plan).to_json()))
    s = select_presets(model, hw, WORKLOAD, records=load_records(tmp_path))
    c = s.named("latency").confirmation
    assert s.named("latency").status == "confirmed by a run"
    assert (c.record_id, c.decode_step_s, c.ttft_s, c.throughput_tok_s) == ("run", 2.5, 0.9, 0.4)
    assert c.path == str(tmp_path / "run.json")


@pytest.mark.parametrize("change", [
    {"simulated": True}, {"hardware": "h200-2gpu"}, {"model": "llama-2-70b"}, {"gen": 64}, {"other_plan": True},
])
def test_runs_that_differ_confirm_nothing(change):
    model, hw = load_model("llama-3-70b"), load_profile("a6000-workstation")
    plan = select_presets(model, hw, WORKLOAD).named("latency").plan
    if change.pop("other_plan", False):
        plan = plan.with_(pin_memory=not plan.pin_memory, offload="cpu")
    s = select_presets(model, hw, WORKLOAD, records=[_record(plan, **change)])
    assert all(p.confirmation is None and p.status == "predicted only" for p in s.presets)


def test_document_is_plain_json_with_kind_and_version(a6000_70b):
    doc = json.loads(json.dumps(a6000_70b.to_dict()))
    assert (doc["kind"], doc["version"]) == ("hpi.Presets", 1)
    assert [p["name"] for p in doc["presets"]] == list(PRESET_NAMES)
    assert doc["workload"] == {"prompt_len_tokens": 512, "gen_len_tokens": 32, "concurrency": 16, "serving": False}
    lat = doc["presets"][0]
    assert Plan.from_dict(lat["plan"]) == a6000_70b.named("latency").plan
    assert lat["predicted"]["decode_step_s"] == a6000_70b.named("latency").estimate.decode_step_s
    assert np.isfinite([p["predicted"]["throughput_tok_s"] for p in doc["presets"]]).all()


def test_templates_are_the_fastest_plan_of_each_layout_and_offload():
    from hpi.planner.presets import template_offloads, templates

    model, hw = load_model("llama-3-8b"), load_profile("h200-2gpu")
    found = templates(model, hw, WORKLOAD)
    assert [(t.tp, t.pp, t.offload) for t in found] == [
        (tp, pp, o) for tp, pp in ((1, 1), (1, 2), (2, 1)) for o in ("cpu", "nvme")]
    for t in found:
        est = t.estimate
        assert est.feasible and (est.plan.tp, est.plan.pp, est.plan.dp, est.plan.offload) == (t.tp, t.pp, 1, t.offload)
        assert est.plan.batch_size == 1
        same_layout = search(model, hw, WORKLOAD, preset_space(hw, 1).restrict(tp=t.tp, pp=t.pp, dp=1,
                                                                             offloads=t.offload))
        ok = same_layout.feasible & (same_layout.batch_size == 1)
        assert est.decode_step_s == pytest.approx(same_layout.decode_step_s[ok].min())
    assert found[0].file_name == "deepspeed_zero3_tp1_pp1_cpu.json"
    win = profile_from_text(
        (Path(__file__).resolve().parents[2] / "src/planner/hardware_profiles/h200-2gpu.yaml").read_text()
        .replace("os: linux", "os: windows"), "h200-2gpu.yaml")
    assert template_offloads(win) == ("cpu",) and template_offloads(hw) == ("cpu", "nvme")


def test_a_layout_nothing_fits_says_why():
    from hpi.planner.presets import templates

    found = templates(load_model("llama-3-70b"), load_profile("rtx4090-wsl2"), WORKLOAD)
    assert [(t.offload, t.estimate is None) for t in found] == [("cpu", True), ("nvme", False)]
    cpu = next(t for t in found if t.offload == "cpu")
    assert cpu.why_not.startswith("CPU memory ") and "usable per node" in cpu.why_not
    nvme = next(t for t in found if t.offload == "nvme")  # with 3 swap buffers (test_70b_on_wsl2_fits...)
    assert nvme.estimate.feasible and nvme.estimate.plan.nvme_buffer_count == 3


@pytest.mark.parametrize("model", ["llama-3-8b", "llama-3-70b", "mixtral-8x7b"])
def test_wsl2_presets_stay_within_its_pinnable_memory(model):
    hw = load_profile("rtx4090-wsl2")
    assert hw.os == "wsl2" and hw.host.pinnable_bytes == 8e9  # WSL2's pinned-memory limit, as the profile states it
    s = select_presets(load_model(model), hw, WORKLOAD, concurrency=64)
    for p in s.presets:
        assert 0 <= p.estimate.pinned_bytes <= hw.host.pinnable_bytes
        assert p.estimate.cpu_bytes <= hw.usable_dram_bytes


@pytest.mark.parametrize("simulated", [False, True])
def test_an_autotune_trial_confirms_only_when_it_ran_for_real(tmp_path, simulated):
    model, hw = load_model("llama-3-70b"), load_profile("a6000-workstation")
    plan = select_presets(model, hw, WORKLOAD).named("latency").plan
    trial = {"kind": "hpi.AutotuneTrial", "record": _record(plan, simulated=simulated).to_json()}
    (tmp_path / "trial-3.json").write_text(json.dumps(trial))
    confirmed = select_presets(model, hw, WORKLOAD, records=load_records(tmp_path)).named("latency").confirmation
    assert (confirmed is None) == simulated
    if not simulated:
        assert confirmed.record_id == "trial-3" and confirmed.decode_step_s == 2.5
