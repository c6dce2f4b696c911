"""cost.pipeline: min-max balanced contiguous stages, where embedding and head go, p2p time, and how
stage times compose into a step (prefill fill/drain; decode stage-bound or round-trip-bound)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from hpi.planner.catalog import load_model
from hpi.planner.cost.inputs import Knobs
from hpi.planner.cost.phase import Phase, decode_phase, prefill_phase
from hpi.planner.cost.pipeline import (
    balanced_stage_sizes,
    compose_step,
    p2p_time,
    stage_layer_sizes,
    stage_module_counts,
)
from hpi.planner.cost.shape import DENSE, EMBED, HEAD, MOE, module_table, stored_elements
from hpi.planner.specs.plan import Plan

PREFILL = Phase("prefill", np.ones(1), np.ones(1), 1.0, 0.0)
DECODE = Phase("decode", np.ones(1), np.ones(1), 1.0, 1.0)


def brute_force_optimum(weights: np.ndarray, parts: int) -> float:
    n = len(weights)
    best = np.inf
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(weights[a:b].sum() for a, b in zip(bounds, bounds[1:])))
    return best


def heaviest(weights: np.ndarray, sizes: list[int]) -> float:
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return max(weights[a:b].sum() for a, b in zip(bounds, bounds[1:]))


# ---- balanced_stage_sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize("n,parts,want", [(8, 4, [2, 2, 2, 2]), (8, 1, [8]), (8, 8, [1] * 8), (6, 2, [3, 3])])
def test_uniform_weights_split_evenly(n: int, parts: int, want: list[int]) -> None:
    assert balanced_stage_sizes(np.ones(n), parts) == want


def test_uneven_count_of_uniform_weights() -> None:
    sizes = balanced_stage_sizes(np.ones(10), 4)
    assert sum(sizes) == 10 and len(sizes) == 4 and max(sizes) == 3 and min(sizes) >= 1


def test_skewed_weights_by_hand() -> None:
    # Heavy ends (an embedding and a head): [10, 1 x 6, 10] in 3 parts -> [10], [1 x 6], [10] with max 10.
    w = np.array([10.0, 1, 1, 1, 1, 1, 1, 10])
    sizes = balanced_stage_sizes(w, 3)
    assert heaviest(w, sizes) == 10.0
    assert sizes == [1, 6, 1]
    # In 2 parts the best is 13: [10, 1, 1, 1] | [1, 1, 1, 10].
    assert heaviest(w, balanced_stage_sizes(w, 2)) == 13.0


@pytest.mark.parametrize("seed", range(40))
def test_min_max_optimal_against_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 11))
    parts = int(rng.integers(1, n + 1))
    # Mixed scales, including many ties, as real layer weights are.
    w = rng.choice([1.0, 1.0, 2.0, 5.0, 37.0], size=n) * rng.choice([1.0, 1e9], size=1)
    sizes = balanced_stage_sizes(w, parts)
    assert len(sizes) == parts and sum(sizes) == n and min(sizes) >= 1
    assert heaviest(w, sizes) == pytest.approx(brute_force_optimum(w, parts), rel=1e-9)


@pytest.mark.parametrize("parts", [0, 5])
def test_impossible_part_counts_raise(parts: int) -> None:
    with pytest.raises(ValueError, match=r"pp\(\d+\) must be between 1 and the number of layers\(4\)"):
        balanced_stage_sizes(np.ones(4), parts)


# ---- stages of real models ------------------------------------------------------------------------


def layer_weights(model) -> np.ndarray:
    stored = stored_elements(module_table(model))
    w = np.array([stored[MOE if model.is_moe and i >= model.first_dense_layers else DENSE]
                  for i in range(model.n_layers)])
    w[0] += stored[EMBED]
    w[-1] += stored[HEAD]
    return w


@pytest.mark.parametrize("name,pp", [("llama-3-8b", 2), ("llama-3-8b", 4), ("mixtral-8x7b", 3), ("opt-30b", 4)])
def test_stage_layer_sizes_are_optimal_for_catalogue_models(name: str, pp: int) -> None:
    m = load_model(name)
    sizes = stage_layer_sizes(m, pp)
    w = layer_weights(m)
    assert sum(sizes) == m.n_layers and min(sizes) >= 1 and len(sizes) == pp
    assert heaviest(w, list(sizes)) == pytest.approx(brute_force_optimum(w, pp), rel=1e-9)


def test_embedding_and_head_make_end_stages_shorter() -> None:
    # Llama-3-8B: a layer stores 218M, the embedding and the head 525M each.
    sizes = stage_layer_sizes(load_model("llama-3-8b"), 4)
    assert sizes[0] < sizes[1] and sizes[-1] < sizes[-2]


def test_stage_module_counts_places_embedding_first_and_head_last() -> None:
    m = load_model("deepseek-v3")  # 3 dense layers, then 58 MoE layers
    for pp in (1, 2, 4, 8):
        c = stage_module_counts(m, pp)
        assert c.shape == (pp, 4)
        assert c[0, EMBED] == 1 and c[:, EMBED].sum() == 1
        assert c[-1, HEAD] == 1 and c[:, HEAD].sum() == 1
        assert c[:, DENSE].sum() == 3 and c[:, MOE].sum() == 58
        assert c[0, DENSE] == 3  # the first layers are the dense ones
        assert np.all(c[:, DENSE] + c[:, MOE] >= 1)
        np.testing.assert_array_equal(c[:, DENSE] + c[:, MOE], stage_layer_sizes(m, pp))


def test_stage_module_counts_is_read_only() -> None:
    c = stage_module_counts(load_model("tiny-llama"), 2)
    with pytest.raises(ValueError):
        c[0, 0] = 99


def test_more_stages_than_layers_raises() -> None:
    with pytest.raises(ValueError, match="pp"):
        stage_module_counts(load_model("tiny-llama"), 5)


# ---- p2p --------------------------------------------------------------------------------------------


def test_p2p_time(kit) -> None:
    """alpha (ROUND: 20 us) + link latency (1 us) + hidden states over the link (no efficiency)."""
    lay = kit.arrangement(kit.toy_dense(), pp=2)
    k = Knobs.from_plans([Plan(pp=2, batch_size=4, micro_batches=2)])
    dec = p2p_time(lay, decode_phase(lay, k))
    assert dec[0] == pytest.approx(20e-6 + 1e-6 + 2 * 1024 * 2 / 100e9)  # micro-batch of 2 sequences
    pre = p2p_time(lay, prefill_phase(lay, k))
    assert pre[0] == pytest.approx(20e-6 + 1e-6 + 2 * 512 * 1024 * 2 / 100e9)


def test_no_p2p_for_one_stage(kit) -> None:
    lay = kit.arrangement(kit.toy_dense())
    k = Knobs.from_plans([Plan(batch_size=4)])
    assert not p2p_time(lay, decode_phase(lay, k)).any()


# ---- compose_step -----------------------------------------------------------------------------------


def compose(stages, p2p, m, phase):
    return compose_step(np.array([stages], dtype=float), np.array([p2p], dtype=float), np.array([m], dtype=float),
                        phase)


def test_prefill_single_micro_batch() -> None:
    c = compose([1.0, 2.0, 3.0], 0.1, 1, PREFILL)
    assert c.step_s[0] == pytest.approx(6.0 + 2 * 0.1)  # sum of stages + (pp-1) sends
    assert c.bubble_s[0] == pytest.approx(6.2 - 3.0)
    assert c.slowest_stage[0] == 2
    assert c.p2p_exposed_s[0] == pytest.approx(0.2)


def test_prefill_stage_bound_micro_batches() -> None:
    c = compose([1.0, 2.0, 3.0], 0.1, 4, PREFILL)
    assert c.step_s[0] == pytest.approx(6.2 + 3 * 3.0)  # fill + (m-1) x slowest stage
    assert c.bubble_s[0] == pytest.approx(15.2 - 4 * 3.0)
    assert (c.stage_sum_weight[0], c.slowest_stage_weight[0]) == (1.0, 3.0)
    assert c.p2p_exposed_s[0] == pytest.approx(0.2)
    # The weights reproduce the step.
    assert (6.0 * c.stage_sum_weight[0] + 3.0 * c.slowest_stage_weight[0] + c.p2p_exposed_s[0]
            == pytest.approx(c.step_s[0]))


def test_prefill_send_bound_micro_batches() -> None:
    c = compose([0.1, 0.1], 0.5, 3, PREFILL)
    assert c.step_s[0] == pytest.approx(0.2 + 0.5 + 2 * 0.5)
    assert c.slowest_stage_weight[0] == 0.0
    assert c.p2p_exposed_s[0] == pytest.approx(0.5 + 2 * 0.5)


def test_decode_round_trip_bound() -> None:
    c = compose([1.0, 2.0, 3.0], 0.1, 1, DECODE)
    assert c.step_s[0] == pytest.approx(6.0 + 3 * 0.1)  # the token travels back to stage 0: pp sends
    assert c.bubble_s[0] == pytest.approx(6.3 - 3.0)
    assert (c.stage_sum_weight[0], c.slowest_stage_weight[0]) == (1.0, 0.0)
    assert c.p2p_exposed_s[0] == pytest.approx(0.3)
    c = compose([1.0, 2.0, 3.0], 0.1, 2, DECODE)  # 2 x 3 = 6 < 6.3: still round-trip-bound
    assert c.step_s[0] == pytest.approx(6.3)
    assert c.bubble_s[0] == pytest.approx(0.3)


def test_decode_stage_bound() -> None:
    c = compose([1.0, 2.0, 3.0], 0.1, 4, DECODE)
    assert c.step_s[0] == pytest.approx(12.0)  # m x slowest stage
    assert c.bubble_s[0] == pytest.approx(0.0)
    assert (c.stage_sum_weight[0], c.slowest_stage_weight[0]) == (0.0, 4.0)
    assert c.p2p_exposed_s[0] == 0.0


def test_one_stage_is_just_the_stage() -> None:
    for phase in (PREFILL, DECODE):
        c = compose([2.5], 0.0, 1, phase)
        assert c.step_s[0] == pytest.approx(2.5)
        assert c.bubble_s[0] == 0.0


def test_compose_vectorised_rows_are_independent() -> None:
    stages = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 1.0], [0.1, 0.1, 0.1]])
    p2p = np.array([0.1, 0.0, 0.5])
    m = np.array([4.0, 1.0, 2.0])
    for phase in (PREFILL, DECODE):
        c = compose_step(stages, p2p, m, phase)
        for i in range(3):
            one = compose_step(stages[i : i + 1], p2p[i : i + 1], m[i : i + 1], phase)
            assert c.step_s[i] == pytest.approx(one.step_s[0])
            assert c.bubble_s[i] == pytest.approx(max(c.step_s[i] - m[i] * stages[i].max(), 0.0), abs=1e-12)
