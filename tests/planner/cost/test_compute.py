"""cost.compute: FLOPs and HBM bytes of one forward of each module, and the roofline that takes their max.

The toy model (conftest.toy_dense): 4 layers, h=1024, 8 heads of 128, 2 KV heads, f=4096, V=32000.
Workload prompt 512, gen 32: decode attends to 512 + 31/2 + 1 = 528.5 keys on average.
"""

from __future__ import annotations

import numpy as np
import pytest

from hpi.planner.cost.compute import (
    active_elems_per_rank,
    compute_time,
    expected_experts_touched,
    flops,
    hbm_bytes,
    roofline_sides,
    stored_elems_per_rank,
    touched_elems_per_rank,
)
from hpi.planner.cost.inputs import Knobs
from hpi.planner.cost.phase import decode_phase, prefill_phase
from hpi.planner.cost.shape import DENSE, EMBED, HEAD, MOE
from hpi.planner.specs.plan import Plan

H, HEADS, D, KV_HEADS, F, V = 1024, 8, 128, 2, 4096, 32000
DENSE_SHARDED = 1024 * 1024 * 2 + 2 * 1024 * 256 + 3 * 1024 * 4096  # q, o, k, v, gate/up/down
DENSE_REPLICATED = 2 * 1024
DECODE_CTX = 512 + 31 / 2 + 1
ATTN_PER_KEY = 2 * HEADS * (D + D)  # QK^T and AV, all heads
KV_ELEMS = 2 * KV_HEADS * D


def knobs(*plans: Plan) -> Knobs:
    return Knobs.from_plans(list(plans))


# ---- MoE: distinct experts touched ----------------------------------------------------------------


def test_expected_experts_touched_limits() -> None:
    e, k = np.array([8.0]), np.array([2.0])
    assert expected_experts_touched(e, k, np.array([1.0]))[0] == pytest.approx(2.0)  # one token: its k experts
    assert expected_experts_touched(e, k, np.array([10_000.0]))[0] == pytest.approx(8.0)  # many: all of them
    assert expected_experts_touched(e, k, np.array([0.0]))[0] == 0.0
    # Dense modules (E = 0) touch none.
    assert expected_experts_touched(np.array([0.0]), np.array([0.0]), np.array([64.0]))[0] == 0.0


@pytest.mark.parametrize("tokens", [2, 3, 16])
def test_expected_experts_touched_formula(tokens: int) -> None:
    # E(1 - (1 - k/E)^T): T=2 gives 8 (1 - 0.75^2) = 3.5.
    want = 8 * (1 - (1 - 2 / 8) ** tokens)
    got = expected_experts_touched(np.array([8.0]), np.array([2.0]), np.array([float(tokens)]))[0]
    assert got == pytest.approx(want)
    if tokens == 2:
        assert got == pytest.approx(3.5)


def test_expected_experts_touched_is_monotone_and_bounded() -> None:
    tokens = np.arange(1, 200, dtype=float)
    got = expected_experts_touched(np.full_like(tokens, 256.0), np.full_like(tokens, 8.0), tokens)
    assert np.all(np.diff(got) > 0)
    assert np.all(got <= 256.0) and got[0] == pytest.approx(8.0)


# ---- FLOPs ------------------------------------------------------------------------------------------


def test_decode_flops_by_hand(kit) -> None:
    lay = kit.arrangement(kit.toy_dense())
    k = knobs(Plan(batch_size=1), Plan(batch_size=4))
    f = flops(lay, decode_phase(lay, k))
    for row, tokens in enumerate((1, 4)):
        dense = 2 * tokens * (DENSE_SHARDED + DENSE_REPLICATED) + tokens * ATTN_PER_KEY * DECODE_CTX
        assert f[row, DENSE] == pytest.approx(dense)
        assert f[row, HEAD] == pytest.approx(2 * tokens * (V * H + H))
    assert lay.stage_counts[:, MOE].sum() == 0  # a dense model runs no MOE module, whatever its column says


@pytest.mark.parametrize("model_name", ["toy_dense", "toy_moe"])
@pytest.mark.parametrize("batch", [1, 8])
def test_decode_flops_are_twice_active_params_plus_attention(kit, model_name: str, batch: int) -> None:
    """Summed over the model's modules (embedding aside, see the lookup test below):
    2 * tokens * (active params - embedding) + layers * tokens * 2H(d_qk+d_v) * context."""
    m = getattr(kit, model_name)()
    lay = kit.arrangement(m)
    f = flops(lay, decode_phase(lay, knobs(Plan(batch_size=batch))))[0]
    counts = lay.stage_counts.sum(axis=0)
    non_embedding = (f * counts).sum() - f[EMBED]
    want = 2 * batch * (m.params_active - m.embedding_params) + m.n_layers * batch * ATTN_PER_KEY * DECODE_CTX
    assert non_embedding == pytest.approx(want, rel=1e-12)


def test_embedding_is_a_lookup_not_a_matmul(kit) -> None:
    lay = kit.arrangement(kit.toy_dense())
    k = knobs(Plan(batch_size=4))
    for phase in (prefill_phase(lay, k), decode_phase(lay, k)):
        assert flops(lay, phase)[0, EMBED] == 0.0
        assert hbm_bytes(lay, k, phase)[0, EMBED] == pytest.approx(phase.tokens[0] * H * 2)


def test_prefill_flops_and_the_head_on_the_last_position_only(kit) -> None:
    lay = kit.arrangement(kit.toy_dense())
    k = knobs(Plan(batch_size=2))
    f = flops(lay, prefill_phase(lay, k))[0]
    tokens = 2 * 512
    causal_ctx = (512 + 1) / 2
    assert f[DENSE] == pytest.approx(2 * tokens * (DENSE_SHARDED + DENSE_REPLICATED)
                                     + tokens * ATTN_PER_KEY * causal_ctx)
    # transformers' logits_to_keep: the LM head runs on one position per sequence in prefill.
    assert f[HEAD] == pytest.approx(2 * 2 * (V * H + H))


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_divides_sharded_work_not_replicated(kit, tp: int) -> None:
    lay = kit.arrangement(kit.toy_dense(), tp=tp)
    k = knobs(Plan(tp=tp, batch_size=1))
    f = flops(lay, decode_phase(lay, k))[0]
    assert f[DENSE] == pytest.approx(2 * (DENSE_SHARDED / tp + DENSE_REPLICATED) + ATTN_PER_KEY / tp * DECODE_CTX)
    assert f[HEAD] == pytest.approx(2 * (V * H / tp + H))
    np.testing.assert_allclose(
        active_elems_per_rank(lay)[[DENSE, HEAD]], [DENSE_SHARDED / tp + DENSE_REPLICATED, V * H / tp + H]
    )


def test_moe_flops_use_k_experts(kit) -> None:
    m = kit.toy_moe()
    lay = kit.arrangement(m)
    k = knobs(Plan(batch_size=16))
    f = flops(lay, decode_phase(lay, k))[0]
    t = lay.table
    want = 2 * 16 * (t.sharded[MOE] + t.replicated[MOE] + 2 * 3 * 1024 * 2048) + 16 * ATTN_PER_KEY * DECODE_CTX
    assert f[MOE] == pytest.approx(want)


def test_mla_decode_re_expands_the_cached_latents(kit) -> None:
    """toy_mla: 4 heads, kv_lora 64, d_nope 32, d_v 32: 2*64*4*64 FLOPs per cached token per layer."""
    m = kit.toy_mla()
    for tp in (1, 2):
        lay = kit.arrangement(m, tp=tp)
        k = knobs(Plan(tp=tp, batch_size=2))
        dec = decode_phase(lay, k)
        f = flops(lay, dec)[0]
        weights = 2 * 2 * active_elems_per_rank(lay)
        attention = 2 * (2 * 4 * (48 + 32)) / tp * DECODE_CTX
        expand = 2 * DECODE_CTX * (2 * 64 * 4 * 64) / tp
        assert f[DENSE] == pytest.approx(weights[DENSE] + attention + expand)
        assert f[MOE] == pytest.approx(weights[MOE] + attention + expand)
        # Prefill reads no cache: no re-expansion term.
        pre = prefill_phase(lay, k)
        fp = flops(lay, pre)[0]
        tokens = 2 * 512
        assert fp[DENSE] == pytest.approx(2 * tokens * active_elems_per_rank(lay)[DENSE]
                                          + tokens * 2 * 4 * 80 / tp * 256.5)


# ---- HBM bytes ------------------------------------------------------------------------------------


def test_decode_hbm_bytes_16_bit(kit) -> None:
    lay = kit.arrangement(kit.toy_dense())
    k = knobs(Plan(batch_size=3))
    b = hbm_bytes(lay, k, decode_phase(lay, k))[0]
    kv = 3 * DECODE_CTX * KV_ELEMS * 2  # every sequence's cache, K and V, 16 bit
    assert b[DENSE] == pytest.approx((DENSE_SHARDED + DENSE_REPLICATED) * 2 + kv)
    assert b[HEAD] == pytest.approx((V * H + H) * 2)


@pytest.mark.parametrize("bits", [8, 4])
def test_the_gemm_reads_a_quantized_weight_in_16_bit(kit, bits: int) -> None:
    """The GEMM reads the dequantized 16-bit copy: the roofline's bytes do not depend on the weight bits
    (dequantizing is cost.dequant's term)."""
    lay = kit.arrangement(kit.toy_dense())
    k = knobs(Plan(batch_size=1), Plan(batch_size=1, weight_bits=bits))
    b16, bq = hbm_bytes(lay, k, decode_phase(lay, k))
    kv = DECODE_CTX * KV_ELEMS * 2
    assert b16[DENSE] == pytest.approx((DENSE_SHARDED + DENSE_REPLICATED) * 2 + kv)
    np.testing.assert_allclose(bq, b16)


def test_prefill_reads_no_kv_cache(kit) -> None:
    lay = kit.arrangement(kit.toy_dense())
    k = knobs(Plan(batch_size=2))
    b = hbm_bytes(lay, k, prefill_phase(lay, k))[0]
    assert b[DENSE] == pytest.approx((DENSE_SHARDED + DENSE_REPLICATED) * 2)


@pytest.mark.parametrize("tp,split", [(1, 1), (2, 2), (4, 2), (8, 2)])
def test_kv_reads_split_at_most_by_kv_heads(kit, tp: int, split: int) -> None:
    lay = kit.arrangement(kit.toy_dense(), tp=tp)
    assert lay.kv_split == split
    k = knobs(Plan(tp=tp, batch_size=1))
    b = hbm_bytes(lay, k, decode_phase(lay, k))[0]
    weights = (DENSE_SHARDED / tp + DENSE_REPLICATED) * 2
    assert b[DENSE] - weights == pytest.approx(DECODE_CTX * KV_ELEMS / split * 2)


def test_moe_decode_reads_the_experts_tokens_touch(kit) -> None:
    m = kit.toy_moe()
    lay = kit.arrangement(m)
    t = lay.table
    k = knobs(Plan(batch_size=1), Plan(batch_size=4), Plan(batch_size=256))
    touched = touched_elems_per_rank(lay, decode_phase(lay, k).tokens)[:, MOE]
    expert = 3 * 1024 * 2048
    for row, tokens in enumerate((1, 4, 256)):
        n = 8 * (1 - (1 - 2 / 8) ** tokens)
        assert touched[row] == pytest.approx(t.sharded[MOE] + t.replicated[MOE] + n * expert)
    assert touched[0] == pytest.approx(t.sharded[MOE] + t.replicated[MOE] + 2 * expert)
    assert touched[2] == pytest.approx(t.sharded[MOE] + t.replicated[MOE] + 8 * expert)


def test_stored_elems_per_rank(kit) -> None:
    m = kit.toy_moe()
    lay = kit.arrangement(m, tp=2)
    s = stored_elems_per_rank(lay)
    t = lay.table
    assert s[MOE] == pytest.approx(t.sharded[MOE] / 2 + t.replicated[MOE] + 8 * 3 * 1024 * 2048 / 2)
    assert s[EMBED] == V * H  # replicated on every TP rank
    assert s[HEAD] == pytest.approx(V * H / 2 + H)


# ---- roofline -------------------------------------------------------------------------------------


def test_roofline_sides_use_the_phase_efficiency(kit) -> None:
    """ROUND efficiency: matmul 0.5 prefill / 0.25 decode of 100 TFLOP/s, HBM 0.8 of 1 TB/s."""
    lay = kit.arrangement(kit.toy_dense())
    k = knobs(Plan(batch_size=1))
    for phase, eff in ((prefill_phase(lay, k), 0.5), (decode_phase(lay, k), 0.25)):
        t_f, t_b = roofline_sides(lay, k, phase)
        np.testing.assert_allclose(t_f, flops(lay, phase) / (100e12 * eff))
        np.testing.assert_allclose(t_b, hbm_bytes(lay, k, phase) / (1e12 * 0.8))
        np.testing.assert_allclose(compute_time(lay, k, phase), np.maximum(t_f, t_b))


def test_decode_bs1_is_hbm_bound_and_long_prefill_is_flop_bound(kit) -> None:
    lay = kit.arrangement(kit.toy_dense())
    k = knobs(Plan(batch_size=1))
    t_f, t_b = roofline_sides(lay, k, decode_phase(lay, k))
    assert t_b[0, DENSE] > 10 * t_f[0, DENSE]
    assert compute_time(lay, k, decode_phase(lay, k))[0, DENSE] == t_b[0, DENSE]
    t_f, t_b = roofline_sides(lay, k, prefill_phase(lay, k))
    assert t_f[0, DENSE] > t_b[0, DENSE]
    assert compute_time(lay, k, prefill_phase(lay, k))[0, DENSE] == t_f[0, DENSE]


def test_decode_layer_time_by_hand(kit) -> None:
    """Ideal hardware, bs 1: a decode layer reads (15.2M weights x 2 B + KV) at 1 TB/s."""
    lay = kit.arrangement(kit.toy_dense(), hardware=kit.make_hardware(kit.IDEAL))
    k = knobs(Plan(batch_size=1))
    t = compute_time(lay, k, decode_phase(lay, k))[0]
    want = ((DENSE_SHARDED + DENSE_REPLICATED) * 2 + DECODE_CTX * KV_ELEMS * 2) / 1e12
    assert t[DENSE] == pytest.approx(want)
    assert t[DENSE] == pytest.approx(30.9e-6, rel=0.01)
