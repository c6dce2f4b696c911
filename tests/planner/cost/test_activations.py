"""Prefill's element-wise traffic (``hpi.planner.cost.activations``): bytes a token, worked out by hand from the
chains the module names, and where the estimate adds them."""

from __future__ import annotations

import numpy as np
import pytest

from hpi.planner.catalog import load_model
from hpi.planner.cost.activations import activation_time, bytes_per_token
from hpi.planner.cost.inputs import Knobs
from hpi.planner.cost.phase import decode_phase, prefill_phase
from hpi.planner.cost.shape import DENSE, EMBED, HEAD, MOE
from hpi.planner.specs.plan import Plan


def test_llama_3_8b_moves_84h_plus_rotary_plus_its_gated_ffn_a_token():
    m = load_model("llama-3-8b")  # h 4096, q 4096, k 1024, FFN 14336
    per_token = bytes_per_token(m, 1)
    assert per_token[DENSE] == 84 * 4096 + 20 * (4096 + 1024) + 10 * 14336
    assert per_token[MOE] == per_token[EMBED] == 0
    assert per_token[HEAD] == 36 * 4096  # the final RMSNorm over every prompt token


def test_tp_splits_heads_and_ffn_but_not_norms_and_residuals():
    m = load_model("llama-3-70b")  # h 8192, 64 heads, 8 kv heads of 128, FFN 28672
    tp1, tp4 = bytes_per_token(m, 1)[DENSE], bytes_per_token(m, 4)[DENSE]
    whole = 84 * 8192
    assert tp1 - whole == pytest.approx(4 * (tp4 - whole))
    # Beyond the kv heads each rank holds one replicated kv head: at tp 16 the 8 kv heads stop splitting.
    tp16 = bytes_per_token(m, 16)[DENSE]
    assert tp16 == whole + 20 * (8192 / 16 + 128) + 10 * 28672 / 16


def test_a_moe_layer_pays_its_routed_experts_activations_and_routing():
    m = load_model("mixtral-8x7b")  # k = 2 of 8 experts, expert FFN 14336, no shared expert
    h = m.hidden_size
    attention_and_norms = 84 * h + 20 * (4096 + 1024)
    assert bytes_per_token(m, 1)[MOE] == attention_and_norms + 10 * 2 * 14336 + (22 * 2 + 2) * h


def test_prefill_pays_tokens_times_bytes_at_the_hbm_rate_decode_nothing(kit):
    arrangement = kit.arrangement(load_model("llama-3-8b"))
    knobs = Knobs.from_plans([Plan(batch_size=b) for b in (1, 4)])
    prefill = prefill_phase(arrangement, knobs)
    hw = arrangement.hardware
    expected = prefill.tokens[:, None] * bytes_per_token(arrangement.model, 1)[None, :] / (
        hw.gpu.hbm_bandwidth_bytes_s * hw.efficiency.hbm)
    np.testing.assert_allclose(activation_time(arrangement, prefill), expected)
    assert not activation_time(arrangement, decode_phase(arrangement, knobs)).any()
