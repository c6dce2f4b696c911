"""A Plan: one point of the search space, the whole of what the executor needs to deploy.

Like FlexGen's ``Policy``, this small frozen record *is* the search space. It is hashable and round-trips
through JSON (``to_dict`` / ``from_dict``), which is how it crosses to the executor and back in RunRecords.
Each field is declared once, with its ``Knob`` (``hpi.planner.specs.knob``): unit, valid values, flag, help,
how the cost model vectorises it, when it applies. Validation, the label, the cost model's arrays, the
search grid and the command-line flags derive from those declarations.

The rules that several parts apply (which plans ZeRO-3 gathers weights in, which copy from host memory,
what keeps a decode step out of a CUDA graph) are written once below, as functions that take plain values
or numpy arrays alike: the Plan's properties call them on its fields, the cost model on arrays of plans.

Rank order is declared once, in ``hpi.planner.ranks``: tp innermost, then dp, then pp.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from typing import Any

from hpi.planner.specs.knob import KnobField, display_order, knob, knob_fields, knob_named

OFFLOAD_KINDS = ("none", "cpu", "nvme")
WEIGHT_BITS = (16, 8, 4)

# DeepSpeed's own default for stage3_prefetch_bucket_size (5e7 elements); DeepSpeedExamples'
# ZeRO-Inference script uses 2 * hidden^2 instead (``ds_examples_knobs``).
DEEPSPEED_DEFAULT_PREFETCH_ELEMS = 50_000_000
DEEPSPEED_DEFAULT_MAX_LIVE_ELEMS = 1_000_000_000
DEEPSPEED_DEFAULT_PERSISTENCE_ELEMS = 100_000
QUANT_GROUP_SIZE = 64  # DeepSpeed ZeRO-Inference quantized_initialization group_size
# O_DIRECT reads need offsets and sizes aligned to the logical block; DeepSpeed aligns to 1 KiB x threads
# (swap_tensor/utils.py AIO_ALIGNED_BYTES) but 4 KiB sectors are common, so block sizes are whole 4 KiB pages.
O_DIRECT_ALIGN_BYTES = 4096
AIO_DEFAULT_BLOCK_BYTES = 1_048_576  # DeepSpeed's aio.block_size default (swap_tensor/constants.py)
# ZeRO-3's unit of gathering: ``module``, DeepSpeed's own (a pre- and post-forward hook on every submodule, each
# gathering its own parameters), or ``layer`` (each decoder layer one leaf module, DeepSpeed's ``leaf_module``
# config: one hook pair a layer, all its parameters gathered at once; hpi.executor.render).
ZERO3_LEAVES = ("module", "layer")


def reject_unknown_fields(cls, data: dict[str, Any], what: str) -> None:
    """A record read from JSON must not carry fields the dataclass does not know (a typo would be lost)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{what} has unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


_TYPE_WORDS = {bool: "true or false", int: "a whole number", str: "a string"}


def type_problem(k: KnobField, value: Any) -> str | None:
    """Why ``value`` cannot be knob ``k``'s value (its default's type: a bool, a whole number, a string), or None.
    A plan read from JSON can hold anything: "two" for tp, 2.5, true, null."""
    want = type(k.default)
    if want is bool:
        ok = isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", None) == "b"  # numpy bools
    elif want is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    else:
        ok = isinstance(value, want)
    if ok:
        return None
    return f"{k.name} is {json.dumps(value, default=repr)}, expected {_TYPE_WORDS.get(want, want.__name__)}"


# Knobs added after plan files and run records were first written: a file without them ran at their defaults
# (hpi.executor.render wrote the same aio section for every NVMe run before they were knobs), so it may omit them.
LATER_KNOBS = ("aio_block_size_bytes", "aio_queue_depth", "aio_threads", "zero3_leaf")


def missing_fields(cls, data: dict[str, Any]) -> list[str]:
    """The fields of dataclass ``cls`` that ``data`` lacks (a plan file must name every knob but ``LATER_KNOBS``)."""
    return [f.name for f in fields(cls) if f.name not in data and f.name not in LATER_KNOBS]


def ds_examples_knobs(hidden_size: int) -> dict[str, int]:
    """DeepSpeedExamples' ZeRO-Inference knobs (its run_model.py), as Plan fields: prefetch bucket = max live
    = 2 h^2, persistence threshold = h."""
    two_h2 = 2 * hidden_size * hidden_size
    return {"prefetch_bucket_elems": two_h2, "max_live_elems": two_h2, "persistence_threshold_elems": hidden_size}


# ---- rules, each written once for one plan (plain values) or many (numpy arrays) ----------------------------
def gathers_weights(offloaded, dp):
    """ZeRO-3 gathers every module's weights before its forward (its prefetch knobs matter): offloaded, or
    partitioned over dp > 1."""
    return offloaded | (dp > 1)


def leaf_choices(offload_nvme: bool) -> tuple[str, ...]:
    """The ``Plan.zero3_leaf`` values a plan may take: module only with NVMe offload, where DeepSpeed swaps a leaf's
    parameters in together, one swap buffer each (``Plan.problems`` says so)."""
    return ("module",) if offload_nvme else ZERO3_LEAVES


def chooses_leaf(offloaded, offload_nvme, dp):
    """ZeRO-3's leaf granularity (``Plan.zero3_leaf``) is a choice: it gathers (``gathers_weights``), and not from
    NVMe (``leaf_choices``). Bools or bool arrays (``x ^ True`` negates both, where ``~`` would turn a Python bool
    into -1 or -2)."""
    return gathers_weights(offloaded, dp) & (offload_nvme ^ True)


def orders_copies(offload_nvme, dp):
    """Where ``Workload.fetch_wait`` event orders each gathered parameter's reads after its own copy
    (``hpi.executor.zero3.copy_ordered_fetch``): a partition group of one rank (with dp > 1 the gathers are DeepSpeed's
    all-gather handles, which it does not record) and not NVMe (the swapper hands each read's pinned buffer back when
    the host releases the module; only the stream-ordered wait's host bound has been run with that reuse). Elsewhere
    the run keeps the stream-ordered wait. Bools or bool arrays (``chooses_leaf``)."""
    return (dp == 1) & (offload_nvme ^ True)


def runs_zero3(offloaded, dp, weight_bits):
    """The executor runs the stage under ZeRO-3: to gather weights (``gathers_weights``) and for DeepSpeed's
    quantized weights (``hpi.executor.worker.uses_deepspeed``)."""
    return gathers_weights(offloaded, dp) | (weight_bits < 16)


def copies_from_host(offload_cpu, kv_offload):
    """Weights or the KV cache are copied from CPU RAM every step: where pinning the host memory matters."""
    return offload_cpu | kv_offload


def decode_graph_blockers(offloaded, dp, weight_bits, kv_offload) -> tuple[tuple[str, Any], ...]:
    """What keeps a plan's decode step from replaying as a CUDA graph (``Workload.decode_graphs``): (why,
    condition) pairs. A replay skips Python, where ZeRO-3's gather hooks and the offloaded cache's copies
    live. ``Plan.graph_blocker`` names the first that holds; ``cost.overhead.graphed_forwards`` prices a
    graph where none does."""
    return (
        ("ZeRO-3 gathers weights from Python hooks (offload, dp > 1 or 8/4-bit weights)",
         runs_zero3(offloaded, dp, weight_bits)),
        ("the offloaded KV cache is copied by Python each layer", kv_offload),
    )


def serve_blocker(kv_offload, dp) -> str | None:
    """Why ``hpi serve`` cannot serve a plan, or None: its slot cache keeps the KV cache on the GPU, and a step runs
    one replica (``hpi.executor.engine``: stage 0 is ranks 0..tp-1). ``hpi serve`` refuses such a plan; its
    presets are chosen without them (``hpi.planner.presets.SERVING``)."""
    if kv_offload:
        return "hpi serve keeps the KV cache on the GPU in its slot cache: drop --kv-offload"
    if dp > 1:
        return f"hpi serve runs dp 1 (one replica per step); the plan has dp {dp}: use --tp/--pp"
    return None


def model_serve_blocker(model) -> str | None:
    """Why ``hpi serve`` cannot serve ``model`` (a ModelSpec) in any plan, or None: multi-head latent attention
    caches one compressed latent per token, which the slot cache (``hpi.executor.slots``) would re-expand through
    kv_b_proj for every slot's whole length at every layer and step, and whose value width (v_head_dim) its
    attention does not take apart from the query's."""
    if model.uses_mla:
        return (f"hpi serve cannot serve {model.name} yet: its latent attention (MLA) cache is not in hpi serve's "
                "slot cache; run it with hpi run")
    return None


def model_graph_blocker(model) -> str | None:
    """Why no plan of ``model`` (a ModelSpec) can decode as a CUDA graph, or None: a mixture of experts, whose
    routing in transformers reads the experts each token picked back to the host."""
    return f"{model.name}'s expert routing synchronizes the host" if model.is_moe else None


def _where(plan: "Plan") -> str:
    """The label's first token: where weights (and the KV cache) live, and how host memory is held."""
    host = (" pinned" if plan.pin_memory else " pageable") if plan.copies_from_host_memory else ""
    return plan.offload + ("+kv" if plan.kv_offload else "") + host


def _leaf(plan: "Plan") -> str:
    """``layer-leaves`` where ZeRO-3 gathers a decoder layer at once; DeepSpeed's per-module default adds no token,
    so every label written before the knob reads as it did."""
    return "layer-leaves" if plan.zero3_leaf == "layer" else ""


@dataclass(frozen=True)
class Plan:
    """The knobs of one deployment, each declared once with ``knob`` (``hpi.planner.specs.knob``)."""

    # where ZeRO-3 keeps the weights between uses: none (GPU), cpu, nvme
    offload: str = knob("none", group="build", choices=OFFLOAD_KINDS, flag="--offload",
                        help="where ZeRO-3 keeps weights", search_axis="offloads", vector="one_hot", named="always",
                        label=_where)
    tp: int = knob(1, group="build", unit="ranks", minimum=1, flag="--tp", help="tensor parallel degree",
                   search_axis="tp", vector="degree", named="always", label="tp{}")
    pp: int = knob(1, group="build", unit="ranks", minimum=1, flag="--pp", help="pipeline parallel degree",
                   search_axis="pp", vector="degree", named="always", label="pp{}")
    dp: int = knob(1, group="build", unit="ranks", minimum=1, flag="--dp",
                   help="ZeRO-3 partition (data parallel) degree", search_axis="dp", vector="degree", named="always",
                   label="dp{}")
    weight_bits: int = knob(16, group="build", unit="bits", choices=WEIGHT_BITS, flag="--quant-bits",
                            search_axis="weight_bits", named="always", label="w{}")
    pin_memory: bool = knob(True, group="runtime", flag="--pin-memory", search_axis="pin_memory", vector="switch",
                            named="always", applies="copies_from_host_memory")
    kv_offload: bool = knob(False, group="runtime", flag="--kv-offload", help="KV cache in CPU RAM",
                            search_axis="kv_offload", vector="switch")
    batch_size: int = knob(1, group="target", unit="sequences", minimum=1, flag="--batch",
                           help="batch size (default 1)", named="always", label="b{}")
    # pipeline micro-batches per step (1 when pp == 1)
    micro_batches: int = knob(1, group="runtime", unit="micro-batches", minimum=1, flag="--micro-batches",
                              help="pipeline micro-batches (default: pp)", flag_derived=True, named="applies",
                              applies="is_pipelined", label="mb{}")
    prefetch_bucket_elems: int = knob(DEEPSPEED_DEFAULT_PREFETCH_ELEMS, group="runtime", unit="elements", minimum=0,
                                      flag="--prefetch-bucket", metavar="ELEMS",
                                      help="stage3_prefetch_bucket_size (default 5e7), in DeepSpeed's stored elements: "
                                           "a 4-bit weight counts 0.28, an 8-bit one 0.53", applies="gathers")
    max_live_elems: int = knob(DEEPSPEED_DEFAULT_MAX_LIVE_ELEMS, group="runtime", unit="elements", minimum=0,
                               flag="--max-live", metavar="ELEMS", applies="gathers")
    persistence_threshold_elems: int = knob(DEEPSPEED_DEFAULT_PERSISTENCE_ELEMS, group="runtime", unit="elements",
                                            minimum=0, flag="--persistence-threshold", metavar="ELEMS",
                                            applies="gathers")
    zero3_leaf: str = knob("module", group="runtime", choices=ZERO3_LEAVES, flag="--zero3-leaf",
                           help="ZeRO-3's unit of gathering: module (DeepSpeed's: every submodule) or layer "
                                "(each decoder layer at once: fewer hooks, larger gathers)",
                           search_axis="zero3_leaves", vector="one_hot", applies="gathers", label=_leaf)
    nvme_buffer_count: int = knob(5, group="runtime", unit="buffers", minimum=1, flag="--nvme-buffer-count",
                                  applies="offloads_to_nvme")
    # Not named by plan_flags: plan_from_args derives the size the search uses (search.nvme_buffer_elems_for).
    nvme_buffer_elems: int = knob(100_000_000, group="runtime", unit="elements", minimum=1, flag="--nvme-buffer-size",
                                  metavar="ELEMS", help="elements per NVMe buffer (default: fits the largest tensor)",
                                  flag_derived=True, named="never", applies="offloads_to_nvme")
    # DeepSpeed's aio (runtime/swap_tensor/aio_config.py): each of aio_threads threads reads its 1/threads of a
    # partition in blocks of aio_block_size_bytes, aio_queue_depth blocks in flight (csrc/aio/common
    # deepspeed_aio_common.cpp ``_do_io_submit_blocks``). Defaults: hpi.executor.render's DeepSpeedExamples values.
    aio_block_size_bytes: int = knob(AIO_DEFAULT_BLOCK_BYTES, group="runtime", unit="bytes",
                                     minimum=O_DIRECT_ALIGN_BYTES, flag="--aio-block-size", metavar="BYTES",
                                     help="aio.block_size: bytes per NVMe read request (default 1 MiB)",
                                     applies="offloads_to_nvme")
    aio_queue_depth: int = knob(64, group="runtime", unit="requests", minimum=1, flag="--aio-queue-depth",
                                help="aio.queue_depth: read requests in flight per aio thread (default 64)",
                                applies="offloads_to_nvme")
    aio_threads: int = knob(8, group="runtime", unit="threads", minimum=1, flag="--aio-threads",
                            help="aio.intra_op_parallelism: threads splitting each NVMe read (default 8)",
                            applies="offloads_to_nvme")

    def __post_init__(self) -> None:
        problems = list(self.problems())
        if problems:
            raise ValueError(problems[0])

    def problems(self):
        """Self-contained consistency errors, each quoting the failing rule and the fix."""
        wrong_types = [problem for k in knob_fields(type(self)) if (problem := type_problem(k, getattr(self, k.name)))]
        if wrong_types:  # the rules below compare numbers: they cannot be checked on a string
            yield from wrong_types
            return
        out_of_range = False
        for k in knob_fields(type(self)):
            value = getattr(self, k.name)
            if k.spec.choices and value not in k.spec.choices:
                yield f"{k.name.replace('_', ' ')} {value!r} is not one of {', '.join(map(str, k.spec.choices))}"
            elif k.spec.minimum is not None and value < k.spec.minimum:
                out_of_range = True
                yield f"{k.name} = {value} must be >= {k.spec.minimum}"
        if out_of_range:  # the rules below divide by the degrees
            return
        if self.batch_size % self.dp:
            yield f"batch({self.batch_size}) % dp({self.dp}) != 0: make the batch a multiple of dp"
        elif (self.batch_size // self.dp) % self.micro_batches:
            yield (
                f"batch per replica({self.batch_size // self.dp}) % micro_batches({self.micro_batches}) != 0: "
                "use a micro-batch count that divides the batch"
            )
        if self.pp == 1 and self.micro_batches != 1:
            yield f"micro_batches({self.micro_batches}) > 1 needs pp > 1: set micro_batches 1"
        if self.zero3_leaf in ZERO3_LEAVES and self.zero3_leaf not in leaf_choices(self.offload == "nvme"):
            yield ("zero3_leaf layer with offload nvme: DeepSpeed swaps a leaf's parameters in together, one swap "
                   "buffer each, so a layer leaf would need a buffer per parameter of a layer: use zero3_leaf module "
                   "with NVMe offload")
        if self.aio_block_size_bytes % O_DIRECT_ALIGN_BYTES:
            yield (f"aio_block_size_bytes({self.aio_block_size_bytes}) % {O_DIRECT_ALIGN_BYTES} != 0: O_DIRECT reads "
                   f"whole {O_DIRECT_ALIGN_BYTES}-byte pages; use a multiple of {O_DIRECT_ALIGN_BYTES}, e.g. 1048576")

    # ---- derived ----------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def is_offloaded(self) -> bool:
        return self.offload != "none"

    @property
    def offloads_to_nvme(self) -> bool:
        return self.offload == "nvme"

    @property
    def is_tensor_parallel(self) -> bool:
        return self.tp > 1

    @property
    def is_pipelined(self) -> bool:
        return self.pp > 1

    @property
    def is_quantized(self) -> bool:
        return self.weight_bits < 16

    @property
    def gathers(self) -> bool:
        """ZeRO-3 gathers weights every forward, so its prefetch knobs matter (``gathers_weights``)."""
        return bool(gathers_weights(self.is_offloaded, self.dp))

    @property
    def runs_without_zero3(self) -> bool:
        """Whether the executor runs the stage as plain PyTorch (``runs_zero3``)."""
        return not runs_zero3(self.is_offloaded, self.dp, self.weight_bits)

    @property
    def graph_blocker(self) -> str | None:
        """Why the decode step of this plan cannot be a CUDA graph (``decode_graph_blockers``), or None. The
        model can block it too: ``decode_graph_blocker``."""
        blockers = decode_graph_blockers(self.is_offloaded, self.dp, self.weight_bits, self.kv_offload)
        return next((why for why, holds in blockers if holds), None)

    @property
    def can_graph_decode(self) -> bool:
        return self.graph_blocker is None

    @property
    def batch_per_replica(self) -> int:
        return self.batch_size // self.dp

    @property
    def micro_batch_size(self) -> int:
        return self.batch_per_replica // self.micro_batches

    @property
    def copies_from_host_memory(self) -> bool:
        """Whether pin_memory matters (``copies_from_host``)."""
        return bool(copies_from_host(self.offload == "cpu", self.kv_offload))

    def applies(self, name: str) -> bool:
        """Whether knob ``name`` changes anything in this plan (its ``Knob.applies`` property)."""
        prop = knob_named(type(self), name).spec.applies
        return prop is None or bool(getattr(self, prop))

    @property
    def label(self) -> str:
        """A short human label, e.g. ``cpu+kv pinned tp2 pp1 dp1 w4 b16``: each knob's ``label`` token, where
        the knob applies, in display order."""
        tokens = []
        for k in display_order(type(self)):
            if k.spec.label is None or not self.applies(k.name):
                continue
            fmt = k.spec.label
            tokens.append(fmt.format(getattr(self, k.name)) if isinstance(fmt, str) else fmt(self))
        return " ".join(t for t in tokens if t)

    # ---- identity ---------------------------------------------------------------------------------
    def key(self, *context: Any) -> str:
        """This plan's identity, a string: its every field as canonical JSON, after whatever else names the run
        (a model name, a Workload: runs of one plan of one model under one workload share
        ``plan.key(model.name, workload)``, and calibration holds them out together). Kept records' folds and
        the fidelity table group by it: its form must not change."""
        named = [asdict(c) if is_dataclass(c) else c for c in context]
        return json.dumps([*named, self._key_fields()], sort_keys=True)

    def _key_fields(self) -> dict[str, Any]:
        """Every field but a ``LATER_KNOBS`` knob at its default: the keys of plans written before those knobs
        existed (which ran at their defaults) stay what they were."""
        defaults = {k.name: k.default for k in knob_fields(type(self)) if k.name in LATER_KNOBS}
        return {name: value for name, value in self.to_dict().items()
                if name not in defaults or value != defaults[name]}

    def canonical(self) -> "Plan":
        """The plan with each knob that changes nothing here (``Knob.applies``) at its default: plans that run
        identically have the same canonical plan."""
        idle = {k.name: k.default for k in knob_fields(type(self)) if not self.applies(k.name)}
        return replace(self, **idle) if idle else self

    # ---- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        reject_unknown_fields(cls, data, "plan")
        return cls(**data)

    def with_(self, **changes: Any) -> "Plan":
        return replace(self, **changes)


def decode_graph_blocker(plan: Plan, model) -> str | None:
    """Why ``plan`` of ``model`` (a ModelSpec) cannot decode as a CUDA graph, or None: the model's blocker
    (``model_graph_blocker``) or the plan's own (``Plan.graph_blocker``)."""
    return model_graph_blocker(model) or plan.graph_blocker
