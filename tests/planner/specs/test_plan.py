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


def test_gathers_is_offload_or_dp_and_zero3_adds_quantized_weights() -> None:
    assert not Plan().gathers and Plan().runs_without_zero3
    assert Plan(offload="cpu").gathers and Plan(offload="nvme").gathers and Plan(dp=2, batch_size=2).gathers
    # 8/4-bit weights on the GPU run under ZeRO-3 (DeepSpeed's quantized weights) but gather nothing per forward
    assert not Plan(weight_bits=4).gathers and not Plan(weight_bits=4).runs_without_zero3
    assert Plan(offload="cpu").copies_from_host_memory and Plan(kv_offload=True).copies_from_host_memory
    assert not Plan(offload="nvme").copies_from_host_memory


def test_can_graph_decode_is_the_absence_of_a_blocker() -> None:
    for plan in (Plan(), Plan(tp=2, pp=2), Plan(offload="cpu"), Plan(weight_bits=8), Plan(kv_offload=True),
                 Plan(dp=2, batch_size=2)):
        assert plan.can_graph_decode == (plan.graph_blocker is None)
    assert Plan(tp=4).can_graph_decode and not Plan(weight_bits=8).can_graph_decode


def test_key_is_the_canonical_json_kept_records_are_grouped_by() -> None:
    import json
    from dataclasses import asdict

    from hpi.planner.specs.plan import LATER_KNOBS
    from hpi.planner.specs.workload import Workload

    plan, workload = Plan(offload="cpu", batch_size=4), Workload(128, 8)
    # the form calibration's folds and the fidelity table have always used; knobs added later (the aio settings)
    # are left out at their defaults, so the keys of plans from before them do not change
    before = {name: value for name, value in plan.to_dict().items() if name not in LATER_KNOBS}
    assert plan.key("llama-3-8b", workload) == json.dumps(["llama-3-8b", asdict(workload), before], sort_keys=True)
    tuned = Plan(offload="nvme", aio_queue_depth=8)
    assert '"aio_queue_depth": 8' in tuned.key() and "aio_block_size_bytes" not in tuned.key()
    assert tuned.key() != Plan(offload="nvme").key()
    assert Plan().key() == (
        '[{"batch_size": 1, "dp": 1, "kv_offload": false, "max_live_elems": 1000000000, "micro_batches": 1, '
        '"nvme_buffer_count": 5, "nvme_buffer_elems": 100000000, "offload": "none", '
        '"persistence_threshold_elems": 100000, "pin_memory": true, "pp": 1, "prefetch_bucket_elems": 50000000, '
        '"tp": 1, "weight_bits": 16}]'
    )
    assert plan.key("a", workload) != plan.key("b", workload) != plan.with_(batch_size=8).key("b", workload)


def test_canonical_resets_exactly_the_knobs_that_change_nothing() -> None:
    resident = Plan(pin_memory=False, prefetch_bucket_elems=7, nvme_buffer_count=9)
    assert resident.canonical() == Plan()
    offloaded = Plan(offload="cpu", pin_memory=False, prefetch_bucket_elems=7, nvme_buffer_count=9)
    assert offloaded.canonical() == Plan(offload="cpu", pin_memory=False, prefetch_bucket_elems=7)
    nvme = Plan(offload="nvme", pin_memory=False, nvme_buffer_count=9)
    assert nvme.canonical() == Plan(offload="nvme", nvme_buffer_count=9)


def test_ds_examples_knobs_are_two_h_squared_and_h() -> None:
    from hpi.planner.specs.plan import ds_examples_knobs

    assert ds_examples_knobs(4096) == {"prefetch_bucket_elems": 33_554_432, "max_live_elems": 33_554_432,
                                       "persistence_threshold_elems": 4096}


def test_aio_knobs_round_trip_and_refuse_unaligned_blocks() -> None:
    import pytest

    plan = Plan(offload="nvme", aio_block_size_bytes=4 << 20, aio_queue_depth=32, aio_threads=4)
    assert Plan.from_dict(plan.to_dict()) == plan
    assert Plan.from_dict({k: v for k, v in plan.to_dict().items() if not k.startswith("aio_")}) == Plan(offload="nvme")
    with pytest.raises(ValueError, match=r"aio_block_size_bytes\(1050000\) % 4096 != 0: .* multiple of 4096"):
        Plan(offload="nvme", aio_block_size_bytes=1_050_000)
    with pytest.raises(ValueError, match="aio_queue_depth = 0 must be >= 1"):
        Plan(offload="nvme", aio_queue_depth=0)
    # they change nothing where nothing is read from NVMe: the canonical plan resets them
    assert Plan(offload="cpu", aio_queue_depth=8).canonical() == Plan(offload="cpu")
    assert Plan(offload="nvme", aio_queue_depth=8).canonical().aio_queue_depth == 8


def test_layer_leaves_are_refused_with_nvme_offload_and_named_where_they_apply() -> None:
    import pytest

    with pytest.raises(ValueError, match="zero3_leaf layer with offload nvme: .* use zero3_leaf module"):
        Plan(offload="nvme", zero3_leaf="layer")
    with pytest.raises(ValueError, match="zero3 leaf 'block' is not one of module, layer"):
        Plan(zero3_leaf="block")
    assert Plan(offload="cpu", zero3_leaf="layer").applies("zero3_leaf") and not Plan().applies("zero3_leaf")
    # a plan written before the knob existed ran DeepSpeed's per-module hooks: its key is what it was
    assert "zero3_leaf" not in Plan(offload="cpu").key()
    assert "zero3_leaf" in Plan(offload="cpu", zero3_leaf="layer").key()
