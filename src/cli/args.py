"""Arguments the hpi commands share, and the one error a user can cause.

Every command module builds its parser from these helpers and turns what it parsed into plain typed data
(a ModelSpec, a Plan, a Workload) through them, so each flag is declared and read in one place.
Importing this module stays cheap: no torch, no executor, no optuna (``hpi plan`` starts in a second).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from hpi.cli.errors import EXIT_USAGE, UsageError  # noqa: F401 - the commands import both from here
from hpi.planner.specs.knob import KnobField, display_order, knob_fields
from hpi.planner.specs.plan import Plan, missing_fields, type_problem
from hpi.planner.specs.workload import COMPUTE_DTYPES, DEFAULT_GEN_LEN, DEFAULT_PROMPT_LEN, FETCH_WAITS, Workload


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one ``UsageError`` line instead of usage + message."""

    def error(self, message: str) -> None:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# The largest whole number a flag takes: every integer below it is exact in a float64 (1e3, 5e7 are accepted).
MAX_WHOLE = 2**53


def _whole(text: str) -> int:
    """A whole number written as an integer or as an integral float (``5e7``); never inf, nan or 2.7."""
    try:
        value = int(text)
    except ValueError:
        try:
            real = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not math.isfinite(real):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number") from None
        if not real.is_integer():
            raise argparse.ArgumentTypeError(f"{text} is not a whole number") from None
        value = int(real)
    if abs(value) > MAX_WHOLE:
        raise argparse.ArgumentTypeError(f"{text} is too large (at most {MAX_WHOLE:.3g})")
    return value


def count(text: str) -> int:
    """A whole number >= 0 (seeds, element counts, warm-up steps)."""
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def positive(text: str) -> int:
    """A whole number >= 1 (degrees, batch, lengths, trials, slots)."""
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def port(text: str) -> int:
    """A TCP port, 1..65535."""
    value = _whole(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (1 to 65535)")
    return value


def any_port(text: str) -> int:
    """A TCP port to listen on, 0..65535 (0: any free one)."""
    value = _whole(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (0 to 65535; 0: any free one)")
    return value


def _real(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def finite(text: str) -> float:
    """A finite real number (its range checked where it is used)."""
    return _real(text)


def non_negative(text: str) -> float:
    """A finite real number >= 0 (fractions, temperatures, spreads)."""
    value = _real(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def seconds(text: str) -> float:
    """A finite duration > 0 in seconds (timeouts)."""
    value = _real(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0 seconds")
    return value


def fraction(text: str) -> float:
    """A finite number in [0, 1)."""
    value = _real(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0 and < 1")
    return value


def probability(text: str) -> float:
    """A finite number in (0, 1] (nucleus sampling's top-p)."""
    value = _real(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be > 0 and <= 1")
    return value


# ---- what is planned for ---------------------------------------------------------------------------------
def add_target(p: argparse.ArgumentParser, hardware_required: bool = True) -> None:
    """--model, --hardware, the workload's batch and lengths, --json."""
    p.add_argument("--model", required=True, help="catalogue name (hpi models) or path to a HF config.json")
    p.add_argument("--hardware", required=hardware_required, default=None,
                   help="profile name (hpi hardware) or path to a profile YAML"
                   + ("" if hardware_required else "; given, the plan is predicted and refused if infeasible"))
    for k in knob_fields(Plan):
        if k.spec.group == "target":  # the plan knobs named with the workload: --batch
            _add_knob_flag(p, k, default=k.default)
    p.add_argument("--prompt-len", type=positive, default=DEFAULT_PROMPT_LEN, help="prompt tokens (default 512)")
    p.add_argument("--gen-len", type=positive, default=DEFAULT_GEN_LEN, help="generated tokens (default 32)")
    p.add_argument("--json", action="store_true", help="print one JSON document")


def add_run_conditions(p: argparse.ArgumentParser) -> None:
    """What the run computes in and how it waits for ZeRO-3 fetches (Workload fields outside the Plan)."""
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default="bf16",
                   help="compute dtype (default bf16); fp16 takes DeepSpeed's fused 4-bit dequantization")
    p.add_argument("--fetch-wait", choices=FETCH_WAITS, default="event",
                   help="ZeRO-3 fetch wait: event (hpi's, default: the GPU waits for each parameter's own copy; "
                   "stream where dp > 1), stream (hpi's: the GPU waits for every copy queued) or host "
                   "(DeepSpeed's stock, host-synchronizing)")
    add_cuda_graph_flags(p, default=None, on_help="replay each decode step as a CUDA graph (default: wherever the "
                         "plan allows it: dense, GPU-resident, 16-bit, dp 1, KV cache on the GPU; run refuses it for "
                         "other plans)", off_help="decode eagerly, one kernel launch at a time")
    add_kernel_flags(p)


def add_kernel_flags(p: argparse.ArgumentParser) -> None:
    """--compile-decode / --fused-dequant / --skinny-gemm and their --no- forms into ``args.decode_compile`` /
    ``args.fused_dequant`` / ``args.skinny_gemm`` (None: neither given; runs then use them on a GPU where they apply:
    ``hpi.deployment``)."""
    for dest, flag, on_help, off_help in (
        ("decode_compile", "--compile-decode",
         "compile the graphed decode step with torch.compile before capturing it (default on a GPU wherever decode "
         "is graphed; paid once per shape, recorded as compile_s)", "capture the eager decode step"),
        ("fused_dequant", "--fused-dequant",
         "dequantize 8/4-bit weights with hpi's one fused kernel (default on a GPU for 8/4-bit plans)",
         "dequantize with DeepSpeed's element-wise torch ops"),
        ("skinny_gemm", "--skinny-gemm",
         "in the graphed decode step, run q/k/v and gate/up as one stacked product each and products of 2-16 rows in "
         "hpi's few-row kernel (default on a GPU wherever decode is graphed)", "run each product apart through torch"),
    ):
        pair = p.add_mutually_exclusive_group()
        pair.add_argument(flag, dest=dest, action="store_true", default=None, help=on_help)
        pair.add_argument(_switch_off(flag), dest=dest, action="store_false", help=off_help)


def add_cuda_graph_flags(p: argparse.ArgumentParser, *, default: bool | None, on_help: str, off_help: str) -> None:
    """--cuda-graphs / --no-cuda-graphs into ``args.decode_graphs`` (None: neither given, where default is None)."""
    graphs = p.add_mutually_exclusive_group()
    graphs.add_argument("--cuda-graphs", dest="decode_graphs", action="store_true", default=default, help=on_help)
    graphs.add_argument("--no-cuda-graphs", dest="decode_graphs", action="store_false", help=off_help)


def _switch_off(flag: str) -> str:
    return "--no-" + flag.removeprefix("--")


GIVEN_PLAN_FLAGS = "given_plan_flags"  # the Namespace attribute listing the plan flags given on the command line


class PlanFlag(argparse.Action):
    """A plan knob's flag: stores its value as argparse's "store" does, and notes that it was given (a plan flag
    beside --plan is refused: ``plan_from_args``)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, GIVEN_PLAN_FLAGS, (*getattr(namespace, GIVEN_PLAN_FLAGS, ()), option_string))


class _PlanSwitch(PlanFlag):
    """One side of a plan switch (--pin-memory / --no-pin-memory): stores ``const``."""

    def __init__(self, option_strings, dest, const=None, default=None, help=None) -> None:
        super().__init__(option_strings, dest, nargs=0, const=const, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        super().__call__(parser, namespace, self.const, option_string)


def _add_knob_flag(p: argparse.ArgumentParser, k: KnobField, default: Any) -> None:
    """The flag a knob declares (``Knob.flag``): a switch as --x / --no-x (None when neither is given), a choice
    knob with its choices, a number as a whole number (>= 1 where the knob's minimum is 1)."""
    spec = k.spec
    if spec.vector == "switch":
        pair = p.add_mutually_exclusive_group()
        pair.add_argument(spec.flag, dest=k.name, action=_PlanSwitch, const=True, default=None, help=spec.help)
        pair.add_argument(_switch_off(spec.flag), dest=k.name, action=_PlanSwitch, const=False)
        return
    kind = type(spec.choices[0]) if spec.choices else None  # argparse takes strings as given
    number = positive if (spec.minimum or 0) >= 1 else count
    p.add_argument(spec.flag, type=number if kind is None else (None if kind is str else kind), action=PlanFlag,
                   choices=spec.choices or None, default=default, metavar=spec.metavar, help=spec.help)


def add_plan_flags(p: argparse.ArgumentParser, for_search: bool, plan_type: type = Plan) -> None:
    """Plan flags: fixed values for predict/explain/run, restrictions of the search space for plan/autotune
    (the knobs with a ``search_axis``). Each comes from its knob's declaration (``hpi.planner.specs.knob``);
    ``add_target`` declares the knobs named with the workload (--batch)."""
    for k in knob_fields(plan_type):
        if k.spec.flag is None or k.spec.group == "target" or (for_search and k.spec.search_axis is None):
            continue
        _add_knob_flag(p, k, default=None if for_search or k.spec.flag_derived else k.default)
    if not for_search:
        p.add_argument("--plan", dest="plan_file", default=None, metavar="PLAN.json",
                       help="read the plan from JSON (a plan object, hpi plan --json's document or an entry of it, a "
                            "run record); it fixes every knob: plan flags beside it are refused")


def search_restrictions(args: argparse.Namespace, plan_type: type = Plan) -> dict[str, Any]:
    """The plan flags of a search command as ``SearchSpace.restrict`` keywords (None: not restricted)."""
    return {k.spec.search_axis: getattr(args, k.dest) for k in knob_fields(plan_type) if k.spec.search_axis}


# ---- from arguments to typed data ------------------------------------------------------------------------
def workload_from_args(args: argparse.Namespace) -> Workload:
    """The workload the arguments describe; the decode is priced as graphed, compiled and with hpi's stacked few-row
    products wherever a plan allows it unless --no-cuda-graphs / --no-compile-decode / --no-skinny-gemm, 8/4-bit
    weights as dequantized by the fused kernel unless --no-fused-dequant (what a run on a GPU does by default:
    ``hpi.deployment``)."""
    return Workload(args.prompt_len, args.gen_len, compute_dtype=getattr(args, "dtype", None) or "bf16",
                    fetch_wait=getattr(args, "fetch_wait", None) or "event",
                    decode_graphs=getattr(args, "decode_graphs", None) is not False,
                    decode_compile=getattr(args, "decode_compile", None) is not False,
                    fused_dequant=getattr(args, "fused_dequant", None) is not False,
                    skinny_gemm=getattr(args, "skinny_gemm", None) is not False)


def load_target(args: argparse.Namespace):
    """(ModelSpec, HardwareProfile, Workload) named by --model, --hardware and the workload flags."""
    from hpi.planner.catalog import load_model
    from hpi.planner.profiles import load_profile

    return load_model(args.model), load_profile(args.hardware), workload_from_args(args)


def _plan_entry(data: Any, path: str) -> tuple[Any, str]:
    """The plan object inside a plan file's document, and where it sits (for messages)."""
    where = path
    if isinstance(data, dict) and "plans" in data:
        plans = data["plans"]
        if not isinstance(plans, list):
            raise UsageError(f"{path}: plans is not a list of plans")
        if not plans:
            raise UsageError(f"{path}: its plans list is empty (hpi plan found none that fits): nothing to run; plan "
                             "again with other flags or another machine")
        data, where = plans[0], f"{path}: plans[0]"
    if isinstance(data, dict) and isinstance(data.get("plan"), dict):
        data, where = data["plan"], f"{where}: plan"
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a JSON object with the plan's fields, got {type(data).__name__}")
    return data, where


def read_plan_file(path: str, plan_type: type = Plan) -> dict[str, Any]:
    """The plan's fields from a JSON file: a plan object, ``hpi plan --json``'s document (its best plan) or
    an object with a ``plan`` entry (a RunRecord, ``best_plan.json``). Checked field by field: every knob
    present, none unknown, each of its type (the ranges: ``Plan.problems``)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise UsageError(f"cannot read plan {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"cannot read plan {path}: not a UTF-8 text file") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    except RecursionError:
        raise UsageError(f"{path}: JSON nested too deep to be a plan") from None
    data, where = _plan_entry(data, path)
    names = [k.name for k in knob_fields(plan_type)]
    problems = []
    unknown = sorted(set(data) - set(names))
    if unknown:
        problems.append(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(names)}")
    missing = missing_fields(plan_type, data)
    if missing:
        problems.append(f"missing field(s) {', '.join(missing)} (a plan file names every knob, as hpi plan --json's "
                        "entries and run records do)")
    problems += [problem for k in knob_fields(plan_type) if k.name in data
                 and (problem := type_problem(k, data[k.name]))]
    if problems:
        raise UsageError(f"{where}: " + "; ".join(problems))
    return data


def plan_from_file(args: argparse.Namespace, plan_type: type = Plan) -> Plan:
    """The plan --plan FILE holds; a plan flag given beside it is refused (the file fixes every knob)."""
    given = getattr(args, GIVEN_PLAN_FLAGS, ())
    if given:
        flags = ", ".join(dict.fromkeys(given))
        raise UsageError(f"{flags} given beside --plan {args.plan_file}: the plan file fixes every knob; drop "
                         f"{flags}, or drop --plan and name the plan with flags")
    data = read_plan_file(args.plan_file, plan_type)
    try:
        return plan_type.from_dict(data)
    except ValueError as e:
        raise UsageError(f"{args.plan_file}: {e}") from None


def _micro_batches(values: dict[str, Any], model) -> int:
    """As many micro-batches as stages, when the batch allows."""
    pp, per_replica = values["pp"], max(values["batch_size"] // max(values["dp"], 1), 1)
    return max(d for d in range(1, min(pp, per_replica) + 1) if per_replica % d == 0) if pp > 1 else 1


def _nvme_buffer_elems(values: dict[str, Any], model) -> int:
    """A buffer that fits the largest tensor partition, as the search sizes it."""
    from hpi.planner.search import nvme_buffer_elems_for

    return nvme_buffer_elems_for(model, max(values["tp"], 1), max(values["dp"], 1))


# How plan_from_args fills in each knob whose flag was not given (``Knob.flag_derived``).
DERIVED_KNOBS = {"micro_batches": _micro_batches, "nvme_buffer_elems": _nvme_buffer_elems}


def plan_from_args(args: argparse.Namespace, model, plan_type: type = Plan) -> Plan:
    """The one plan the flags (or --plan FILE) name: a knob whose flag was not given at its default, or derived
    (``Knob.flag_derived``: micro-batches, the NVMe buffer) from the others."""
    if args.plan_file:
        return plan_from_file(args, plan_type)
    given = {k.name: getattr(args, k.dest) if k.spec.flag else None for k in knob_fields(plan_type)}
    values = {k.name: k.default if v is None else v for k, v in zip(knob_fields(plan_type), given.values())}
    for k in knob_fields(plan_type):
        if given[k.name] is None and k.spec.flag_derived:
            values[k.name] = DERIVED_KNOBS[k.name](values, model)
    return plan_type(**values)


def pin_memory_given(args: argparse.Namespace) -> bool:
    """Whether --pin-memory was given on the command line (then pinning that would not fit is refused, not turned
    off: ``hpi.deployment.resolve_deployment``)."""
    return "--pin-memory" in getattr(args, GIVEN_PLAN_FLAGS, ())


PRESETS = ("latency", "balanced", "throughput")  # hpi.planner.presets.PRESET_NAMES (not imported: the CLI starts fast)


def add_preset_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="deploy a preset of hpi presets on --hardware (Latency: lowest decode step at batch 1; "
                        "Throughput: most tokens/s; Balanced: most tokens/s within 2x Latency's step); plan flags "
                        "beside it are refused")


def preset_plan(args: argparse.Namespace, model, who: str, *, concurrency: int, serving: bool = False) -> Plan:
    """The plan of preset ``args.preset`` (``hpi.planner.presets``) for the workload flags, with batches up to
    ``concurrency``; ``serving``: among the plans hpi serve can serve. Plan flags or --plan beside it are refused,
    and --hardware is needed (presets are chosen for a machine)."""
    given = [*dict.fromkeys(getattr(args, GIVEN_PLAN_FLAGS, ()))] + (["--plan"] if args.plan_file else [])
    if given:
        what = ", ".join(given)
        raise UsageError(f"{who}: {what} given beside --preset {args.preset}: the preset fixes every knob; drop "
                         f"{what}, or drop --preset")
    if not args.hardware:
        raise UsageError(f"{who}: --preset {args.preset} needs --hardware H: presets are chosen for a machine "
                         "(hpi hardware lists the profiles)")
    from hpi.planner.presets import select_presets
    from hpi.planner.profiles import load_profile

    chosen = select_presets(model, load_profile(args.hardware), workload_from_args(args), concurrency=concurrency,
                            serving=serving)
    return chosen.named(args.preset).plan


def _named(plan: Plan, k: KnobField) -> bool:
    """Whether plan_flags names knob ``k`` of ``plan`` (``Knob.named``)."""
    named = k.spec.named
    return named == "always" or (named == "changed" and getattr(plan, k.name) != k.default) or (
        named == "applies" and plan.applies(k.name))


def plan_flags(plan: Plan) -> str:
    """The flags that name ``plan`` on an hpi command line (the inverse of ``plan_from_args``), in the knobs'
    display order."""
    flags = []
    for k in display_order(type(plan)):
        if k.spec.flag is None or not _named(plan, k):
            continue
        value = getattr(plan, k.name)
        if k.spec.vector == "switch":
            flags.append(k.spec.flag if value else _switch_off(k.spec.flag))
        else:
            flags.append(f"{k.spec.flag} {value}")
    return " ".join(flags)
