"""search: candidate layouts, the knob grid, ranking by objective, the Pareto front, infeasible counts.

Runs on the shipped hardware profiles through the topology and layout code; skipped where those do not
import.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("hpi.planner.ranks")
pytest.importorskip("hpi.planner.topology")
profiles = pytest.importorskip("hpi.planner.profiles")

from hpi.planner.catalog import load_model  # noqa: E402
from hpi.planner.feasibility import arrangement_problems, capacity_masks  # noqa: E402
from hpi.planner.predict import predict  # noqa: E402
from hpi.planner.search import (  # noqa: E402
    DEFAULT_BATCHES,
    SearchSpace,
    _degrees,
    candidate_arrangements,
    nvme_buffer_counts_for,
    nvme_buffer_elems_for,
    prefetch_buckets,
    search,
)
from hpi.planner.specs.plan import DEEPSPEED_DEFAULT_PREFETCH_ELEMS  # noqa: E402
from hpi.planner.specs.workload import Workload  # noqa: E402

WORKLOAD = Workload(512, 32)


@pytest.fixture(scope="module")
def a6000():
    return profiles.load_profile("a6000-workstation")


@pytest.fixture(scope="module")
def llama8b_on_a6000(a6000):
    return search(load_model("llama-3-8b"), a6000, WORKLOAD)


@pytest.fixture(scope="module")
def opt30b_on_a6000(a6000):
    return search(load_model("opt-30b"), a6000, WORKLOAD)


@pytest.fixture(scope="module")
def llama8b_on_4gpu():
    return search(load_model("llama-3-8b"), profiles.load_profile("a100-pcie-4gpu"), WORKLOAD)


ALL_RESULTS = ["llama8b_on_a6000", "opt30b_on_a6000", "llama8b_on_4gpu"]


# ---- layouts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit,want", [(1, [1]), (4, [1, 2, 4]), (6, [1, 2, 3, 4, 6]), (8, [1, 2, 4, 8]),
                                        (12, [1, 2, 3, 4, 6, 8, 12])])
def test_degrees_are_powers_of_two_and_divisors(limit: int, want: list[int]) -> None:
    assert _degrees(limit) == want


def test_candidate_layouts_prune_exactly_the_unbuildable() -> None:
    """tiny-llama (4 heads, 2 KV heads, f=176, 4 layers) on 8 GPUs."""
    hw = profiles.load_profile("dgx-h100")
    model = load_model("tiny-llama")
    assert hw.n_gpus == 8
    got = candidate_arrangements(model, hw, SearchSpace())
    assert len(got) == len(set(got))
    for tp, pp, dp in got:
        assert not list(arrangement_problems(model, hw, tp, pp, dp))
        assert tp * pp * dp <= 8 and pp <= 4 and tp <= 4
    degrees = _degrees(8)
    for combo in itertools.product(degrees, degrees, degrees):
        if combo not in got and combo[1] <= model.n_layers:
            assert list(arrangement_problems(model, hw, *combo)), combo
    assert (8, 1, 1) not in got  # 4 heads cannot split 8 ways
    assert (1, 8, 1) not in got  # 8 stages of 4 layers
    assert (2, 2, 2) in got and (1, 1, 8) in got and (4, 2, 1) in got


def test_candidate_layouts_respect_a_restricted_space() -> None:
    hw = profiles.load_profile("dgx-h100")
    space = SearchSpace().restrict(tp=2, pp=None, dp=1)
    assert space.tp == (2,) and space.pp is None and space.dp == (1,)
    got = candidate_arrangements(load_model("llama-3-8b"), hw, space)
    assert got == [(2, 1, 1), (2, 2, 1), (2, 4, 1)]


def test_no_buildable_layout_raises(a6000) -> None:
    with pytest.raises(ValueError, match="no buildable layout of llama-3-8b on a6000-workstation"):
        search(load_model("llama-3-8b"), a6000, WORKLOAD, SearchSpace(tp=(3,)))


def test_nvme_buffer_holds_the_largest_partition() -> None:
    m = load_model("llama-3-8b")
    assert nvme_buffer_elems_for(m, 1, 1) == 128256 * 4096  # the replicated embedding
    assert nvme_buffer_elems_for(m, 4, 2) == 128256 * 4096 // 2
    assert nvme_buffer_elems_for(load_model("tiny-llama"), 1, 1) == 100_000_000  # at least 1e8


def test_nvme_buffer_counts_offer_fewer_than_deepspeeds_default_where_they_overlap() -> None:
    # every Llama module swaps in one partition: read, copy and compute overlap with 3 x 1 buffers, read and
    # compute with 2 x 1
    assert nvme_buffer_counts_for(load_model("llama-3-70b"), 1, 1) == [5, 3, 2]
    # a DeepSeek expert's module swaps in its three projections at once: 3 x 3 and 2 x 3 are not below 5
    assert nvme_buffer_counts_for(load_model("deepseek-v3"), 1, 1) == [5]
    # a Mixtral MoE block (one leaf) swaps in 24 partitions: DeepSpeed's 5 cannot hold them (kept for the rows that
    # swap nothing); 3, 2 and 1 x 24
    assert nvme_buffer_counts_for(load_model("mixtral-8x7b"), 1, 1) == [5, 72, 48, 24]


def test_fewer_nvme_buffers_predict_the_same_times_and_less_pinned_memory(a6000) -> None:
    r = search(load_model("llama-3-70b"), a6000, WORKLOAD, SearchSpace(batch_sizes=(1, 4)))
    by_plan = {r.plan(i): i for i in range(r.n_plans)}
    assert {p.nvme_buffer_count for p in by_plan if p.offload != "nvme"} == {5}
    three = [p for p in by_plan if p.offload == "nvme" and p.nvme_buffer_count == 3]
    assert three and len(three) == sum(1 for p in by_plan if p.offload == "nvme") // 3
    buffer_bytes = nvme_buffer_elems_for(r.model, 1, 1) * 2
    for p in three:
        a, b = r.estimate(by_plan[p]), r.estimate(by_plan[p.with_(nvme_buffer_count=5)])
        assert (a.decode_step_s, a.ttft_s) == (b.decode_step_s, b.ttft_s)
        assert b.pinned_bytes - a.pinned_bytes == pytest.approx(2 * buffer_bytes)
        assert a.gpu_peak_bytes <= b.gpu_peak_bytes
        # 2 buffers: the next read waits for the copy (the hops add up) but still overlaps compute
        two = r.estimate(by_plan[p.with_(nvme_buffer_count=2)])
        assert two.decode_step_s > a.decode_step_s and two.pinned_bytes == pytest.approx(a.pinned_bytes - buffer_bytes)
        # 1 buffer (DeepSpeed's floor here): the next read also waits for the compute
        one = predict(r.model, r.hardware, WORKLOAD, p.with_(nvme_buffer_count=1))
        assert one.decode_step_s >= two.decode_step_s and one.ttft_s > two.ttft_s
    # ranked at its best count, each configuration keeps DeepSpeed's default where it fits
    assert all(r.plan(i).nvme_buffer_count == 5 for i in r.ranked("latency") if r.plan(i).offload == "nvme")


def test_prefetch_buckets() -> None:
    assert prefetch_buckets(load_model("llama-3-8b")) == (2 * 4096**2, DEEPSPEED_DEFAULT_PREFETCH_ELEMS)
    assert prefetch_buckets(load_model("tiny-llama")) == (2 * 64**2, DEEPSPEED_DEFAULT_PREFETCH_ELEMS)


# ---- the knob grid --------------------------------------------------------------------------------


def all_plans(result):
    return [result.plan(i) for i in range(result.n_plans)]


def test_grid_evaluates_only_knobs_that_matter(llama8b_on_4gpu) -> None:
    r = llama8b_on_4gpu
    plans = all_plans(r)
    assert r.n_plans == len(plans) == len(set(plans))  # no duplicates
    for p in plans:
        assert p.offload != "nvme"  # the 4-GPU A100 profile has no NVMe
        if not p.pin_memory:
            assert p.offload == "cpu" or p.kv_offload  # pinning only where something leaves host memory
        if not (p.is_offloaded or p.dp > 1):
            assert p.prefetch_bucket_elems == DEEPSPEED_DEFAULT_PREFETCH_ELEMS  # nothing is gathered
        assert p.batch_size in DEFAULT_BATCHES and p.batch_size % p.dp == 0
        assert p.micro_batches in ({1, p.pp, 2 * p.pp} if p.pp > 1 else {1})
        assert not list(arrangement_problems(r.model, r.hardware, p.tp, p.pp, p.dp))
    assert {p.pp for p in plans} == {1, 2, 4} and {p.tp for p in plans} == {1, 2, 4}
    assert len({p.canonical() for p in plans}) == len(plans)  # no two plans that run identically


def test_configurations_group_plans_up_to_batch_micro_batches_and_bucket(llama8b_on_4gpu) -> None:
    r = llama8b_on_4gpu
    for i, j in itertools.combinations(range(0, r.n_plans, 37), 2):
        a, b = r.plan(i), r.plan(j)
        ranked_within = ("batch_size", "micro_batches", "prefetch_bucket_elems", "zero3_leaf")
        alike = {k: v for k, v in a.to_dict().items() if k not in ranked_within} == \
            {k: v for k, v in b.to_dict().items() if k not in ranked_within}
        assert (r.config[i] == r.config[j]) == alike, (a.label, b.label)


def test_search_space_restriction(a6000) -> None:
    space = SearchSpace(offloads=("cpu",), weight_bits=(4,), batch_sizes=(1, 8), kv_offload=(False,))
    r = search(load_model("llama-3-8b"), a6000, WORKLOAD, space)
    plans = all_plans(r)
    assert {(p.offload, p.weight_bits, p.kv_offload) for p in plans} == {("cpu", 4, False)}
    assert {p.batch_size for p in plans} == {1, 8}
    assert {p.pin_memory for p in plans} == {True, False}


def test_nvme_plans_carry_a_buffer_that_fits(a6000) -> None:
    r = search(load_model("llama-3-8b"), a6000, WORKLOAD, SearchSpace(offloads=("nvme",), batch_sizes=(1,)))
    assert r.n_plans > 0
    assert all(p.nvme_buffer_elems >= 128256 * 4096 for p in all_plans(r))
    assert "nvme_buffer" not in r.infeasible_counts


# ---- ranking --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_RESULTS)
def test_latency_ranking(request, name: str) -> None:
    r = request.getfixturevalue(name)
    for batch in (1, 4):
        top = r.ranked("latency", batch_size=batch)
        assert len(top) > 0
        assert np.all(r.feasible[top]) and np.all(r.batch_size[top] == batch)
        assert np.all(np.diff(r.decode_step_s[top]) >= 0)
        assert len(set(r.config[top])) == len(top)  # one entry per configuration
        # Each entry is its configuration's best at that batch.
        for i in top:
            same = (r.config == r.config[i]) & r.feasible & (r.batch_size == batch)
            assert r.decode_step_s[i] == pytest.approx(r.decode_step_s[same].min())
        # Every feasible configuration at that batch appears.
        assert set(r.config[top]) == set(r.config[r.feasible & (r.batch_size == batch)])


@pytest.mark.parametrize("name", ALL_RESULTS)
def test_throughput_ranking(request, name: str) -> None:
    r = request.getfixturevalue(name)
    top = r.ranked("throughput")
    assert np.all(r.feasible[top])
    assert np.all(np.diff(r.throughput_tok_s[top]) <= 0)
    assert len(set(r.config[top])) == len(top)
    assert r.throughput_tok_s[top[0]] == pytest.approx(r.throughput_tok_s[r.feasible].max())
    for i in top[:10]:
        same = (r.config == r.config[i]) & r.feasible
        assert r.throughput_tok_s[i] == pytest.approx(r.throughput_tok_s[same].max())


def test_balanced_ranking(llama8b_on_a6000) -> None:
    r = llama8b_on_a6000
    top = r.ranked("balanced")
    score = r.balanced_score()
    assert np.all(r.feasible[top]) and np.all(np.diff(score[top]) <= 1e-12)
    assert np.all(score[r.feasible] <= 1.0 + 1e-12)
    assert len(set(r.config[top])) == len(top)


def test_unknown_objective_raises(llama8b_on_a6000) -> None:
    with pytest.raises(ValueError, match="objective 'fastest' is not one of latency, throughput, balanced"):
        llama8b_on_a6000.ranked("fastest")


def test_a_big_batch_is_where_throughput_comes_from(llama8b_on_a6000) -> None:
    r = llama8b_on_a6000
    best_thr = r.ranked("throughput")[0]
    best_lat = r.ranked("latency")[0]
    assert r.batch_size[best_thr] > 1
    assert r.throughput_tok_s[best_thr] > r.throughput_tok_s[best_lat]
    # 16 GB fits a 48 GB A6000: the fastest bs1 decode keeps weights on the GPU.
    assert r.plan(best_lat).offload == "none"


# ---- Pareto front ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_RESULTS)
def test_pareto_front_is_non_dominated_and_sorted(request, name: str) -> None:
    r = request.getfixturevalue(name)
    front = r.pareto_front()
    assert len(front) > 0 and np.all(r.feasible[front])
    assert np.all(np.diff(r.decode_step_s[front]) >= 0)
    assert np.all(np.diff(r.throughput_tok_s[front]) > 0)
    feas = np.flatnonzero(r.feasible)
    dec, thr = r.decode_step_s[feas], r.throughput_tok_s[feas]
    for i in front:
        dominated = (dec <= r.decode_step_s[i]) & (thr >= r.throughput_tok_s[i]) & (
            (dec < r.decode_step_s[i]) | (thr > r.throughput_tok_s[i])
        )
        assert not dominated.any()
    # Completeness: every feasible plan is dominated by (or equal to) a front member.
    for j in feas[:: max(1, len(feas) // 200)]:
        assert np.any((r.decode_step_s[front] <= r.decode_step_s[j])
                      & (r.throughput_tok_s[front] >= r.throughput_tok_s[j]))
    # Its ends: the fastest decode and the highest throughput.
    assert r.decode_step_s[front[0]] == pytest.approx(dec.min())
    assert r.throughput_tok_s[front[-1]] == pytest.approx(thr.max())


# ---- infeasible plans -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_RESULTS)
def test_infeasible_counts_match_the_masks(request, name: str) -> None:
    r = request.getfixturevalue(name)
    want: dict[str, int] = {}
    for ev in r.evaluations:
        for kind, mask in capacity_masks(ev).items():
            want[kind] = want.get(kind, 0) + int(mask.sum())
    assert r.infeasible_counts == {k: v for k, v in want.items() if v}
    assert r.n_feasible == int(r.feasible.sum())
    assert r.n_plans - r.n_feasible <= sum(r.infeasible_counts.values())


def test_a_big_model_on_a_small_gpu_reports_why(opt30b_on_a6000) -> None:
    r = opt30b_on_a6000
    assert r.infeasible_counts.get("gpu_memory", 0) > 0  # 60 GB of 16-bit weights on a 48 GB GPU
    assert 0 < r.n_feasible < r.n_plans
    for i in np.flatnonzero(~r.feasible)[:20]:
        est = r.estimate(i)
        assert not est.feasible and est.reasons
    for i in r.ranked("latency"):
        p = r.plan(i)
        assert p.offload != "none" or p.weight_bits < 16  # 30B at 16 bit never sits on the GPU
    closest = r.closest_infeasible(5)
    assert len(closest) == 5 and not r.feasible[closest].any()
    over = [r._overshoot(i) for i in closest]
    assert over == sorted(over) and over[0] >= 1.0


# ---- consistency with predict ---------------------------------------------------------------------


def test_search_plans_predict_to_the_same_figures(llama8b_on_4gpu) -> None:
    from hpi.planner.predict import predict

    r = llama8b_on_4gpu
    picks = list(r.ranked("latency")[:3]) + list(r.ranked("throughput")[:3]) + list(r.pareto_front()[:2])
    for i in picks:
        plan = r.plan(i)
        est = predict(r.model, r.hardware, r.workload, plan)
        assert est.decode_step_s == pytest.approx(r.decode_step_s[i], rel=1e-9)
        assert est.ttft_s == pytest.approx(r.ttft_s[i], rel=1e-9)
        assert est.throughput_tok_s == pytest.approx(r.throughput_tok_s[i], rel=1e-9)
        assert est.feasible == bool(r.feasible[i])
        assert r.estimate(i).decode_step_s == pytest.approx(est.decode_step_s, rel=1e-9)


# ---- aio settings ---------------------------------------------------------------------------------------
def with_read_grid(profile):
    """``profile`` with a probe read grid where bigger requests and more of them in flight read faster."""
    from dataclasses import replace

    from hpi.planner.specs.hardware import AioReadPoint

    mib = 1 << 20
    grid = (AioReadPoint(mib, 1, 1e9), AioReadPoint(mib, 64, 4e9), AioReadPoint(4 * mib, 1, 2e9),
            AioReadPoint(4 * mib, 64, 8e9))
    return replace(profile, nvme=replace(profile.nvme, read_grid=grid))


def test_aio_settings_are_offered_only_with_a_read_grid_and_only_to_nvme_plans(a6000) -> None:
    model, space = load_model("llama-3-8b"), SearchSpace(batch_sizes=(1,))

    def settings(result):
        return {(p.offload, p.aio_block_size_bytes, p.aio_queue_depth, p.aio_threads) for p in all_plans(result)}

    plain = {s[1:] for s in settings(search(model, a6000, WORKLOAD, space))}
    assert plain == {(1 << 20, 64, 8)}  # no grid: every setting predicts the same, so only the defaults
    r = search(model, with_read_grid(a6000), WORKLOAD, space)
    assert {s[1:] for s in settings(r) if s[0] != "nvme"} == {(1 << 20, 64, 8)}
    assert {s[1:] for s in settings(r) if s[0] == "nvme"} == set(itertools.product(
        (1 << 20, 4 << 20, 8 << 20, 16 << 20), (8, 32, 64, 128), (1, 8)))
    # Llama-3-8B's k and v projections (8 MiB) would stay in CPU memory under a 16 MiB block: 8 of the 32 settings
    assert r.infeasible_counts["aio_block_size"] == sum(p.offload == "nvme" for p in all_plans(r)) // 4


def test_best_aio_is_the_fastest_feasible_setting(a6000) -> None:
    from hpi.planner.search import aio_variants, best_aio
    from hpi.planner.specs.plan import Plan

    model, plan = load_model("llama-3-8b"), Plan(offload="nvme", nvme_buffer_elems=nvme_buffer_elems_for(
        load_model("llama-3-8b"), 1, 1))
    assert best_aio(model, a6000, WORKLOAD, plan) == plan  # no grid: nothing is faster
    hw = with_read_grid(a6000)
    best = best_aio(model, hw, WORKLOAD, plan)
    assert (best.aio_block_size_bytes, best.aio_queue_depth, best.aio_threads) == (4 << 20, 64, 1)
    steps = {(v.aio_block_size_bytes, v.aio_queue_depth, v.aio_threads): predict(model, hw, WORKLOAD, v)
             for v in aio_variants(plan)}
    assert len(steps) == 32 and not steps[(16 << 20, 64, 8)].feasible and steps[(8 << 20, 64, 1)].feasible
    fastest = min(e.decode_step_s for e in steps.values() if e.feasible)
    assert steps[(4 << 20, 64, 1)].decode_step_s == fastest < steps[(1 << 20, 64, 8)].decode_step_s
    # one thread keeps up to depth blocks of a partition in flight: 64 of the embedding's 251, the grid's edge, so
    # depth 128 predicts the same (the plan's 64 is kept) and depth 32 less; eight threads reach that edge at depth
    # 8 already (8 x 8 of the embedding's) and hold every block of a layer's partitions (at most 4 a thread) in
    # flight: their depth changes nothing
    assert steps[(4 << 20, 128, 1)].decode_step_s == fastest < steps[(4 << 20, 32, 1)].decode_step_s
    assert steps[(4 << 20, 8, 8)].decode_step_s == steps[(4 << 20, 64, 8)].decode_step_s


def test_best_aio_for_the_8b_on_h200_reads_8_mib_blocks_with_one_thread() -> None:
    """The 8B on h200-1gpu's drive grid (2026-12-03): 8 MiB blocks with one thread, the setting that read fastest
    on 2026-12-05 (1.44 GB/s, benchmarks/results/2026-12-05-h200-issue20/SUMMARY.md "NVMe"). That run's depth 8
    predicts 0.3% slower than depth 32-128 (the MLP's 14 blocks of 8 MiB all in flight, where the grid's 4 MiB
    row rises from 8 to 32 in flight); 16 MiB blocks stay refused (the k and v partitions are 8 MiB)."""
    from hpi.planner.search import aio_variants, best_aio
    from hpi.planner.specs.plan import Plan

    model, hw = load_model("llama-3-8b"), profiles.load_profile("h200-1gpu")
    workload = Workload(prompt_len_tokens=32, gen_len_tokens=3)
    plan = Plan(offload="nvme", nvme_buffer_elems=nvme_buffer_elems_for(model, 1, 1))
    best = best_aio(model, hw, workload, plan)
    assert (best.aio_block_size_bytes, best.aio_queue_depth, best.aio_threads) == (8 << 20, 64, 1)
    steps = {(v.aio_block_size_bytes >> 20, v.aio_queue_depth, v.aio_threads): predict(model, hw, workload, v)
             for v in aio_variants(plan)}
    assert not any(e.feasible for (block, _, _), e in steps.items() if block == 16)
    assert {r.kind for r in steps[(16, 8, 1)].reasons} == {"aio_block_size"}
    fastest = steps[(8, 64, 1)].decode_step_s
    assert fastest == pytest.approx(9.573, abs=1e-3)
    assert steps[(8, 8, 1)].decode_step_s == pytest.approx(9.602, abs=1e-3)
    # the next best: 4 MiB blocks with one thread; the best with eight threads reads at 0.8 of the grid
    assert steps[(4, 64, 1)].decode_step_s == pytest.approx(10.162, abs=1e-3)
    assert min(e.decode_step_s for (_, _, t), e in steps.items() if t == 8 and e.feasible) > 12.0


def test_layer_leaves_are_searched_where_zero3_gathers_and_not_with_nvme(a6000) -> None:
    model = load_model("llama-3-8b")
    result = search(model, a6000, WORKLOAD, SearchSpace(batch_sizes=(1,)))
    searched = {(p.offload, p.zero3_leaf) for p in all_plans(result)}
    assert ("cpu", "layer") in searched and ("cpu", "module") in searched
    assert ("nvme", "layer") not in searched and ("none", "layer") not in searched
    # a configuration ranks at its better leaf: under the stream-ordered wait the streamed 16-bit 8B at batch 1 with
    # layer leaves, which the H200 measured 1.28x faster (benchmarks/results/2026-12-05-h200-leaf); DeepSpeed's own
    # only when asked
    stream = replace(WORKLOAD, fetch_wait="stream")
    ranked_stream = search(model, a6000, stream, SearchSpace(batch_sizes=(1,)))
    ranked = [ranked_stream.plan(int(i)) for i in ranked_stream.ranked("latency", batch_size=1)]
    streamed = next(p for p in ranked if p.offload == "cpu" and p.weight_bits == 16 and p.pin_memory and p.tp == 1)
    assert streamed.zero3_leaf == "layer"
    twin = predict(model, a6000, stream, streamed.with_(zero3_leaf="module"))
    assert predict(model, a6000, stream, streamed).decode_step_s < twin.decode_step_s
    # under the copy-ordered wait (the default) the module's hooks run beside the copies either way: a tie (one H100
    # streamed the 8B at 1.01 of pinned with DeepSpeed's per-module hooks, benchmarks/results/2026-12-06-event-wait)
    event = [predict(model, a6000, WORKLOAD, streamed.with_(zero3_leaf=leaf)).decode_step_s
             for leaf in ("layer", "module")]
    assert event[0] == pytest.approx(event[1], rel=1e-9) and event[0] < twin.decode_step_s
    module_only = search(model, a6000, WORKLOAD, SearchSpace(batch_sizes=(1,)).restrict(zero3_leaves="module"))
    assert {p.zero3_leaf for p in all_plans(module_only)} == {"module"}
