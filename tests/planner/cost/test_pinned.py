"""torch pins each offloaded partition in a power-of-two block (cost.pinned), by hand for Llama-3-8B."""

from __future__ import annotations

import pytest

from hpi.planner.catalog import load_model
from hpi.planner.cost.inputs import Knobs
from hpi.planner.cost.pinned import pinned_rounding_bytes
from hpi.planner.cost.shape import DENSE, EMBED, HEAD
from hpi.planner.predict import arrangement_for, predict
from hpi.planner.profiles import load_profile
from hpi.planner.specs.plan import Plan
from hpi.planner.specs.workload import Workload

MIB = 2**20


def _rounding(plan: Plan):
    model, hw = load_model("llama-3-8b"), load_profile("h200-2gpu")
    arrangement = arrangement_for(model, hw, Workload(), plan.tp, plan.pp, plan.dp)
    return pinned_rounding_bytes(arrangement, Knobs.from_plans([plan]))[0]


def test_llama_8b_bf16_by_hand():
    """q / o (4096 x 4096 x 2 B = 32 MiB) and k / v (8 MiB) are powers of two already; each FFN projection
    (4096 x 14336 x 2 B = 112 MiB) takes 128; the embedding and the head (128256 x 4096 x 2 B = 1002 MiB) take
    1024 MiB each; norms (4096 weights) stay on the GPU (below the 1e5 persistence threshold)."""
    waste = _rounding(Plan(offload="cpu"))
    assert waste[DENSE] == 3 * 16 * MIB
    assert waste[EMBED] == waste[HEAD] == 1024 * MIB - 128256 * 4096 * 2
    assert _rounding(Plan(offload="cpu", pin_memory=False)).sum() == 0.0
    assert _rounding(Plan()).sum() == 0.0  # nothing offloaded


def test_four_bit_partitions_and_tp_change_the_blocks():
    """4-bit: 0.5 + 4/64 bytes a weight. q (16 Mi weights) is 9 MiB and takes 16; an FFN projection (56 Mi weights)
    31.5 MiB and takes 32. TP 2 halves the split matrices but not the replicated embedding."""
    waste = _rounding(Plan(offload="cpu", weight_bits=4))
    q, kv, ffn = 16 * MIB - 9 * MIB, 4 * MIB - 2.25 * MIB, 32 * MIB - 31.5 * MIB
    assert waste[DENSE] == pytest.approx(2 * q + 2 * kv + 3 * ffn)
    tp2 = _rounding(Plan(offload="cpu", tp=2))
    assert tp2[DENSE] == 3 * 8 * MIB  # 56 MiB projections in 64 MiB blocks
    assert tp2[EMBED] == 1024 * MIB - 128256 * 4096 * 2  # replicated: the whole table in bf16


def test_the_rounding_is_pinned_and_counted_in_host_memory():
    est = predict(load_model("llama-3-8b"), load_profile("h200-1gpu"), Workload(), Plan(offload="cpu"))
    rounding = est.cpu_memory_parts["pinned_rounding"]
    assert rounding == pytest.approx(32 * 3 * 16 * MIB + 2 * (1024 * MIB - 128256 * 4096 * 2))
    assert est.pinned_bytes == pytest.approx(est.cpu_memory_parts["offloaded_weights"] + rounding)
