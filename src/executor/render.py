"""Plan -> DeepSpeed config and launcher command lines. Pure: no torch, no deepspeed, no processes.

Everything here is data in, data out, and golden-file tested (``tests/executor/golden``).

**The DeepSpeed config** (``ds_config``) writes every knob the ZeRO-3 inference path reads, explicitly.
DeepSpeed 0.19.8 drops ``"auto"`` values silently (``DeepSpeedConfigModel.__init__``), its docs and code
disagree on defaults, nested pydantic models forbid unknown keys (``extra="forbid"``) while the ``aio``
block is a plain dict read key by key (an unknown key there, such as DeepSpeedExamples' ``thread_count``,
is ignored without a word). Keys and where 0.19.8 reads them:

- ``zero_optimization`` -> ``runtime/zero/config.py`` ``DeepSpeedZeroConfig``: ``stage``,
  ``stage3_prefetch_bucket_size`` (alias of ``prefetch_bucket_size``), ``stage3_max_live_parameters``,
  ``stage3_max_reuse_distance``, ``stage3_param_persistence_threshold``,
  ``stage3_model_persistence_threshold``, ``overlap_comm``, ``contiguous_gradients``, and with
  ``Plan.zero3_leaf`` layer ``leaf_module`` (``runtime/zero/leaf_module_config.py``: ``names``). Without an optimizer
  ``deepspeed.initialize`` builds ``DeepSpeedZeRoOffload`` (``runtime/engine.py``) from exactly these
  plus ``offload_param``; ``overlap_comm`` there picks the all-gather stream
  (``parameter_offload.py``: a side stream when true, so prefetch overlaps compute: keep it true).
- ``offload_param`` -> ``runtime/zero/offload_config.py`` ``DeepSpeedZeroOffloadParamConfig``: ``device``
  (none|cpu|nvme), ``nvme_path``, ``buffer_count``, ``buffer_size``, ``max_in_cpu``, ``pin_memory``.
- ``aio`` -> ``runtime/swap_tensor/aio_config.py`` / ``constants.py``: ``block_size``, ``queue_depth``,
  ``intra_op_parallelism`` (the thread count: NOT ``thread_count``), ``single_submit``,
  ``overlap_events``, ``use_gds``.
- ``bf16`` / ``fp16`` -> ``runtime/precision_config.py``: ``enabled``.
- ``weight_quantization`` -> ``runtime/config.py`` ``WeightQuantConfig(**param_dict['weight_quantization'])``;
  ``zero/partition_parameters.py`` reads its ``quantized_initialization`` dict, and
  ``inference/quantization/utils.py`` requires ``num_bits`` 4 or 8, ``symmetric`` false, ``group_size``,
  ``group_dim``.
- ``train_micro_batch_size_per_gpu`` + ``gradient_accumulation_steps``: DeepSpeed insists on batch keys even
  for inference; with these two it derives ``train_batch_size`` from the world size it sees (which depends
  on the mpu), so ``train_batch_size`` is deliberately not written.

No ``tensor_parallel`` block: DeepSpeed's AutoTP builds its own (dp, tp) mesh over the whole world and has
no pipeline axis (docs/measured-facts.md), so the worker builds its own TP groups; a worker wanting AutoTP for pp == 1
adds ``{"tensor_parallel": {"autotp_size": tp}}`` itself.

**The launcher** (``launch_command``, ``multinode_commands``) is torchrun (``python -m hpi.executor.torchrun``:
its store listens on the master address only) with a *static* rendezvous: global rank = (ranks on lower
nodes) + local rank, so rank r lands on the GPU the planner's placement put it on. (The c10d backend orders
nodes by their participant ids,
``dynamic_rendezvous.py`` ``sorted(state.participants)``, and ignores ``--node-rank``.)
"""

from __future__ import annotations

import re
import sys
from typing import Any, Mapping, Sequence

from hpi.planner.specs.placement import Placement
from hpi.planner.specs.plan import QUANT_GROUP_SIZE, Plan

__all__ = [
    "AIO_DEFAULTS", "aio_config", "DEFAULT_WORKER", "MULTICAST_OFF_ENV", "ds_config", "launch_command", "hostfile",
    "node_ranks", "multinode_commands",
]

DTYPES = ("bf16", "fp16", "fp32")

# aio for NVMe offload: block size, queue depth and thread count are plan knobs (Plan.aio_block_size_bytes,
# aio_queue_depth, aio_threads; the planner prices them from the probe's read grid, hpi.planner.cost.aio). The
# thread count's key is intra_op_parallelism (DeepSpeedExamples' ZeRO-Inference script writes thread_count,
# which 0.19.8 ignores). A block above 1 MiB also raises the smallest tensor swapped to NVMe at all
# (partitioned_param_swapper.py: min_aio_bytes = max(1 MiB, block_size)), so the planner refuses a block above
# the smallest partition it counts as swapped (feasibility ``aio_block_size``). The rest is fixed here.
AIO_FIXED: dict[str, Any] = {"single_submit": False, "overlap_events": True, "use_gds": False}


def aio_config(plan: Plan) -> dict[str, Any]:
    """DeepSpeed's ``aio`` section for ``plan`` (runtime/swap_tensor/aio_config.py reads every key)."""
    return {"block_size": plan.aio_block_size_bytes, "queue_depth": plan.aio_queue_depth,
            "intra_op_parallelism": plan.aio_threads, **AIO_FIXED}


# The aio section of a plan at its defaults: DeepSpeedExamples' queue depth 64 and 8 threads, DeepSpeed's 1 MiB.
AIO_DEFAULTS: dict[str, Any] = aio_config(Plan())

# DeepSpeed defaults written explicitly (runtime/zero/config.py, offload_config.py, 0.19.8).
MAX_IN_CPU_ELEMS = 1_000_000_000  # no effect for inference; written so no default is implied
MODEL_PERSISTENCE_ELEMS = sys.maxsize  # no cap on the total of persistent (never partitioned) small tensors

# Set for every launch: NVLink SHARP / multicast stays off (KINDS.md: the lent machines do not support it).
MULTICAST_OFF_ENV: dict[str, str] = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

DEFAULT_WORKER: tuple[str, ...] = ("-m", "hpi.executor.worker")  # what torchrun runs, before the spec path
RDZV_ID = "hpi"  # static rendezvous prefixes its store with this id: every node must use the same one


# ---- DeepSpeed config ---------------------------------------------------------------------------------


def zero3_leaf_names(stage_layers: int) -> list[str]:
    """``zero_optimization.leaf_module.names`` for a stage whose decoder layers are ZeRO-3 leaves: each layer's
    name in the stage (``hpi.executor.modeling``: ``layers.<i>``, numbered from 0 on every stage). DeepSpeed
    flags the named modules before it installs its hooks (runtime/engine.py ``_configure_distributed_model``,
    ``apply_zero_leaf_module_config``), so it hooks nothing inside a layer and gathers all of the layer's
    parameters when it enters it (runtime/zero/parameter_offload.py, ``z3_leaf_module``)."""
    if stage_layers < 1:
        raise ValueError(f"stage_layers {stage_layers} < 1: a stage with layer leaves holds at least one layer")
    return [f"layers.{i}" for i in range(stage_layers)]


def ds_config(plan: Plan, *, dtype: str, hidden_size: int, nvme_path: str | None = None,
              stage_layers: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config of ``plan`` for ZeRO stage 3 inference, every knob explicit.

    ``hidden_size`` sizes ``reduce_bucket_size`` (hidden², the rule transformers uses for ``"auto"``):
    unused without gradients, but DeepSpeed validates it (> 0) and it is written rather than implied.
    ``nvme_path`` is required when ``plan.offload == "nvme"``. ``stage_layers``: the decoder layers of the stage
    the config is for (the largest stage's for a config shown to the user), which ``plan.zero3_leaf`` layer
    names as leaf modules (``zero3_leaf_names``); None for ``zero.Init``, which reads no leaves.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if hidden_size < 1:
        raise ValueError(f"hidden_size {hidden_size} must be >= 1")
    if plan.offload == "nvme" and not nvme_path:
        raise ValueError("offload nvme needs an NVMe directory: pass --nvme-path DIR (a folder on the NVMe drive)")

    offload: dict[str, Any] = {
        "device": plan.offload,
        "pin_memory": plan.pin_memory,
        "buffer_count": plan.nvme_buffer_count,
        "buffer_size": plan.nvme_buffer_elems,
        "max_in_cpu": MAX_IN_CPU_ELEMS,
    }
    if plan.offload == "nvme":
        offload["nvme_path"] = str(nvme_path)

    zero: dict[str, Any] = {
        "stage": 3,
        "offload_param": offload,
        "stage3_prefetch_bucket_size": plan.prefetch_bucket_elems,
        "stage3_max_live_parameters": plan.max_live_elems,
        # A parameter kept for reuse stays live, so a reuse distance beyond max_live buys nothing; the two
        # are equal in DeepSpeed's defaults (1e9 and 1e9) and move together here.
        "stage3_max_reuse_distance": plan.max_live_elems,
        "stage3_param_persistence_threshold": plan.persistence_threshold_elems,
        "stage3_model_persistence_threshold": MODEL_PERSISTENCE_ELEMS,
        "overlap_comm": True,  # the inference path's all-gather stream: prefetch overlaps compute
        "contiguous_gradients": False,  # no gradients: no contiguous gradient buffer
        "reduce_bucket_size": hidden_size * hidden_size,
    }
    if plan.zero3_leaf == "layer" and stage_layers is not None:
        zero["leaf_module"] = {"names": zero3_leaf_names(stage_layers)}

    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 2_147_483_647,  # never: there are no optimizer steps
        "wall_clock_breakdown": False,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
    }
    if plan.offload == "nvme":
        cfg["aio"] = aio_config(plan)
    if plan.is_quantized:
        cfg["weight_quantization"] = {
            "quantized_initialization": {
                "num_bits": plan.weight_bits,
                "group_size": QUANT_GROUP_SIZE,
                "group_dim": 1,
                "symmetric": False,
            }
        }
    return cfg


# ---- torchrun -----------------------------------------------------------------------------------------


def launch_command(
    spec_path: str,
    *,
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int,
    log_dir: str,
    python: str = sys.executable,
    worker: Sequence[str] = DEFAULT_WORKER,
) -> list[str]:
    """``python -m hpi.executor.torchrun ... -m hpi.executor.worker <spec_path>`` for one node: torchrun with its
    rendezvous store listening on ``master_addr`` only (``hpi.executor.torchrun``).

    Static rendezvous at ``master_addr:master_port`` (the TCP store lives on node 0), no restarts (a failed
    rank fails the run), and ``--redirects 3 --tee 3``: each local rank's stdout and stderr land in
    ``<log_dir>/<rdzv id>_<random>/attempt_0/<local rank>/{stdout,stderr}.log`` and on the console,
    each console line prefixed by the launcher's ``TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE`` (``[rank<r>]:``).

    ``worker`` is what follows torchrun's own options, before the spec path: ``("-m", "hpi.executor.worker")``
    by default, a script path for tests.
    """
    for name, value in (("nproc_per_node", nproc_per_node), ("nnodes", nnodes)):
        if value < 1:
            raise ValueError(f"{name} = {value} must be >= 1")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"node_rank {node_rank} is outside 0..{nnodes - 1}")
    if not 0 < master_port < 65536:
        raise ValueError(f"master_port {master_port} is not a TCP port")
    return [
        python, "-m", "hpi.executor.torchrun",
        "--nnodes", str(nnodes),
        "--nproc-per-node", str(nproc_per_node),
        "--node-rank", str(node_rank),
        "--rdzv-backend", "static",
        "--rdzv-id", RDZV_ID,
        "--master-addr", master_addr,
        "--master-port", str(master_port),
        "--max-restarts", "0",
        "--log-dir", str(log_dir),
        "--redirects", "3",
        "--tee", "3",
        *worker,
        str(spec_path),
    ]


# ---- several nodes ------------------------------------------------------------------------------------

_GPU_NAME = re.compile(r"^n(\d+)\.gpu(\d+)$")


def _parse_gpu(name: str) -> tuple[int, int]:
    m = _GPU_NAME.match(name)
    if not m:
        raise ValueError(f"GPU name {name!r} is not of the form n<node>.gpu<index>")
    return int(m.group(1)), int(m.group(2))


def node_ranks(placement: Placement) -> dict[int, list[tuple[int, int]]]:
    """``{node: [(rank, gpu index), ...]}`` in rank order, for the nodes the placement uses.

    Static rendezvous numbers ranks node by node (node k's ranks follow those of nodes 0..k-1), so the
    placement must give each node one contiguous block of ranks, as ``hpi.planner.ranks.rank_gpus`` does.
    """
    nodes: dict[int, list[tuple[int, int]]] = {}
    last = -1
    for rank, gpu in enumerate(placement.rank_gpus):
        node, index = _parse_gpu(gpu)
        if node != last and node in nodes:
            raise ValueError(
                f"rank {rank} on {gpu} returns to node {node}: torchrun numbers ranks node by node, so each node "
                "needs one contiguous block of ranks"
            )
        nodes.setdefault(node, []).append((rank, index))
        last = node
    return nodes


def _check_plan(plan: Plan, placement: Placement) -> None:
    if (plan.tp, plan.pp, plan.dp) != (placement.tp, placement.pp, placement.dp):
        raise ValueError(
            f"plan tp({plan.tp}) pp({plan.pp}) dp({plan.dp}) != placement tp({placement.tp}) pp({placement.pp}) "
            f"dp({placement.dp}): place this plan (hpi.planner.ranks.place)"
        )


def _host_names(nodes: Sequence[int], hosts: Sequence[str] | None) -> dict[int, str]:
    if hosts is None:
        return {n: f"n{n}" for n in nodes}
    if len(hosts) < len(nodes):
        raise ValueError(f"the placement uses {len(nodes)} nodes but {len(hosts)} host(s) were given: "
                         "name one host per node")
    if len(set(hosts)) != len(hosts):
        raise ValueError("host names must be distinct")
    return {n: hosts[i] for i, n in enumerate(nodes)}


def hostfile(plan: Plan, placement: Placement, hosts: Sequence[str] | None = None) -> str:
    """A DeepSpeed-style hostfile (``host slots=N``, N = ranks on that host) for the placement's nodes.

    ``hosts`` names the machines in node order (node 0 first: it runs rank 0 and the rendezvous store);
    without it the placement's node names (n0, n1, ...) are written.
    """
    _check_plan(plan, placement)
    nodes = node_ranks(placement)
    names = _host_names(list(nodes), hosts)
    lines = [f"# hpi: {plan.label}; {placement.world_size} ranks on {len(nodes)} node(s), rank order tp-dp-pp"]
    for node, members in nodes.items():
        ranks = [r for r, _ in members]
        gpus = ",".join(str(i) for _, i in members)
        lines.append(f"# {names[node]}: ranks {ranks[0]}-{ranks[-1]} on GPUs {gpus}")
    lines += [f"{names[node]} slots={len(members)}" for node, members in nodes.items()]
    return "\n".join(lines) + "\n"


def multinode_commands(
    spec_path: str,
    placement: Placement,
    hosts: Sequence[str],
    master_port: int,
    *,
    log_dir: str = "logs",
    python: str = "python",
    worker: Sequence[str] = DEFAULT_WORKER,
    env: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """``{host: argv}``: the torchrun command to start on each host, node 0 (``hosts[0]``) first.

    Each argv begins with ``env CUDA_VISIBLE_DEVICES=<the placement's GPUs on that node, in rank order>``
    and the multicast-off variables, so local rank i drives the GPU the planner put global rank
    ``base + i`` on. The master address is ``hosts[0]``. Run the same ``spec_path`` on every host (a shared
    file system, or a copy at the same path).
    """
    nodes = node_ranks(placement)
    names = _host_names(list(nodes), hosts)
    master = names[next(iter(nodes))]
    commands: dict[str, list[str]] = {}
    for node_rank, (node, members) in enumerate(nodes.items()):
        visible = ",".join(str(i) for _, i in members)
        variables = {"CUDA_VISIBLE_DEVICES": visible, **MULTICAST_OFF_ENV, **(env or {})}
        argv = launch_command(
            spec_path,
            nproc_per_node=len(members),
            nnodes=len(nodes),
            node_rank=node_rank,
            master_addr=master,
            master_port=master_port,
            log_dir=f"{log_dir}/node{node_rank}",
            python=python,
            worker=worker,
        )
        commands[names[node]] = ["env", *(f"{k}={v}" for k, v in variables.items()), *argv]
    return commands
