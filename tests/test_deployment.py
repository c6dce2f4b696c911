"""hpi.deployment: what a run is asked, resolved and checked before any process starts."""

from __future__ import annotations

import pytest

from hpi.deployment import DeploymentError, Nodes, decode_mode, resolve_deployment
from hpi.executor.spec import RunSpec
from hpi.planner.catalog import load_model
from hpi.planner.specs.plan import Plan

dense, moe = load_model("llama-3-8b"), load_model("mixtral-8x7b")


def spec(plan: Plan, device: str = "cuda", **kw) -> RunSpec:
    return RunSpec(plan=plan, model="llama-3-8b", device=device, **kw)


def test_hpi_run_graphs_by_default_only_where_they_can_run():
    assert decode_mode(spec(Plan(tp=2)), dense, None) is True
    assert decode_mode(spec(Plan(offload="cpu")), dense, None) is False
    assert decode_mode(spec(Plan(kv_offload=True)), dense, None) is False
    assert decode_mode(spec(Plan()), moe, None) is False
    assert decode_mode(spec(Plan(), "cpu"), dense, None) is False
    assert decode_mode(spec(Plan(), "cuda"), dense, False) is False
    assert decode_mode(spec(Plan(), "cpu"), dense, True) is True
    # asked for where it cannot run: refused before anything launches, in one line
    for model, plan, why in [(dense, Plan(offload="cpu"), "ZeRO-3"), (moe, Plan(), "expert routing")]:
        with pytest.raises(DeploymentError, match=f"CUDA graphs cannot run .*{why}.*drop --cuda-graphs"):
            decode_mode(spec(plan), model, True)


def test_resolution_fills_in_the_decode_mode_the_prediction_and_this_nodes_gpus():
    asked = RunSpec(plan=Plan(tp=4), model="llama-3-70b", hardware="h200-4gpu", extra={"argv": ["run"]})
    d = resolve_deployment(asked)
    assert d.spec.decode_graphs is True and d.spec.workload.decode_graphs is True  # graphs where the plan allows
    assert d.prediction is not None and d.prediction.feasible and d.prediction.workload.decode_graphs
    assert d.spec.extra == {"argv": ["run"], "predicted": d.prediction_summary}
    assert d.prediction_summary["decode_step_s"] == d.prediction.decode_step_s
    assert d.nproc_per_node == 4 and d.visible_gpus is None and d.warnings == ()
    eager = resolve_deployment(asked, decode_graphs=False)
    assert eager.spec.decode_graphs is False and eager.prediction.decode_step_s > d.prediction.decode_step_s


def test_an_infeasible_plan_is_refused_unless_forced_then_warned():
    asked = RunSpec(plan=Plan(), model="llama-3-70b", hardware="a6000-workstation")
    with pytest.raises(DeploymentError, match="infeasible on a6000-workstation.*GPU memory.*--force"):
        resolve_deployment(asked)
    forced = resolve_deployment(asked, force=True)
    assert not forced.prediction.feasible and len(forced.warnings) == 1 and "GPU memory" in forced.warnings[0]
    assert forced.spec.extra["predicted"]["feasible"] is False


@pytest.mark.parametrize("asked,nodes,needle", [
    (dict(mode="chat"), Nodes(), "--chat needs a prompt"),
    (dict(prompts=("hi",)), Nodes(), "text prompts need a tokenizer"),
    (dict(checkpoint="/no/such/ckpt"), Nodes(), "no such directory"),
    (dict(plan=Plan(tp=3)), Nodes(), "n_heads(4) % tp(3)"),
    (dict(), Nodes(nnodes=2, node_rank=2), "--node-rank 2 must be < --nnodes 2"),
])
def test_bad_asks_are_refused_in_one_line(asked, nodes, needle):
    base = dict(plan=Plan(), model="tiny-llama", device="cpu")
    with pytest.raises(DeploymentError) as e:
        resolve_deployment(RunSpec(**{**base, **asked}), nodes=nodes)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_plan_spanning_more_nodes_than_started_names_the_multi_node_flags():
    asked = RunSpec(plan=Plan(tp=8, pp=2), model="llama-3-70b", hardware="dgx-h100-x4-ib")
    with pytest.raises(DeploymentError, match="span 2 node.*--nnodes 2 --node-rank K"):
        resolve_deployment(asked)
    second = resolve_deployment(asked, nodes=Nodes(nnodes=2, node_rank=1, master_port=29500))
    assert second.nproc_per_node == 8
