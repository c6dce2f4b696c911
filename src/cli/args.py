"""Arguments the hpi commands share, and the one error a user can cause.

Every command module builds its parser from these helpers and turns what it parsed into plain typed data
(a ModelSpec, a Plan, a Workload) through them, so each flag is declared and read in one place.
Importing this module stays cheap: no torch, no executor, no optuna (``hpi plan`` starts in a second).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from hpi.planner.specs.plan import DEEPSPEED_DEFAULT_PREFETCH_ELEMS, OFFLOAD_KINDS, WEIGHT_BITS, Plan
from hpi.planner.specs.workload import COMPUTE_DTYPES, DEFAULT_GEN_LEN, DEFAULT_PROMPT_LEN, FETCH_WAITS, Workload

EXIT_USAGE = 2


class UsageError(Exception):
    """Anything the user can fix: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one ``UsageError`` line instead of usage + message."""

    def error(self, message: str) -> None:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def count(text: str) -> int:
    """A whole number >= 0 (batch, lengths, degrees, element counts)."""
    try:
        value = int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def non_negative(text: str) -> float:
    """A real number >= 0 (seconds, fractions)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


# ---- what is planned for ---------------------------------------------------------------------------------
def add_target(p: argparse.ArgumentParser, hardware_required: bool = True) -> None:
    """--model, --hardware, the workload's batch and lengths, --json."""
    p.add_argument("--model", required=True, help="catalogue name (hpi models) or path to a HF config.json")
    p.add_argument("--hardware", required=hardware_required, default=None,
                   help="profile name (hpi hardware) or path to a profile YAML"
                   + ("" if hardware_required else "; given, the plan is predicted and refused if infeasible"))
    p.add_argument("--batch", type=count, default=1, help="batch size (default 1)")
    p.add_argument("--prompt-len", type=count, default=DEFAULT_PROMPT_LEN, help="prompt tokens (default 512)")
    p.add_argument("--gen-len", type=count, default=DEFAULT_GEN_LEN, help="generated tokens (default 32)")
    p.add_argument("--json", action="store_true", help="print one JSON document")


def add_run_conditions(p: argparse.ArgumentParser) -> None:
    """What the run computes in and how it waits for ZeRO-3 fetches (Workload fields outside the Plan)."""
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default="bf16",
                   help="compute dtype (default bf16); fp16 takes DeepSpeed's fused 4-bit dequantization")
    p.add_argument("--fetch-wait", choices=FETCH_WAITS, default="stream",
                   help="ZeRO-3 fetch wait: stream (hpi's, default) or host (DeepSpeed's stock, host-synchronizing)")
    add_cuda_graph_flags(p, default=None, on_help="replay each decode step as a CUDA graph (default: wherever the "
                         "plan allows it: dense, GPU-resident, 16-bit, dp 1, KV cache on the GPU; run refuses it for "
                         "other plans)", off_help="decode eagerly, one kernel launch at a time")


def add_cuda_graph_flags(p: argparse.ArgumentParser, *, default: bool | None, on_help: str, off_help: str) -> None:
    """--cuda-graphs / --no-cuda-graphs into ``args.decode_graphs`` (None: neither given, where default is None)."""
    graphs = p.add_mutually_exclusive_group()
    graphs.add_argument("--cuda-graphs", dest="decode_graphs", action="store_true", default=default, help=on_help)
    graphs.add_argument("--no-cuda-graphs", dest="decode_graphs", action="store_false", help=off_help)


def add_plan_flags(p: argparse.ArgumentParser, for_search: bool) -> None:
    """Plan flags: fixed values for predict/explain/run, restrictions of the search space for plan/autotune."""
    default = None if for_search else "none"
    p.add_argument("--offload", choices=OFFLOAD_KINDS, default=default, help="where ZeRO-3 keeps weights")
    p.add_argument("--tp", type=count, default=None if for_search else 1, help="tensor parallel degree")
    p.add_argument("--pp", type=count, default=None if for_search else 1, help="pipeline parallel degree")
    p.add_argument("--dp", type=count, default=None if for_search else 1, help="ZeRO-3 partition (data parallel) degree")
    p.add_argument("--quant-bits", type=int, choices=WEIGHT_BITS, default=None if for_search else 16)
    pin = p.add_mutually_exclusive_group()
    pin.add_argument("--pin-memory", dest="pin_memory", action="store_true", default=None)
    pin.add_argument("--no-pin-memory", dest="pin_memory", action="store_false")
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--kv-offload", dest="kv_offload", action="store_true", default=None, help="KV cache in CPU RAM")
    kv.add_argument("--no-kv-offload", dest="kv_offload", action="store_false")
    if not for_search:
        p.add_argument("--prefetch-bucket", type=count, default=DEEPSPEED_DEFAULT_PREFETCH_ELEMS,
                       metavar="ELEMS", help="stage3_prefetch_bucket_size (default 5e7)")
        p.add_argument("--micro-batches", type=count, default=None, help="pipeline micro-batches (default: pp)")
        p.add_argument("--max-live", type=count, default=Plan.max_live_elems, metavar="ELEMS")
        p.add_argument("--persistence-threshold", type=count, default=Plan.persistence_threshold_elems, metavar="ELEMS")
        p.add_argument("--nvme-buffer-count", type=count, default=Plan.nvme_buffer_count)
        p.add_argument("--nvme-buffer-size", type=count, default=None, metavar="ELEMS",
                       help="elements per NVMe buffer (default: fits the largest tensor)")
        p.add_argument("--plan", dest="plan_file", default=None, metavar="PLAN.json",
                       help="read the plan from JSON (a plan object, or an entry of hpi plan --json)")


def search_restrictions(args: argparse.Namespace) -> dict[str, Any]:
    """The plan flags of a search command as ``SearchSpace.restrict`` keywords (None: not restricted)."""
    return {"offloads": args.offload, "weight_bits": args.quant_bits, "tp": args.tp, "pp": args.pp, "dp": args.dp,
            "kv_offload": args.kv_offload, "pin_memory": args.pin_memory}


# ---- from arguments to typed data ------------------------------------------------------------------------
def workload_from_args(args: argparse.Namespace) -> Workload:
    """The workload the arguments describe; the decode is priced as graphed wherever a plan allows it unless
    --no-cuda-graphs."""
    return Workload(args.prompt_len, args.gen_len, compute_dtype=getattr(args, "dtype", None) or "bf16",
                    fetch_wait=getattr(args, "fetch_wait", None) or "stream",
                    decode_graphs=getattr(args, "decode_graphs", None) is not False)


def load_target(args: argparse.Namespace):
    """(ModelSpec, HardwareProfile, Workload) named by --model, --hardware and the workload flags."""
    from hpi.planner.catalog import load_model
    from hpi.planner.profiles import load_profile

    return load_model(args.model), load_profile(args.hardware), workload_from_args(args)


def read_plan_file(path: str) -> dict[str, Any]:
    """The plan's fields from a JSON file: a plan object, ``hpi plan --json``'s document (its best plan) or
    an object with a ``plan`` entry (a RunRecord, ``best_plan.json``)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise UsageError(f"cannot read plan {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    if isinstance(data, dict) and "plans" in data:
        data = data["plans"][0] if data["plans"] else {}
    if isinstance(data, dict) and isinstance(data.get("plan"), dict):
        data = data["plan"]
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object with the plan's fields")
    return data


def plan_from_args(args: argparse.Namespace, model) -> Plan:
    """The one plan the flags (or --plan FILE) name; derived knobs (micro-batches, the NVMe buffer) filled in."""
    from hpi.planner.search import nvme_buffer_elems_for

    if args.plan_file:
        return Plan.from_dict(read_plan_file(args.plan_file))
    per_replica = max(args.batch // max(args.dp, 1), 1)
    micro = args.micro_batches
    if micro is None:  # as many micro-batches as stages, when the batch allows
        micro = max(d for d in range(1, min(args.pp, per_replica) + 1) if per_replica % d == 0) if args.pp > 1 else 1
    nvme_buffer = args.nvme_buffer_size
    if nvme_buffer is None:
        nvme_buffer = nvme_buffer_elems_for(model, max(args.tp, 1), max(args.dp, 1))
    return Plan(
        offload=args.offload,
        tp=args.tp,
        pp=args.pp,
        dp=args.dp,
        weight_bits=args.quant_bits,
        pin_memory=True if args.pin_memory is None else args.pin_memory,
        kv_offload=bool(args.kv_offload),
        batch_size=args.batch,
        micro_batches=micro,
        prefetch_bucket_elems=args.prefetch_bucket,
        max_live_elems=args.max_live,
        persistence_threshold_elems=args.persistence_threshold,
        nvme_buffer_count=args.nvme_buffer_count,
        nvme_buffer_elems=nvme_buffer,
    )


def plan_flags(plan: Plan) -> str:
    """The flags that name ``plan`` on an hpi command line (the inverse of ``plan_from_args``)."""
    flags = [f"--offload {plan.offload}", f"--tp {plan.tp}", f"--pp {plan.pp}", f"--dp {plan.dp}",
             f"--quant-bits {plan.weight_bits}", f"--batch {plan.batch_size}",
             "--pin-memory" if plan.pin_memory else "--no-pin-memory"]
    if plan.kv_offload:
        flags.append("--kv-offload")
    if plan.pp > 1:
        flags.append(f"--micro-batches {plan.micro_batches}")
    if plan.prefetch_bucket_elems != DEEPSPEED_DEFAULT_PREFETCH_ELEMS:
        flags.append(f"--prefetch-bucket {plan.prefetch_bucket_elems}")
    return " ".join(flags)
