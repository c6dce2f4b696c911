"""The RunRecord: what one run measured, beside what the planner predicted for it. Typed, versioned, one parser.

Written by the executor (``hpi.executor.record.build_record``; rank 0 of ``hpi.executor.worker`` writes
``<out>/record.json`` and prints it as its last stdout line) and by autotune's hidden machine; read by
calibrate, validate, autotune and ``hpi run``. Pure (the standard library only): planner and executor both import it.

    record = RunRecord.from_json(json.loads(text))   # any version: older ones are upgraded on read
    record.timings.decode_step_s.median_s, record.transfers.h2d.fraction_of_profile, record.prediction
    doc = record.to_json()                           # a document of the current version
    records = load_records(["benchmarks/results"])   # hpi.record_files: files, bundles, lists, folders

The document keeps the flat keys the executor always wrote (``RunRecord.to_json``: tools and the kept files
rely on them); the dataclasses group them into parts (``Timings``, ``Transfers``, ``Output``, ...).

Versions:

- 1: the documents written before this module existed. A key was left out where nothing was measured
  (``nvme``, ``texts``, ``prompt_tokens_per_row``, ``variant_records``, ``measured_vs_predicted``); ranks of the
  older runs lack the NVMe fields and their specs lack the run conditions added later (``fetch_wait``,
  ``decode_graphs``); the simulator wrote a copy of ``spec.workload`` at the top level.
- 2: every key is written, null where nothing was measured; the top-level workload copy is gone.
- 3: each rank reports its build's host memory (``host_rss_before_build_bytes``, ``host_build_peak_bytes``);
  older records read them as None (not measured).
- 4: a compiled decode step's compile time (the timings' and each rank's ``compile_s``); older records read it
  as None (not compiled), as their specs read ``decode_compile`` and ``fused_dequant`` as false.
- 5: each rank reports the modules DeepSpeed hooked on its stage (``zero3_hooked_modules``, what
  ``Plan.zero3_leaf`` changes); older records read it as None (not counted), as their plans read ``zero3_leaf``
  as module (DeepSpeed's per-module hooks, all there was).
Reading is lenient about absent keys (None: not recorded) and strict about unknown ones (a typo would be lost).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = [
    "KIND", "TRIAL_KIND", "VERSION", "Comparison", "DecodeSteps", "HostToDevice", "ModelInfo", "NvmeReads", "Output",
    "Prediction", "RankReport", "RecordError", "RunConditions", "RunRecord", "Software", "Source",
    "Timings", "Transfers", "compare", "upgrade",
]  # fmt: skip

KIND = "hpi.RunRecord"
VERSION = 5
TRIAL_KIND = "hpi.AutotuneTrial"  # one trial of hpi autotune (hpi.autotune.objective): its RunRecord under "record"
PREDICTED_FIGURES = ("prefill_s", "decode_step_s", "total_s", "ttft_s", "throughput_tok_s")
# The run conditions a spec carries besides the plan, and what a record written before the field existed ran
# with: fetch_wait arrived with the stream-ordered wait (before it every run used DeepSpeed's stock host
# wait), dtype was always recorded (bf16 its default), runs before decode_graphs decoded eagerly, runs before
# decode_compile were not compiled, runs before fused_dequant dequantized with DeepSpeed's torch ops and runs before
# skinny_gemm ran each product apart through torch (the few runs of 2026-12-06 that stacked them before the field
# existed are marked so by their manifest entry: validation/fidelity_set.yaml).
SPEC_CONDITION_DEFAULTS: dict[str, str | bool] = {"dtype": "bf16", "fetch_wait": "host", "decode_graphs": False,
                                                  "decode_compile": False, "fused_dequant": False,
                                                  "skinny_gemm": False}


class RecordError(ValueError):
    """A document that is not a RunRecord this version can read; the message names it and the fix."""


# ---- reading helpers ----------------------------------------------------------------------------------


def _check_keys(doc: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise RecordError(f"{where}: unknown field {unknown[0]!r}; known fields: {', '.join(sorted(known))}")


def _object(doc: Any, where: str) -> Mapping[str, Any] | None:
    if doc is not None and not isinstance(doc, Mapping):
        raise RecordError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _tuple(values: Any) -> tuple | None:
    """JSON lists as tuples, nested lists too (None stays None)."""
    return None if values is None else tuple(_tuple(v) if isinstance(v, list) else v for v in values)


def _json_value(value: Any) -> Any:
    """Tuples back to lists, mappings to plain dicts, recursively (the JSON shape)."""
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    return dict(value) if isinstance(value, Mapping) else value


def _flat(obj: Any, names: Iterable[str]) -> dict[str, Any]:
    return {n: _json_value(getattr(obj, n)) for n in names}


class _Part:
    """A part written as one JSON object whose keys are its field names, plus ``DERIVED`` properties (written
    for readers of the file, recomputed on reading); ``TUPLES`` are JSON lists held as tuples (lists given are
    converted, so that a part built in code equals the same part read back)."""

    DERIVED: tuple[str, ...] = ()
    TUPLES: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for k in self.TUPLES:
            if isinstance(getattr(self, k), list):
                object.__setattr__(self, k, _tuple(getattr(self, k)))

    def to_json(self) -> dict[str, Any]:
        return _flat(self, [f.name for f in fields(self)] + list(self.DERIVED))

    @classmethod
    def from_json(cls, doc: Any, where: str):
        doc = _object(doc, where)
        if doc is None:
            return None
        names = [f.name for f in fields(cls)]
        _check_keys(doc, names + list(cls.DERIVED), where)
        return cls(**{k: doc[k] for k in names if k in doc and (doc[k] is not None or k not in cls.TUPLES)})


# ---- the parts ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeSteps:
    """The decode steps' durations (the gaps between consecutive pipeline forward ends), seconds."""

    median_s: float
    p90_s: float
    mean_s: float
    all_s: tuple[float, ...] = ()  # empty in a slim record (hpi autotune's database copy)

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median_s, "p90": self.p90_s, "mean": self.mean_s, "all": list(self.all_s)}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> DecodeSteps | None:
        if isinstance(doc, (int, float)) and not isinstance(doc, bool):  # one number: its own distribution
            return cls(doc, doc, doc)
        doc = _object(doc, f"{where}.decode_step_s")
        if doc is None:
            return None
        _check_keys(doc, ("median", "p90", "mean", "all"), f"{where}.decode_step_s")
        if "median" not in doc:
            raise RecordError(f"{where}: decode_step_s has no median")
        median = doc["median"]
        return cls(median, doc.get("p90", median), doc.get("mean", median), tuple(doc.get("all") or ()))


@dataclass(frozen=True)
class Timings:
    """What the run's clock said (None: not recorded). Convention (hpi.executor.record): all ranks start at a
    barrier; a forward of the pipeline ends when its slowest rank ends it."""

    prefill_s: float | None = None  # the first forward (= time to first token)
    ttft_s: float | None = None
    decode_step_s: DecodeSteps | None = None
    total_s: float | None = None
    throughput_tok_s: float | None = None  # batch x generated tokens / total
    pp_bubble_ratio: float | None = None  # the slowest stage's idle share of a decode step
    tp_allreduce_s_per_step: float | None = None
    build_s: float | None = None  # materialize (or load) the weights and wrap them
    decode_forwards: int | None = None
    compile_s: float | None = None  # the first compiled decode forward: torch.compile's work, then the capture

    SCALARS = ("prefill_s", "ttft_s", "total_s", "throughput_tok_s", "pp_bubble_ratio", "tp_allreduce_s_per_step",
               "build_s", "decode_forwards", "compile_s")
    KEYS = SCALARS + ("decode_step_s",)

    def figure(self, name: str) -> float | None:
        """A headline figure by its record key; ``decode_step_s`` is the median step."""
        if name == "decode_step_s":
            return self.decode_step_s.median_s if self.decode_step_s else None
        return getattr(self, name)

    def to_json(self) -> dict[str, Any]:
        return {**_flat(self, self.SCALARS),
                "decode_step_s": self.decode_step_s.to_json() if self.decode_step_s else None}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], where: str) -> Timings:
        return cls(**{k: doc.get(k) for k in cls.SCALARS},
                   decode_step_s=DecodeSteps.from_json(doc.get("decode_step_s"), where))


def _fraction(achieved: float | None, ceiling: float | None) -> float | None:
    return achieved / ceiling if ceiling and achieved else None


@dataclass(frozen=True)
class HostToDevice(_Part):
    """ZeRO-3's host->device stream: bytes per decode step over the median step, against the profile's pinned
    ceiling (gpt-fast's habit: every run says how close it came to the link)."""

    bytes_per_step: int = 0
    achieved_bytes_s: float = 0.0
    profile_pinned_bytes_s: float | None = None

    DERIVED = ("fraction_of_profile",)

    @property
    def fraction_of_profile(self) -> float | None:
        return _fraction(self.achieved_bytes_s, self.profile_pinned_bytes_s)


@dataclass(frozen=True)
class NvmeReads(_Part):
    """NVMe offload: bytes read per decode step from the partitions, and what the drive did, against the
    profile's per-GPU NVMe read share."""

    bytes_per_step: int = 0
    achieved_read_bytes_s: float = 0.0
    profile_read_bytes_s: float | None = None
    aio: Mapping[str, Any] | None = None  # the queue depth and block size DeepSpeed was given (executor.render)
    device: str | None = None  # the block device under the NVMe folder (None: no device, e.g. tmpfs)
    device_read_bytes: int | None = None  # what it read during the measured run (/proc/diskstats)
    device_read_bytes_s: float | None = None
    device_avg_queue_depth: float | None = None

    DERIVED = ("fraction_of_profile", "why_no_device_figures")

    @property
    def fraction_of_profile(self) -> float | None:
        return _fraction(self.achieved_read_bytes_s, self.profile_read_bytes_s)

    @property
    def why_no_device_figures(self) -> str | None:
        if self.device_read_bytes is None:
            return "the NVMe folder is on no block device /proc/diskstats knows (tmpfs, overlay, or not Linux)"
        return None


@dataclass(frozen=True)
class Transfers:
    h2d: HostToDevice | None = None
    nvme: NvmeReads | None = None  # None unless the plan offloads to NVMe


@dataclass(frozen=True)
class Prediction:
    """The planner's Estimate for the run's plan (``hpi.planner.predict.Estimate.to_dict()``), its headline
    figures typed; ``detail`` keeps the rest of the document as the planner wrote it (memory, breakdown,
    placement, reasons, the model, plan and workload it priced)."""

    feasible: bool | None = None
    prefill_s: float | None = None
    decode_step_s: float | None = None
    total_s: float | None = None
    ttft_s: float | None = None
    throughput_tok_s: float | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    TYPED = ("feasible",) + PREDICTED_FIGURES

    @property
    def gpu_peak_bytes(self) -> float | None:
        memory = self.detail.get("memory")
        return memory.get("gpu_peak_bytes") if isinstance(memory, Mapping) else None

    @property
    def nvme_read_bytes_s(self) -> float | None:
        """The placement's per-GPU NVMe read share (the probe's read, split over the ranks reading at once)."""
        placement = self.detail.get("placement")
        return placement.get("nvme_read_bytes_s") if isinstance(placement, Mapping) else None

    def to_json(self) -> dict[str, Any]:
        return {**_flat(self, self.TYPED), **self.detail}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> Prediction | None:
        doc = _object(doc, f"{where}.predicted")
        if doc is None:
            return None
        return cls(**{k: doc.get(k) for k in cls.TYPED}, detail={k: v for k, v in doc.items() if k not in cls.TYPED})


@dataclass(frozen=True)
class Comparison(_Part):
    """One figure measured beside its prediction."""

    measured: float | None = None
    predicted: float | None = None

    @property
    def ratio(self) -> float | None:
        """measured / predicted, where both are known."""
        return self.measured / self.predicted if self.measured is not None and self.predicted else None


def compare(timings: Timings, prediction: Prediction, gpu_peak_bytes: float | None) -> dict[str, Comparison]:
    """``measured_vs_predicted``: each headline time beside its prediction (the decode step's median), and the
    GPU peak the writer measured beside the prediction's."""
    out = {k: Comparison(timings.figure(k), getattr(prediction, k)) for k in PREDICTED_FIGURES}
    out["gpu_peak_bytes"] = Comparison(gpu_peak_bytes, prediction.gpu_peak_bytes)
    return out


@dataclass(frozen=True)
class RankReport(_Part):
    """What one rank measured (plain data: the worker gathers them on rank 0). In a record ``tokens`` is None
    (the record's own ``tokens`` hold the sequences in batch order)."""

    rank: int = 0
    coords: tuple[int, int, int] | None = None  # (tp, dp, pp stage)
    device_name: str | None = None
    forward_end_s: tuple[float, ...] = ()  # since the start barrier, one per forward
    busy_s: tuple[float, ...] = ()  # this rank's own work in each forward
    peak_allocated_bytes: int = 0  # torch.cuda.max_memory_allocated
    peak_reserved_bytes: int = 0
    host_rss_bytes: int = 0
    host_rss_before_build_bytes: int | None = None  # resident set when the build started (hpi.executor.hostmem)
    host_build_peak_bytes: int | None = None  # the resident set's high-water mark during the build (VmHWM)
    pinned_bytes: int = 0
    h2d_bytes_per_forward: int = 0  # bytes ZeRO-3 copies host->device for one forward of this rank's stage
    nvme_bytes_per_forward: int = 0  # bytes of this rank's partitions that live on NVMe (read every forward)
    nvme_device: str | None = None  # the block device under the NVMe folder (None: no device, e.g. tmpfs)
    nvme_read_bytes: int | None = None  # what that device read during the measured run (/proc/diskstats)
    nvme_read_interval_s: float | None = None
    nvme_avg_queue_depth: float | None = None  # requests in flight on average during the measured run
    tp_allreduce_s: float = 0.0  # total time inside TP all-reduces during the measured run
    # modules of this rank's stage that DeepSpeed hooked (forward pre-hooks; None: no ZeRO-3): 13 a Llama layer with
    # its per-module hooks, 1 with each layer a leaf (Plan.zero3_leaf, hpi.executor.zero3.hooked_modules)
    zero3_hooked_modules: int | None = None
    build_s: float = 0.0
    compile_s: float | None = None  # the slowest first compiled decode step (torch.compile + capture), if compiled
    tokens: tuple[tuple[int, ...], ...] | None = None  # last-stage ranks: new tokens per sequence

    TUPLES = ("coords", "forward_end_s", "busy_s", "tokens")


@dataclass(frozen=True)
class Software(_Part):
    python: str | None = None
    torch: str | None = None  # "absent" where it could not be imported
    deepspeed: str | None = None
    transformers: str | None = None
    cuda: str | None = None  # "none" for a CPU build of torch


@dataclass(frozen=True)
class ModelInfo(_Part):
    name: str | None = None  # the catalogue name the planner knows it by
    params_total: int | None = None
    params_active: int | None = None  # per token (MoE: the routed experts only)


@dataclass(frozen=True)
class Output(_Part):
    """What the run generated."""

    tokens: tuple[tuple[int, ...], ...] = ()  # new tokens per sequence, batch order
    generated_tokens_per_sequence: int | None = None
    prompt_len_tokens_actual: int | None = None  # the padded prompt width: the longest prompt
    prompt_tokens_per_row: tuple[int, ...] | None = None  # text prompts: each row's own length
    texts: tuple[str, ...] | None = None  # decoded, where the run had a tokenizer

    KEYS = ("tokens", "generated_tokens_per_sequence", "prompt_len_tokens_actual", "prompt_tokens_per_row", "texts")
    TUPLES = ("tokens", "prompt_tokens_per_row", "texts")

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Output:  # its keys are the record's own
        return cls(**{k: doc[k] for k in cls.KEYS if doc.get(k) is not None})


@dataclass(frozen=True)
class RunConditions:
    """What the record's spec says about how the run ran, besides the plan (older records: the defaults their
    runs had, ``SPEC_CONDITION_DEFAULTS``)."""

    model: str | None  # as the run named it: a catalogue name, a config.json or a checkpoint folder
    hardware: str | None  # the profile the run was predicted on
    out_dir: str | None
    prompt_len_tokens: int
    gen_len_tokens: int
    dtype: str
    fetch_wait: str  # stream | host (hpi.executor.zero3)
    decode_graphs: bool
    decode_compile: bool  # the graphed decode step was compiled (hpi.executor.graphs)
    fused_dequant: bool  # 8/4-bit weights dequantized by hpi's fused kernel (hpi.executor.dequant)
    skinny_gemm: bool  # the graphed step's stacked siblings and few-row kernel (hpi.executor.skinny_gemm)


@dataclass(frozen=True)
class Source:
    """Where ``load_records`` found a record (not part of the document)."""

    path: str
    entry: str | None  # its name in a bundle {name: record}
    id: str  # <file stem>/<entry> for a bundle entry, <folder>/record for record.json, else the file stem


# ---- the record ---------------------------------------------------------------------------------------

_RUN_KEYS = ("spec", "plan", "model", "hardware", "device", "devices", "world_size", "software", "simulated", "ranks",
             "h2d", "nvme", "predicted", "measured_vs_predicted", "variant_records", "entry", "entry_wall_s")
KEYS = ("kind", "version") + _RUN_KEYS + Timings.KEYS + Output.KEYS


@dataclass(frozen=True)
class RunRecord:
    """One run: what it ran (spec, plan, model, machine), what it measured, what the planner predicted.

    ``spec`` and ``plan`` are the documents of ``hpi.executor.spec.RunSpec`` and ``hpi.planner.specs.plan.Plan``
    (their own classes read them back); everything measured is typed.
    """

    spec: Mapping[str, Any] = field(default_factory=dict)
    plan: Mapping[str, Any] | None = None
    model: ModelInfo | None = None
    hardware: str | None = None  # the profile the record names
    device: str | None = None  # cuda | cpu
    devices: tuple[str, ...] = ()  # the device names the ranks reported
    world_size: int | None = None
    software: Software | None = None
    simulated: bool = False  # answered by autotune's hidden machine, not measured
    timings: Timings = Timings()
    transfers: Transfers = Transfers()
    ranks: tuple[RankReport, ...] = ()
    prediction: Prediction | None = None
    measured_vs_predicted: Mapping[str, Comparison] | None = None
    output: Output = Output()
    variant_records: tuple[str, ...] | None = None  # the variants' record.json files, relative to this run's folder
    entry: Mapping[str, Any] | None = None  # benchmarks/gpu_matrix.py: the matrix entry that ran it
    entry_wall_s: float | None = None  # and how long the entry took, build included
    source: Source | None = field(default=None, compare=False)

    kind = KIND

    @property
    def record_id(self) -> str:
        """A stable name: where it was read from, else its matrix entry, else its run folder, else a plan hash."""
        if self.source is not None and self.source.id:
            return self.source.id
        if self.entry and self.entry.get("name"):
            return str(self.entry["name"])
        if self.spec.get("out_dir"):
            return Path(self.spec["out_dir"]).name
        return "record-" + hashlib.sha1(json.dumps(self.plan, sort_keys=True).encode()).hexdigest()[:10]

    @property
    def model_name(self) -> str | None:
        """The catalogue name the record gives its model, else the spec's model argument."""
        return (self.model.name if self.model else None) or self.spec.get("model") or None

    @property
    def conditions(self) -> RunConditions:
        workload = self.spec.get("workload") or {}
        values = {}
        for key, default in SPEC_CONDITION_DEFAULTS.items():
            value = self.spec.get(key)
            values[key] = default if value in (None, "") else type(default)(value)
        return RunConditions(model=self.spec.get("model"), hardware=self.spec.get("hardware"),
                             out_dir=self.spec.get("out_dir"),
                             prompt_len_tokens=int(workload.get("prompt_len_tokens", 0)),
                             gen_len_tokens=int(workload.get("gen_len_tokens", 0)), **values)

    @property
    def gpu_peak_allocated_bytes(self) -> int:
        """The fullest rank's ``torch.cuda.max_memory_allocated`` (0 where no rank reported one)."""
        return max((r.peak_allocated_bytes or 0 for r in self.ranks), default=0)

    @property
    def host_build_peak_bytes(self) -> int:
        """The node's host memory at the build's peak: every rank's high-water mark during its build, summed (the
        ranks of a record share one node; their peaks may fall at different moments, so this bounds the node's).
        0 where no rank reported one."""
        return sum(r.host_build_peak_bytes or 0 for r in self.ranks)

    def without_tokens(self) -> RunRecord:
        """The record without the generated tokens and texts (large, and nothing calibration reads)."""
        return replace(self, output=replace(self.output, tokens=(), texts=None))

    def slim(self) -> RunRecord:
        """Without any per-token or per-forward payload: what hpi autotune's study database keeps."""
        steps = self.timings.decode_step_s
        timings = replace(self.timings, decode_step_s=replace(steps, all_s=())) if steps else self.timings
        ranks = tuple(replace(r, tokens=None, forward_end_s=(), busy_s=()) for r in self.ranks)
        return replace(self.without_tokens(), timings=timings, ranks=ranks)

    def to_json(self) -> dict[str, Any]:
        """The version-``VERSION`` document (JSON types only; a fresh dict)."""
        mvp = self.measured_vs_predicted
        return {
            "kind": KIND, "version": VERSION, "spec": dict(self.spec),
            "plan": None if self.plan is None else dict(self.plan),
            "model": self.model.to_json() if self.model else None, "hardware": self.hardware, "device": self.device,
            "devices": list(self.devices), "world_size": self.world_size,
            "software": self.software.to_json() if self.software else None, "simulated": self.simulated,
            **self.timings.to_json(),
            **{k: part.to_json() if part else None
               for k, part in (("h2d", self.transfers.h2d), ("nvme", self.transfers.nvme))},
            "ranks": [r.to_json() for r in self.ranks],
            "predicted": self.prediction.to_json() if self.prediction else None,
            "measured_vs_predicted": {k: c.to_json() for k, c in mvp.items()} if mvp is not None else None,
            **self.output.to_json(),
            "variant_records": _json_value(self.variant_records),
            "entry": None if self.entry is None else dict(self.entry), "entry_wall_s": self.entry_wall_s,
        }  # fmt: skip

    @classmethod
    def from_json(cls, doc: Any, *, source: Source | None = None) -> RunRecord:
        """Read a RunRecord document of any version (older versions are upgraded first, ``upgrade``)."""
        where = f"record {source.id}" if source else "record"
        doc = upgrade(_object(doc, where), where)
        _check_keys(doc, KEYS, where)
        mvp = _object(doc.get("measured_vs_predicted"), f"{where}.measured_vs_predicted")
        return cls(
            spec=dict(_object(doc.get("spec"), f"{where}.spec") or {}), plan=_object(doc.get("plan"), f"{where}.plan"),
            model=ModelInfo.from_json(doc.get("model"), f"{where}.model"), hardware=doc.get("hardware"),
            device=doc.get("device"), devices=tuple(doc.get("devices") or ()), world_size=doc.get("world_size"),
            software=Software.from_json(doc.get("software"), f"{where}.software"), simulated=bool(doc.get("simulated")),
            timings=Timings.from_json(doc, where),
            transfers=Transfers(HostToDevice.from_json(doc.get("h2d"), f"{where}.h2d"),
                                NvmeReads.from_json(doc.get("nvme"), f"{where}.nvme")),
            ranks=tuple(RankReport.from_json(r, f"{where}.ranks[{i}]") for i, r in enumerate(doc.get("ranks") or ())),
            prediction=Prediction.from_json(doc.get("predicted"), where),
            measured_vs_predicted=None if mvp is None else {
                k: Comparison.from_json(v, f"{where}.measured_vs_predicted.{k}") for k, v in mvp.items()},
            output=Output.from_json(doc), variant_records=_tuple(doc.get("variant_records")),
            entry=_object(doc.get("entry"), f"{where}.entry"), entry_wall_s=doc.get("entry_wall_s"), source=source,
        )  # fmt: skip


# ---- versions -----------------------------------------------------------------------------------------


def upgrade(doc: Mapping[str, Any], where: str = "record") -> dict[str, Any]:
    """A RunRecord document of any version as a document of the current one (a new dict; ``doc`` is kept)."""
    if doc.get("kind") != KIND:
        raise RecordError(f"{where}: not a RunRecord (kind {doc.get('kind')!r}, expected {KIND!r})")
    version = doc.get("version", 1)
    if not isinstance(version, int) or not 1 <= version <= VERSION:
        raise RecordError(f"{where}: RunRecord version {version!r} is not one this hpi reads (1 to {VERSION}): "
                          "read it with the hpi that wrote it, or upgrade hpi")
    out = dict(doc)
    if version == 1:  # -> 2: the simulator's copy of spec.workload goes; absent keys read as None in both
        out.pop("workload", None)
        out["version"] = 2
    if out["version"] == 2:  # -> 3: the ranks' build host memory, absent: None (not measured)
        out["version"] = 3
    if out["version"] == 3:  # -> 4: the compiled decode step's compile time (compile_s), absent: None (none)
        out["version"] = 4
    if out["version"] == 4:  # -> 5: the ranks' hooked module count, absent: None (not counted)
        out["version"] = 5
    return out
