"""benchmarks/compile_decode.py: its option-set syntax (strict, one line and exit 2 on bad input), the order of its
compiles, the budget, and a CPU run that compiles the decode step twice from scratch (a one-layer tiny Llama, fp32:
the compiled tokens are the eager ones; the CPU's C++ compile takes ~10 s each, so one option set here)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from hpi.executor import decode_attention as da
from tests.benchmarks.scripts import load

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _module():
    return load("compile_decode")


def _one_layer_llama(tmp_path) -> str:
    """tiny-llama's catalogue config cut to one layer and a 512-token vocabulary: the least a compile can be."""
    import hpi.planner.catalog as catalog

    config = json.loads((Path(catalog.__file__).parent / "models" / "tiny-llama.json").read_text())
    config.pop("_hpi")
    config.update(num_hidden_layers=1, vocab_size=512)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_option_sets_by_name_and_written_out():
    mod = _module()
    from hpi.executor.graphs import COMPILE_OPTIONS

    assert mod.parse(["--out", "x"]).option_sets == {"cdt-all-combo": COMPILE_OPTIONS}  # hpi run's own is the default
    sets = mod.parse_option_sets("cdt ; r3={coordinate_descent_tuning:true, coordinate_descent_search_radius:3};"
                                 "plain={}; gemm={max_autotune_gemm_backends:TRITON}")
    assert sets == {"cdt": {"coordinate_descent_tuning": True},
                    "r3": {"coordinate_descent_tuning": True, "coordinate_descent_search_radius": 3},
                    "plain": {}, "gemm": {"max_autotune_gemm_backends": "TRITON"}}
    assert mod.parse_option_sets("cdt-all;cdt-r2;cdt-maxpw;cdt-prof") == {
        "cdt-all": {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True},
        "cdt-r2": {"coordinate_descent_tuning": True, "coordinate_descent_search_radius": 2},
        "cdt-maxpw": {"coordinate_descent_tuning": True, "max_autotune_pointwise": True},
        "cdt-prof": {"coordinate_descent_tuning": True, "use_torch_profiler_benchmarker": True}}
    # every named set is made of settings this torch has
    assert all(k in torch._inductor.config.get_config_copy() for s in mod.OPTION_SETS.values() for k in s)


@pytest.mark.parametrize("text, fix", [
    ("fast", "not a named set"),
    ("x={coordinate_descent_tunin:true}", "check the spelling"),
    ("x={coordinate_descent_tuning:yes}", "coordinate_descent_tuning:true or coordinate_descent_tuning:false"),
    ("x={coordinate_descent_search_radius:2.5}", "takes an integer: write one, e.g. "
                                                 "coordinate_descent_search_radius:1"),
    ("x={use_experimental_benchmarker:false}", "set TORCHINDUCTOR_USE_EXPERIMENTAL_BENCHMARKER in the environment"),
    ("x={coordinate_descent_tuning}", "is not KEY:VALUE"),
    ("x={coordinate_descent_tuning:true,coordinate_descent_tuning:false}", "keep one"),
    ("cdt;cdt", "give each set its own name"),
    ("x=coordinate_descent_tuning:true", "between braces"),
    ("a b={}", "a set's name is"),
    (";", "names no set"),
])
def test_bad_option_sets_are_refused_in_one_line_with_exit_2(capsys, text, fix):
    with pytest.raises(SystemExit) as stop:
        _module().parse(["--out", "x", "--option-sets", text])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and fix in err
    assert err.startswith("compile_decode.py: --option-sets: ")


@pytest.mark.parametrize("args, fix", [(["--compiles", "0"], "--compiles 0 < 1"),
                                       (["--gen-len", "1"], "give at least 2"),
                                       (["--variants", "eager,eager"], "at most once"),
                                       (["--batches", "1,x"], "separated by commas"),
                                       (["--device", "cpu", "--profile", "p.txt"], "--device cpu")])
def test_bad_flags_are_refused_in_one_line_with_exit_2(capsys, args, fix):
    with pytest.raises(SystemExit) as stop:
        _module().parse(["--out", "x", *args])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and fix in err


def test_the_profiler_set_swaps_the_tunings_benchmarker_for_its_compile_only():
    """Inductor builds its benchmarker at import; cdt-prof's compile gets the profiler's, counted, then the old one
    is back. (On the CPU nothing tunes, so the swapped benchmarker is called here by hand.)"""
    pytest.importorskip("triton")
    mod = _module()
    from torch._inductor.runtime import benchmarking, triton_heuristics

    before = triton_heuristics.benchmarker
    with mod._benchmarker({"coordinate_descent_tuning": True}):
        assert triton_heuristics.benchmarker is before  # every other set: inductor's own
    count = mod._counts()["profiler_benchmarks"]
    with mod._benchmarker(mod.OPTION_SETS["cdt-prof"]):
        swapped = triton_heuristics.benchmarker
        assert isinstance(swapped, benchmarking.TorchProfilerBenchmarker) and swapped is not before
        assert swapped.benchmark(fn=lambda: None, device="cpu", warmup=1, rep=2) >= 0
    assert triton_heuristics.benchmarker is before and mod._counts()["profiler_benchmarks"] == count + 1


def test_compiles_go_round_by_round_over_the_sets():
    mod = _module()
    variants = mod.VARIANTS[:3]  # eager (the baseline), compiled_sdpa, compiled_split
    units = mod._units(variants, {"cdt": {}, "plain": {}}, 2)
    assert [(u, i) for u, _, _, _, i in units] == [
        ("compiled_sdpa@cdt", 1), ("compiled_sdpa@plain", 1), ("compiled_split@cdt", 1), ("compiled_split@plain", 1),
        ("compiled_sdpa@cdt", 2), ("compiled_sdpa@plain", 2), ("compiled_split@cdt", 2), ("compiled_split@plain", 2)]
    # sdpa, then hpi's split-KV attention; cuBLAS's products in both, no dependent launch, the mask inlined per layer
    walk = da.WALK  # hpi run's own walk in every variant but the other walks' ones
    K = mod.Kernels
    sdpa = K(split_kv=False, skinny=False, pdl=False, walk=walk, mask_once=False, one_launch=False)
    split = sdpa._replace(split_kv=True)
    assert [k for _, _, k, _, _ in units[:4]] == [sdpa, sdpa, split, split]
    # the dependent-launch, mask-once, one-launch and other-walk variants differ from compiled_skinny in that
    # switch alone
    kernels = dict((v[0], v[2]) for v in mod.VARIANTS)
    skinny = K(split_kv=True, skinny=True, pdl=False, walk=walk, mask_once=False, one_launch=False)
    assert kernels["compiled_skinny"] == skinny == mod.DEFAULT_KERNELS
    assert kernels["eager_skinny"] == skinny._replace(split_kv=False)
    assert kernels["compiled_skinny_pdl"] == skinny._replace(pdl=True)
    assert kernels["compiled_skinny_mask_once"] == skinny._replace(mask_once=True)
    assert kernels["compiled_skinny_one_launch"] == skinny._replace(one_launch=True)
    others = [w for w in da.WALKS if w != walk]
    assert len(others) == 3 and [kernels[f"compiled_skinny_{w}"] for w in others] == [
        skinny._replace(walk=w) for w in others]
    # an eager graph after the baseline runs once, whatever the sets and compiles
    swapped = (variants[2], variants[0])
    assert mod._units(swapped, {"cdt": {}, "plain": {}}, 3) == [
        ("eager", "eager", sdpa, None, 1)]


def test_a_spent_budget_starts_no_compile_and_lists_what_it_skipped(tmp_path):
    mod = _module()
    from hpi.executor import skinny_gemm
    from hpi.executor.decode_attention import _ENABLED

    config, stage = mod._stage(_one_layer_llama(tmp_path), torch.device("cpu"), torch.float32)
    row = mod.measure(stage, config.vocab_size, 2, 5, 3, 2, "cpu", variants=(mod.VARIANTS[4], mod.VARIANTS[2]),
                      option_sets={"cdt": {}, "plain": {}}, compiles=2, budget=mod.Budget(time.perf_counter() - 1))
    assert row["skipped"] == ["compiled_split@cdt#1", "compiled_split@plain#1", "compiled_split@cdt#2",
                              "compiled_split@plain#2"]
    assert row["runs"] == [] and row["units"] == {} and row["baseline_ms"] > 0 and row["timer"] == "perf_counter"
    assert row["positions"] == 3 and row["cache_slots"] == 8 and row["baseline"] == "eager_skinny"
    assert _ENABLED[0] is True and skinny_gemm._ENABLED[0] is True  # both switches put back
    assert row["failed"] == []


def test_the_budget_keeps_the_longest_run_so_far_in_hand():
    budget = _module().Budget(time.perf_counter() + 100)
    assert budget.allows()
    budget.spent(30.0)
    budget.spent(5.0)
    assert budget.longest_s == 30.0 and budget.allows()
    budget.spent(120.0)  # the next run, as long as this one, would end past the deadline
    assert not budget.allows() and _module().Budget(None).allows()


def test_a_failing_run_is_recorded_and_the_next_one_still_runs(tmp_path):
    mod = _module()
    config, stage = mod._stage(_one_layer_llama(tmp_path), torch.device("cpu"), torch.float32)
    seen = []
    eager, _, split = mod.VARIANTS[:3]
    row = mod.measure(stage, config.vocab_size, 1, 4, 3, 2, "cpu", variants=(eager, split, eager),
                      option_sets={"bad": {"no_such_option": True}}, report=seen.append)
    (failed,) = row["failed"]
    assert failed["unit"] == "compiled_split@bad" and failed["error"].startswith("RuntimeError: Unexpected "
                                                                                 "optimization option no_such_option")
    assert [e["unit"] for e in row["runs"]] == ["eager"] and row["runs"][0]["agree"] == 1.0
    assert list(row["units"]) == ["eager"] and [e["unit"] for e in seen] == ["compiled_split@bad", "eager"]


def test_cpu_run_compiles_twice_from_scratch_and_keeps_the_eager_tokens(tmp_path, capsys):
    out = tmp_path / "compile.json"
    assert _module().main(["--model", _one_layer_llama(tmp_path), "--device", "cpu", "--dtype", "fp32",
                           "--batches", "1", "--prompt-len", "6", "--gen-len", "3", "--replays", "2",
                           "--variants", "eager,compiled_split", "--compiles", "2", "--option-sets", "cdt",
                           "--reference", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["kind"] == "hpi.CompileDecode" and doc["compiles"] == 2
    assert doc["option_sets"] == {"cdt": {"coordinate_descent_tuning": True}}
    (row,) = doc["rows"]
    assert row["baseline"] == "eager" and row["baseline_ms"] > 0 and row["timer"] == "perf_counter"
    assert row["skipped"] == [] and row["hbm_limit_ms"] is None and row["device"] == "cpu"
    assert [(r["unit"], r["compile"]) for r in row["runs"]] == [("compiled_split@cdt", 1), ("compiled_split@cdt", 2)]
    for run in row["runs"]:
        assert run["ms"] > 0 and run["compile_s"] > 0
        assert run["agree"] == 1.0 and run["agree_vs_fp32"] == 1.0  # fp32 on the CPU: the eager tokens
        assert run["fxgraph_cache_hits"] == 0  # the second compile found nothing of the first
    unit = row["units"]["compiled_split@cdt"]
    ms = [r["ms"] for r in row["runs"]]
    assert unit["ms_per_compile"] == ms and unit["compiles"] == 2
    assert (unit["ms_min"], unit["ms_max"]) == (min(ms), max(ms))
    assert unit["ms_median"] == pytest.approx(sum(ms) / 2) and unit["spread"] == pytest.approx(max(ms) / min(ms))
    assert unit["median_over_baseline"] == pytest.approx(unit["ms_median"] / row["baseline_ms"])
    assert unit["agree_per_compile"] == [1.0, 1.0] and unit["agree_vs_fp32_per_compile"] == [1.0, 1.0]
    assert row["agree_baseline_vs_fp32"] == 1.0 and "partial" not in doc
    # the fp32 baseline is the reference itself: no rounding, so every position with a margin is decided
    assert row["margin_floor"] == 0.0 and row["floor_quantile"] == 0.99 and row["decided_share"] == 1.0
    assert row["baseline_decided"]["margin_error_q99"] == 0.0 and row["baseline_decided"]["agree_decided"] == 1.0
    for run in row["runs"]:
        assert run["agree_decided"] == 1.0 and run["agree_vs_fp32_decided"] == 1.0
        assert 0.0 <= run["margin_error_median"] <= run["margin_error_q99"] < 1e-3  # the compiler's fp32 reordering
    assert unit["agree_decided_per_compile"] == [1.0, 1.0] and unit["agree_vs_fp32_decided_per_compile"] == [1.0, 1.0]
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [p.get("compile") for p in printed[:2]] == [1, 2] and printed[-1]["skipped"] == 0


def test_a_bf16_baseline_sets_the_floor_and_agrees_with_fp32_wherever_fp32_decides(tmp_path):
    """bf16 on the CPU against the same weights in fp32: the floor is the baseline's own margin error (with fewer
    than 100 positions its 0.99 quantile is the largest), so no decided position can be one the baseline flips."""
    import copy

    mod = _module()
    config, stage = mod._stage(_one_layer_llama(tmp_path), torch.device("cpu"), torch.bfloat16)
    reference = copy.deepcopy(stage).float()
    row = mod.measure(stage, config.vocab_size, 4, 6, 12, 1, "cpu", variants=(mod.VARIANTS[0],),
                      reference=reference)
    assert row["margin_floor"] > 0.0 and row["margin_floor"] == row["baseline_decided"]["margin_error_q99"]
    assert 0.0 < row["decided_share"] < 1.0  # bf16 rounding makes near-ties of some of fp32's choices
    assert row["baseline_decided"]["agree_vs_fp32_decided"] == 1.0
    assert row["agree_baseline_vs_fp32"] <= 1.0 and row["runs"] == []
