"""hpi.executor.render: DeepSpeed configs and launcher commands, against golden files and DeepSpeed itself.

Regenerate the golden files after an intended change: ``HPI_UPDATE_GOLDEN=1 python -m pytest
tests/executor/test_render.py`` (then review the diff).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpi.executor.render import (
    AIO_DEFAULTS,
    DEFAULT_WORKER,
    MULTICAST_OFF_ENV,
    aio_config,
    ds_config,
    hostfile,
    launch_command,
    multinode_commands,
    node_ranks,
)
from hpi.planner.catalog import load_model
from hpi.planner.profiles import load_profile
from hpi.planner.ranks import place
from hpi.planner.search import nvme_buffer_elems_for
from hpi.planner.specs.plan import Plan
from hpi.planner.topology import build_topology

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("HPI_UPDATE_GOLDEN") == "1"


def check_golden(name: str, doc: dict) -> None:
    path = GOLDEN / f"{name}.json"
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.is_file(), f"missing golden file {path}: run with HPI_UPDATE_GOLDEN=1 to create it"
    expected = json.loads(path.read_text())
    assert json.loads(text) == expected, (f"{path.name} differs: rerun with HPI_UPDATE_GOLDEN=1 if the change is "
                                          "intended")


# ---- ds_config -------------------------------------------------------------------------------------------


def _examples_plan(model_name: str, **knobs) -> Plan:
    """DeepSpeedExamples' ZeRO-Inference knobs: prefetch 2*hidden^2, persistence = hidden."""
    h = load_model(model_name).hidden_size
    return Plan(prefetch_bucket_elems=2 * h * h, persistence_threshold_elems=h, **knobs)


DS_CASES = {
    "ds_none_bf16_tiny": (lambda: Plan(), "bf16", "tiny-llama", None),
    "ds_cpu_pinned_w4_llama3_70b": (lambda: _examples_plan("llama-3-70b", offload="cpu", weight_bits=4), "bf16",
                                    "llama-3-70b", None),
    "ds_cpu_pageable_w8_fp16_llama3_70b": (lambda: Plan(offload="cpu", weight_bits=8, pin_memory=False, kv_offload=True,
                                                        batch_size=16), "fp16", "llama-3-70b", None),
    "ds_nvme_w16_bf16_llama31_405b": (
        lambda: _examples_plan("llama-3.1-405b", offload="nvme", nvme_buffer_count=6,
                               nvme_buffer_elems=nvme_buffer_elems_for(load_model("llama-3.1-405b"), 1, 1)),
        "bf16", "llama-3.1-405b", "/local_nvme/hpi"),
    "ds_none_fp32_tp2_pp2": (lambda: Plan(tp=2, pp=2, batch_size=2, micro_batches=2), "fp32", "tiny-llama", None),
}


@pytest.mark.parametrize("name", sorted(DS_CASES))
def test_ds_config_golden(name):
    make_plan, dtype, model, nvme_path = DS_CASES[name]
    plan = make_plan()
    hidden = load_model(model).hidden_size
    cfg = ds_config(plan, dtype=dtype, hidden_size=hidden, nvme_path=nvme_path)
    check_golden(name, {"inputs": {"plan": plan.to_dict(), "dtype": dtype, "hidden_size": hidden,
                                   "nvme_path": nvme_path}, "ds_config": cfg})


def _all_configs():
    for offload, bits, pin, dtype in itertools.product(("none", "cpu", "nvme"), (16, 8, 4), (True, False),
                                                       ("bf16", "fp16", "fp32")):
        plan = Plan(offload=offload, weight_bits=bits, pin_memory=pin, prefetch_bucket_elems=2 * 4096**2,
                    max_live_elems=300_000_000, persistence_threshold_elems=4096, nvme_buffer_count=7,
                    nvme_buffer_elems=250_000_000)
        yield plan, dtype, ds_config(plan, dtype=dtype, hidden_size=4096, nvme_path="/tmp/hpi-nvme")


def test_every_knob_is_written_and_nothing_is_auto():
    for plan, dtype, cfg in _all_configs():
        text = json.dumps(cfg)
        assert '"auto"' not in text
        zero = cfg["zero_optimization"]
        assert zero["stage"] == 3 and zero["overlap_comm"] is True and zero["contiguous_gradients"] is False
        assert zero["offload_param"]["device"] == plan.offload
        assert zero["offload_param"]["pin_memory"] == plan.pin_memory
        assert ("nvme_path" in zero["offload_param"]) == (plan.offload == "nvme")
        assert ("aio" in cfg) == (plan.offload == "nvme")
        assert ("weight_quantization" in cfg) == (plan.weight_bits < 16)
        assert cfg["bf16"]["enabled"] == (dtype == "bf16") and cfg["fp16"]["enabled"] == (dtype == "fp16")
        assert "train_batch_size" not in cfg and "tensor_parallel" not in cfg


def test_bad_inputs_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="--nvme-path"):
        ds_config(Plan(offload="nvme"), dtype="bf16", hidden_size=64)
    with pytest.raises(ValueError, match="dtype"):
        ds_config(Plan(), dtype="int8", hidden_size=64)
    with pytest.raises(ValueError, match="hidden_size"):
        ds_config(Plan(), dtype="bf16", hidden_size=0)


@pytest.mark.deepspeed
def test_deepspeed_accepts_every_rendered_config_and_reads_back_every_value():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.swap_tensor.aio_config import AIO_DEFAULT_DICT

    # The aio block is read key by key (get_scalar_param): an unknown key would be dropped without a word.
    assert set(AIO_DEFAULTS) == set(AIO_DEFAULT_DICT)
    n = 0
    for plan, dtype, cfg in _all_configs():
        ds = DeepSpeedConfig(json.loads(json.dumps(cfg)))
        z, off = ds.zero_config, ds.zero_config.offload_param
        assert int(z.stage) == 3
        assert (off.device, off.pin_memory, off.buffer_count, off.buffer_size, off.max_in_cpu) == (
            plan.offload, plan.pin_memory, plan.nvme_buffer_count, plan.nvme_buffer_elems,
            cfg["zero_optimization"]["offload_param"]["max_in_cpu"])
        assert (str(off.nvme_path) if off.nvme_path else None) == (
            "/tmp/hpi-nvme" if plan.offload == "nvme" else None)
        assert z.prefetch_bucket_size == plan.prefetch_bucket_elems
        assert z.max_live_parameters == plan.max_live_elems
        assert z.max_reuse_distance == plan.max_live_elems
        assert z.param_persistence_threshold == plan.persistence_threshold_elems
        assert z.model_persistence_threshold == sys.maxsize
        assert z.overlap_comm is True and z.contiguous_gradients is False
        assert z.reduce_bucket_size == 4096 * 4096
        assert ds.bfloat16_config.enabled == (dtype == "bf16")
        assert ds.float16_config.enabled == (dtype == "fp16")
        assert ds.train_micro_batch_size_per_gpu == 1 and ds.gradient_accumulation_steps == 1
        if plan.offload == "nvme":
            assert ds.aio_config == cfg["aio"]
        if plan.weight_bits < 16:
            q = ds.weight_quantization_config.quantized_initialization
            assert q == {"num_bits": plan.weight_bits, "group_size": 64, "group_dim": 1, "symmetric": False}
        else:
            assert ds.weight_quantization_config is None
        n += 1
    assert n == 54

    # A misspelt knob is an error, not a silent default: what writing every key explicitly relies on.
    bad = ds_config(Plan(offload="cpu"), dtype="bf16", hidden_size=64)
    bad["zero_optimization"]["offload_param"]["pin_memmory"] = True
    with pytest.raises(Exception, match="pin_memmory"):
        DeepSpeedConfig(bad)


@pytest.mark.deepspeed
def test_deepspeed_reads_the_plans_aio_knobs():
    """The aio section is the plan's block size, queue depth and threads, as DeepSpeed's own reader takes them
    (runtime/swap_tensor/aio_config.py); the defaults are what every NVMe run was given before they were knobs."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    assert AIO_DEFAULTS == {"block_size": 1_048_576, "queue_depth": 64, "intra_op_parallelism": 8,
                            "single_submit": False, "overlap_events": True, "use_gds": False}
    plan = Plan(offload="nvme", aio_block_size_bytes=4 << 20, aio_queue_depth=128, aio_threads=2)
    cfg = ds_config(plan, dtype="bf16", hidden_size=64, nvme_path="/tmp/hpi-nvme")
    assert cfg["aio"] == aio_config(plan)
    read = DeepSpeedConfig(json.loads(json.dumps(cfg))).aio_config
    assert (read["block_size"], read["queue_depth"], read["intra_op_parallelism"]) == (4 << 20, 128, 2)
    assert "aio" not in ds_config(plan.with_(offload="cpu"), dtype="bf16", hidden_size=64)


@pytest.mark.deepspeed
def test_layer_leaves_name_each_layer_of_the_stage_as_deepspeed_reads_them():
    """zero3_leaf layer: DeepSpeed's leaf_module config names each decoder layer of the stage (``layers.<i>``), read
    back by its own config class; DeepSpeed's per-module default writes no leaf_module at all, nor does a config for
    zero.Init (no stage given)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.leaf_module_config import DEFAULT_LEAF_MODULE_CLASSES

    plan = Plan(offload="cpu", zero3_leaf="layer")
    cfg = ds_config(plan, dtype="bf16", hidden_size=64, stage_layers=3)
    assert cfg["zero_optimization"]["leaf_module"] == {"names": ["layers.0", "layers.1", "layers.2"]}
    leaves = DeepSpeedConfig(json.loads(json.dumps(cfg))).zero_config.leaf_module
    assert leaves.names == ["layers.0", "layers.1", "layers.2"] and leaves.classes == DEFAULT_LEAF_MODULE_CLASSES
    assert "leaf_module" not in ds_config(plan, dtype="bf16", hidden_size=64)["zero_optimization"]
    assert "leaf_module" not in ds_config(plan.with_(zero3_leaf="module"), dtype="bf16", hidden_size=64,
                                          stage_layers=3)["zero_optimization"]
    with pytest.raises(ValueError, match="stage_layers 0 < 1"):
        ds_config(plan, dtype="bf16", hidden_size=64, stage_layers=0)


@pytest.mark.deepspeed
def test_deepspeed_quantizer_takes_the_rendered_quantization():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    import torch
    from deepspeed.inference.quantization.utils import DeQuantizer, Quantizer

    torch.manual_seed(0)
    w = torch.randn(32, 256, dtype=torch.bfloat16)
    for bits, tol in ((8, 0.05), (4, 0.5)):
        q = ds_config(Plan(weight_bits=bits), dtype="bf16", hidden_size=256)["weight_quantization"]
        config = q["quantized_initialization"]
        packed, scale, minimum = Quantizer(config).quantize(w)
        back = DeQuantizer(config, torch.bfloat16).dequantize(packed, scale, minimum)
        assert back.shape == w.shape and (back - w).abs().max().item() < tol


# ---- launch command ------------------------------------------------------------------------------------


def test_launch_command_golden():
    argv = launch_command("runs/demo/spec.json", nproc_per_node=2, master_port=29500, log_dir="runs/demo/logs/node0",
                          python="python")
    multi = launch_command("/shared/run/spec.json", nproc_per_node=8, nnodes=4, node_rank=2, master_addr="h0",
                           master_port=29400, log_dir="/shared/run/logs/node2", python="python")
    check_golden("launch_single_node", {"argv": argv, "multi_node_rank2": multi})


def test_launch_command_refuses_nonsense():
    with pytest.raises(ValueError, match="node_rank"):
        launch_command("s.json", nproc_per_node=1, nnodes=2, node_rank=2, master_port=1, log_dir="l")
    with pytest.raises(ValueError, match="nproc_per_node"):
        launch_command("s.json", nproc_per_node=0, master_port=1, log_dir="l")
    with pytest.raises(ValueError, match="port"):
        launch_command("s.json", nproc_per_node=1, master_port=70000, log_dir="l")


def test_torchrun_parses_the_command_as_intended():
    pytest.importorskip("torch")
    from torch.distributed.run import parse_args

    argv = launch_command("/r/spec.json", nproc_per_node=4, nnodes=2, node_rank=1, master_addr="h0", master_port=29400,
                          log_dir="/r/logs/node1", python="python")
    assert argv[:3] == ["python", "-m", "hpi.executor.torchrun"]  # torchrun, its store bound to --master-addr
    args = parse_args(argv[3:])
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "4", 1)
    assert (args.rdzv_backend, args.master_addr, args.master_port) == ("static", "h0", 29400)
    assert (args.redirects, args.tee, args.log_dir, args.max_restarts) == ("3", "3", "/r/logs/node1", 0)
    assert args.module and args.training_script == "hpi.executor.worker"
    assert args.training_script_args == ["/r/spec.json"]
    assert DEFAULT_WORKER == ("-m", "hpi.executor.worker")


# ---- several nodes --------------------------------------------------------------------------------------


def _dgx4(**knobs):
    topo = build_topology(load_profile("dgx-h100-x4-ib"))
    plan = Plan(**knobs)
    return plan, place(plan, topo)


MULTI_CASES = {
    "multinode_tp8_pp4_dgx4": dict(tp=8, pp=4, batch_size=4, micro_batches=4),
    "multinode_tp8_pp2_dgx4": dict(tp=8, pp=2, batch_size=2, micro_batches=2),
    "multinode_tp4_pp3_uneven_dgx4": dict(tp=4, pp=3, batch_size=3, micro_batches=3),
}


@pytest.mark.parametrize("name", sorted(MULTI_CASES))
def test_hostfile_and_multinode_commands_golden(name):
    plan, placement = _dgx4(**MULTI_CASES[name])
    n_nodes = placement.nodes_used
    hosts = [f"dgx{i}" for i in range(n_nodes)]
    doc = {
        "plan": plan.to_dict(),
        "rank_gpus": list(placement.rank_gpus),
        "hostfile": hostfile(plan, placement, hosts).splitlines(),
        "hostfile_node_names": hostfile(plan, placement).splitlines(),
        "commands": multinode_commands("/shared/runs/x/spec.json", placement, hosts, 29400,
                                       log_dir="/shared/runs/x/logs"),
    }
    check_golden(name, doc)


def test_multinode_commands_cover_every_rank_once():
    plan, placement = _dgx4(tp=4, pp=3, batch_size=3, micro_batches=3)
    commands = multinode_commands("spec.json", placement, ["a", "b", "c"], 29400)
    assert list(commands) == ["a", "b"]  # 12 ranks: 8 on node 0, 4 on node 1; host c is not needed
    seen = []
    for node_rank, argv in enumerate(commands.values()):
        python_at = argv.index("hpi.executor.torchrun") - 2  # env VAR=... python -m hpi.executor.torchrun
        env = dict(a.split("=", 1) for a in argv[1:python_at])
        assert argv[0] == "env" and env.items() >= MULTICAST_OFF_ENV.items()
        nproc = int(argv[argv.index("--nproc-per-node") + 1])
        assert int(argv[argv.index("--node-rank") + 1]) == node_rank
        assert argv[argv.index("--master-addr") + 1] == "a"
        assert len(env["CUDA_VISIBLE_DEVICES"].split(",")) == nproc
        seen += [node_rank] * nproc
    assert len(seen) == placement.world_size == 12
    assert node_ranks(placement)[1] == [(8, 0), (9, 1), (10, 2), (11, 3)]


def test_multinode_refuses_too_few_hosts_and_a_mismatched_plan():
    plan, placement = _dgx4(tp=8, pp=4, batch_size=4, micro_batches=4)
    with pytest.raises(ValueError, match="4 nodes but 2 host"):
        multinode_commands("s.json", placement, ["a", "b"], 29400)
    with pytest.raises(ValueError, match="place this plan"):
        hostfile(Plan(tp=8, pp=2), placement)


@pytest.mark.deepspeed
def test_deepspeed_parses_the_hostfile():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    from deepspeed.launcher.runner import _parse_hostfile

    plan, placement = _dgx4(tp=4, pp=3, batch_size=3, micro_batches=3)
    pool = _parse_hostfile(hostfile(plan, placement, ["dgx0", "dgx1"]).splitlines())
    assert dict(pool) == {"dgx0": 8, "dgx1": 4}


def test_render_and_launch_import_no_torch():
    code = ("import sys, hpi.executor.render, hpi.executor.launch, hpi.executor.spec\n"
            "bad = [m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
