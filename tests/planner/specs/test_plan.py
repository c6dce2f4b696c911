"""specs.plan: which plans (and models) can decode as CUDA graphs."""

from __future__ import annotations

from hpi.planner.catalog import load_model
from hpi.planner.specs.plan import Plan, decode_graph_blocker


def test_graph_blockers_name_what_keeps_python_in_the_step() -> None:
    dense, moe = load_model("llama-3-8b"), load_model("mixtral-8x7b")
    assert Plan(tp=2, pp=2).graph_blocker is None and decode_graph_blocker(Plan(tp=2, pp=2), dense) is None
    for plan in (Plan(offload="cpu"), Plan(offload="nvme"), Plan(weight_bits=4), Plan(dp=2, batch_size=2)):
        assert not plan.runs_without_zero3 and "ZeRO-3" in plan.graph_blocker
        assert decode_graph_blocker(plan, dense) == plan.graph_blocker
    assert "KV cache" in Plan(kv_offload=True).graph_blocker
    assert decode_graph_blocker(Plan(), moe) == "mixtral-8x7b's expert routing synchronizes the host"
