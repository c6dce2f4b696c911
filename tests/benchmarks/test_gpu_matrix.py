"""benchmarks/gpu_matrix.py end to end on the CPU: the smoke matrix, variants unpacked into the bundle."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[2]


def test_smoke_matrix_on_cpu_bundles_every_record(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_matrix.py"), "--matrix", "smoke", "--device", "cpu",
         "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--prompt-len", "8", "--gen-len", "3"],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["errors"] == 0
    bundle = json.loads((tmp_path / "out" / "records.json").read_text())
    assert sorted(bundle) == ["tiny-cpu-offload", "tiny-cpu-offload@b4", "tiny-resident"]
    assert bundle["tiny-cpu-offload@b4"]["plan"]["batch_size"] == 4
    assert bundle["tiny-cpu-offload"]["plan"]["batch_size"] == 2
    for doc in bundle.values():
        assert doc["generated_tokens_per_sequence"] == 3
        assert doc["predicted"]["decode_step_s"] > 0  # predicted on the entry's profile
    assert bundle["tiny-cpu-offload"]["h2d"]["bytes_per_step"] > 0


def _gpu_matrix():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_matrix

    return gpu_matrix


def test_nvme_entry_gets_a_swap_buffer_that_holds_the_largest_tensor():
    gm = _gpu_matrix()
    entry = next(e for e in gm.matrices()["h100"] if e.name == "8b-nvme-b1")
    plan = gm.entry_plan(entry)
    # llama-3-8b's embedding is 128256 x 4096 = 525,336,576 elements, over DeepSpeed's 1e8 default
    assert plan.nvme_buffer_elems == 128256 * 4096
    cpu = gm.entry_plan(next(e for e in gm.matrices()["h100"] if e.name == "8b-cpu-pinned-tuned-b1"))
    assert cpu.nvme_buffer_elems == 100_000_000  # untouched where nothing is swapped


def test_infeasible_entry_is_refused_before_launch_with_its_reasons():
    gm = _gpu_matrix()
    from hpi.planner.specs.workload import Workload

    entry = gm.Entry("70b-resident-on-h100", "llama-3-70b", "h100-sxm-1gpu", 1, {})
    with pytest.raises(RuntimeError, match="infeasible: .*GPU"):
        gm.refuse_infeasible(entry, gm.entry_plan(entry), Workload(512, 32))
    small = gm.Entry("8b-resident", "llama-3-8b", "h100-sxm-1gpu", 1, {})
    gm.refuse_infeasible(small, gm.entry_plan(small), Workload(512, 32))  # fits: no error


def test_ds_examples_entries_take_the_one_preset():
    from hpi.planner.specs.plan import ds_examples_knobs

    assert _gpu_matrix()._ds_examples_knobs("llama-3-8b") == ds_examples_knobs(4096)


def test_aio_matrix_compares_five_aio_settings_and_the_planner_picks_from_the_grid(tmp_path):
    """DeepSpeed's defaults, hpi's fixed settings, the planner's pick, one thread of 4 and of 8 MiB blocks: each
    feasible on the H200 at its workload; the pick follows the drive's read grid (here: a drive that wants 4 MiB
    requests, 64 in flight)."""
    import yaml

    from hpi.planner.specs.workload import Workload

    gm = _gpu_matrix()
    entries = gm.matrices()["aio-h200"]
    workload = Workload(entries[0].prompt_len, entries[0].gen_len)
    plans = [gm.entry_plan(e, workload) for e in entries]
    for entry, plan in zip(entries, plans):
        gm.refuse_infeasible(entry, plan, workload)
    assert [(p.aio_block_size_bytes, p.aio_queue_depth, p.aio_threads) for p in plans] == [
        # the pick on h200-1gpu's grid of 2026-12-03: 4 MiB with 8 threads that day; 8 MiB with one thread since one
        # thread reads at the grid's rate and eight at 0.8 of it (hpi.planner.cost.aio.aio_read_efficiency)
        (1 << 20, 8, 1), (1 << 20, 64, 8), (8 << 20, 64, 1),
        (4 << 20, 8, 1), (8 << 20, 8, 1)]
    raw = yaml.safe_load((REPO / "hardware_profiles" / "h200-1gpu.yaml").read_text())
    raw["name"] = "h200-grid"
    raw["nvme"]["read_grid"] = {"source": "assumed", "note": "test", "points": [
        [1 << 20, 1, 0.9e9], [1 << 20, 64, 2.0e9], [4 << 20, 1, 1.5e9], [4 << 20, 64, 3.0e9]]}
    (tmp_path / "h200-grid.yaml").write_text(yaml.safe_dump(raw))
    picked = gm.Entry(**{**entries[2].__dict__, "hardware": str(tmp_path / "h200-grid.yaml")})
    plan = gm.entry_plan(picked, workload)
    assert (plan.aio_block_size_bytes, plan.aio_queue_depth) == (4 << 20, 64)
    gm.refuse_infeasible(picked, plan, workload)


def test_moe_leaf_matrix_measures_the_layer_bucket_the_search_offers():
    """The last moe-leaf row runs the bucket and max live hpi's search adds for Mixtral-8x22B's 4-bit layer leaves
    (search.with_layer_buckets), which the planner ranks first among CPU-offload plans on one H200."""
    from hpi.planner.catalog import load_model
    from hpi.planner.profiles import load_profile
    from hpi.planner.search import SearchSpace, search
    from hpi.planner.specs.workload import Workload

    gm = _gpu_matrix()
    entry = gm.matrices()["moe-leaf-h200"][-1]
    space = SearchSpace(offloads=("cpu",), weight_bits=(4,), batch_sizes=(1,), pin_memory=(True,))
    result = search(load_model("mixtral-8x22b"), load_profile("h200-1gpu"),
                    Workload(entry.prompt_len, entry.gen_len), space)
    best = result.plan(int(result.ranked("latency")[0]))
    assert best.zero3_leaf == "layer" and entry.plan["zero3_leaf"] == "layer"
    assert {k: getattr(best, k) for k in gm.MIXTRAL_Q4_LAYER_BUCKET} == gm.MIXTRAL_Q4_LAYER_BUCKET
    assert {k: entry.plan[k] for k in gm.MIXTRAL_Q4_LAYER_BUCKET} == gm.MIXTRAL_Q4_LAYER_BUCKET


def test_moe_leaf_matrix_pairs_the_two_leaf_settings_of_one_feasible_stream():
    """Mixtral-8x22B at 4 bits streamed from pinned memory with per-module hooks and with layer leaves: the same plan
    but for the leaf, each feasible on one H200. At DeepSpeed's 5e7 bucket the layer leaves are predicted faster at
    batch 1 and 16, by 0.7% (an H100 measured them 5-7% slower: README's Known limits); at 3e9, where a layer fits
    the bucket, predicted faster as the H200 measured."""
    from hpi.planner.catalog import load_model
    from hpi.planner.predict import predict
    from hpi.planner.profiles import load_profile
    from hpi.planner.specs.workload import Workload

    gm = _gpu_matrix()
    entries = gm.matrices()["moe-leaf-h200"][:2]
    workload = Workload(entries[0].prompt_len, entries[0].gen_len, fused_dequant=True)
    plans = [gm.entry_plan(e, workload) for e in entries]
    assert [p.zero3_leaf for p in plans] == ["module", "layer"]
    assert dataclasses.replace(plans[0], zero3_leaf="layer") == plans[1]
    model, hardware = load_model("mixtral-8x22b"), load_profile("h200-1gpu")
    for batch in (1, 16):
        module, layer = (predict(model, hardware, workload, dataclasses.replace(p, batch_size=batch)) for p in plans)
        assert module.feasible and layer.feasible
        assert layer.decode_step_s < module.decode_step_s
    module, layer = (gm.entry_plan(e, workload) for e in gm.matrices()["moe-leaf-h200"][2:4])
    assert dataclasses.replace(module, zero3_leaf="layer") == layer and layer.prefetch_bucket_elems == 3 * 10**9
    for batch in (1, 16):
        ahead = predict(model, hardware, workload, dataclasses.replace(layer, batch_size=batch))
        per_module = predict(model, hardware, workload, dataclasses.replace(plans[0], batch_size=batch))
        assert ahead.feasible and ahead.decode_step_s < per_module.decode_step_s


def test_skinny_matrix_measures_each_step_with_and_without_the_stacked_products_on_one_build():
    """The side by side cost.overhead.skinny_saving is fitted from: at batch 1 and 16, the graphed and the compiled
    step each with torch's products and with hpi's, all variants of one 8B build that a spec accepts."""
    from hpi.executor.spec import RunSpec

    gm = _gpu_matrix()
    (entry,) = gm.matrices()["skinny"]
    spec = RunSpec(plan=gm.entry_plan(entry), model=entry.model, variants=entry.variants)
    steps = [(m.plan.batch_size, m.decode_compile, m.skinny_gemm) for m in spec.measurements()[1:]]
    assert steps == [(b, c, s) for b in (1, 16) for c in (False, True) for s in (False, True)]
    assert all(m.decode_graphs for m in spec.measurements()[1:])
