"""The planner as Optuna's guide: the cost model, refreshed from the study's own records.

Three layers, each fixing what the one before cannot:

1. **Calibration** (``refresh_profile``): the hardware profile's efficiencies refitted to every RunRecord
   the study has (``hpi.planner.calibrate``, issue 4). It moves all predictions at once, because one
   streaming efficiency or one per-layer overhead is shared by every plan.
2. **Residuals**: what calibration leaves, ``r = log(measured / predicted)`` of the objective, fitted
   by Bayesian linear regression on the mechanisms a plan uses: an intercept, its offload kind, weight
   bits, layout (tp, pp, dp), KV offload, pageable copies, ``log2(batch per replica)`` and GPU memory use
   (0 at 80% of usable, 1 when full). Each effect has a prior N(0, sd^2) (``PRIOR_SD``): calibration already
   removed the common bias (tight intercept), so a run far off its prediction is explained by what it does
   differently (a dequantization kernel the model does not know, per-sequence host work that bends throughput
   against batch into the inverted U, allocator pressure near full memory). A plan that shares no mechanism
   with anything measured keeps the prior's uncertainty, which is what makes the next step explore.

The next plan to try (``advice``) is the untried lattice plan of highest *expected improvement* over the
best measured one under that posterior (log space, so 0.05 is about 5%): the planner's ranking where it
is trusted, a plan worth one run where it is not. Below ``ei_min`` there is nothing worth a run by the
model's own account and Optuna's TPE sampler proposes the trial instead.

3. **Learned memory ceilings**: a real out-of-memory at a predicted GPU (or host) footprint P makes every
   plan of that config predicted at >= 0.98 P infeasible too, so the study does not walk into it again.

Predictions are vectorised over a lattice of the space (``space.grid``) so ranking thousands of
candidates after each trial costs a few milliseconds per arrangement (tp, pp, dp).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from hpi.autotune.space import DiscretePlan, Lattice, Space, grid, run_key
from hpi.planner.calibrate import CalibrationError, calibrate
from hpi.planner.cost.estimate import evaluate
from hpi.planner.cost.inputs import Arrangement, Knobs
from hpi.planner.feasibility import capacity_masks
from hpi.planner.predict import arrangement_for
from hpi.planner.specs.hardware import HardwareProfile
from hpi.planner.specs.knob import knob_named
from hpi.planner.specs.model import ModelSpec
from hpi.planner.specs.plan import OFFLOAD_KINDS, WEIGHT_BITS, Plan, copies_from_host
from hpi.planner.specs.workload import Workload
from hpi.records import RunRecord

CONSTRAINTS = ("gpu_memory", "cpu_memory", "pinned_memory", "nvme")
PRESSURE_FROM = 0.80  # GPU memory use above which the residual model lets runs slow down
# Prior standard deviation of each residual effect (log of measured / predicted).
PRIOR_SD = {"intercept": 0.1, "offload": 0.3, "bits": 0.3, "layout": 0.3, "kv_offload": 0.3, "pageable": 0.3,
            "log2_batch": 0.1, "pressure": 0.3}
NOISE_SD = 0.05  # run-to-run spread (~2-5%) plus what no term explains
EI_MIN = 0.005  # expected improvement (log) below which the planner has no plan worth a run
OOM_CEILING_MARGIN = 0.98  # a plan predicted within 2% of one that ran out of memory is not tried


def refresh_profile(profile: HardwareProfile, records: Sequence[RunRecord]) -> HardwareProfile:
    """The profile the next suggestions are ranked on: ``profile`` calibrated to the study's records.

    The one place where records make the planner more accurate (``hpi.planner.calibrate``, issue 4). Always
    refitted from the nominal profile with every record so far, so the order trials finished in does not
    matter and a resumed study ranks exactly as an uninterrupted one.
    """
    if not records:
        return profile
    try:
        return calibrate(profile, list(records))
    except CalibrationError:  # nothing it can fit yet (e.g. the records move no coefficient)
        return profile


@functools.lru_cache(maxsize=256)
def _arrangement(model: ModelSpec, hardware: HardwareProfile, workload: Workload, tp: int, pp: int,
                 dp: int) -> Arrangement:
    return arrangement_for(model, hardware, workload, tp, pp, dp)


@dataclass(frozen=True)
class Scores:
    """Predicted figures of many plans, as flat arrays."""

    throughput_tok_s: np.ndarray
    decode_step_s: np.ndarray
    prefill_s: np.ndarray
    gpu_peak_bytes: np.ndarray
    cpu_bytes: np.ndarray
    constraints: dict[str, np.ndarray]  # graded: need / capacity - 1 (> 0 breaks the limit)

    @property
    def feasible(self) -> np.ndarray:
        return np.logical_and.reduce([v <= 0 for v in self.constraints.values()])

    def value(self, objective: str) -> np.ndarray:
        return self.throughput_tok_s if objective == "throughput" else self.decode_step_s

    def at(self, i: int) -> dict[str, Any]:
        return {
            "throughput_tok_s": float(self.throughput_tok_s[i]),
            "decode_step_s": float(self.decode_step_s[i]),
            "prefill_s": float(self.prefill_s[i]),
            "gpu_peak_bytes": float(self.gpu_peak_bytes[i]),
            "cpu_bytes": float(self.cpu_bytes[i]),
            "constraints": {k: float(v[i]) for k, v in self.constraints.items()},
        }

    @classmethod
    def concat(cls, parts: Sequence["Scores"]) -> "Scores":
        if not parts:
            empty = np.zeros(0)
            return cls(empty, empty, empty, empty, empty, {k: empty for k in CONSTRAINTS})
        return cls(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in
              ("throughput_tok_s", "decode_step_s", "prefill_s", "gpu_peak_bytes", "cpu_bytes")),
            {k: np.concatenate([p.constraints[k] for p in parts]) for k in CONSTRAINTS},
        )


def score_knobs(model: ModelSpec, hardware: HardwareProfile, workload: Workload, degrees: tuple[int, int, int],
                knobs: Knobs) -> Scores:
    """The cost model on plans of one arrangement, ``degrees`` (tp, pp, dp)."""
    ev = evaluate(_arrangement(model, hardware, workload, *degrees), knobs)
    hw, mem = hardware, ev.memory
    masks = capacity_masks(ev)
    nvme_broken = (masks["nvme_missing"] | masks["nvme_capacity"] | masks["nvme_buffer"] | masks["nvme_buffer_count"]
                   | masks["aio_block_size"] | masks["context_length"])
    return Scores(
        throughput_tok_s=ev.throughput_tok_s,
        decode_step_s=ev.decode_step_s,
        prefill_s=ev.prefill_s,
        gpu_peak_bytes=mem.gpu_peak_bytes,
        cpu_bytes=mem.cpu_bytes,
        constraints={
            "gpu_memory": mem.gpu_peak_bytes / hw.usable_gpu_bytes - 1.0,
            "cpu_memory": mem.cpu_bytes / hw.usable_dram_bytes - 1.0,
            "pinned_memory": mem.pinned_bytes / max(hw.host.pinnable_bytes, 1.0) - 1.0,
            "nvme": np.where(nvme_broken, 1.0, -1.0),  # no grade: a missing drive or a too-small buffer
        },
    )


def score_plans(model: ModelSpec, hardware: HardwareProfile, workload: Workload, plans: Sequence[Plan]) -> Scores:
    """Scores in the order of ``plans`` (any arrangements)."""
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, p in enumerate(plans):
        groups.setdefault((p.tp, p.pp, p.dp), []).append(i)
    order, parts = [], []
    for degrees, idx in groups.items():
        parts.append(score_knobs(model, hardware, workload, degrees, Knobs.from_plans([plans[i] for i in idx])))
        order += idx
    flat = Scores.concat(parts)
    inverse = np.argsort(np.array(order, dtype=int)) if order else np.zeros(0, dtype=int)
    return Scores(
        *(getattr(flat, f)[inverse] for f in ("throughput_tok_s", "decode_step_s", "prefill_s", "gpu_peak_bytes",
                                               "cpu_bytes")),
        {k: v[inverse] for k, v in flat.constraints.items()},
    )


def score_lattice(model: ModelSpec, hardware: HardwareProfile, workload: Workload, lattice: Lattice) -> Scores:
    return Scores.concat([score_knobs(model, hardware, workload, degrees, k)
                          for degrees, k in zip(lattice.degrees, lattice.knobs)])


# ---- what the study has seen --------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """One finished trial, as the surrogate needs it."""

    plan: Plan
    status: str  # ok | oom | crash | timeout | predicted_overflow
    value: float | None = None  # the measured objective (ok only)
    record: RunRecord | None = None  # the RunRecord (ok only): what calibration reads
    oom_where: str = "gpu"  # gpu | host: which memory ran out (oom only)


@dataclass
class Surrogate:
    """Ranks the space with the refreshed cost model; ``refresh`` after every trial."""

    model: ModelSpec
    nominal: HardwareProfile
    workload: Workload
    space: Space
    calibrate_records: bool = True  # False for CPU runs: their times say nothing about the GPU profile
    profile: HardwareProfile = field(init=False)
    lattice: Lattice = field(init=False)
    scores: Scores = field(init=False)
    residual: "Residual" = field(init=False)
    _ceilings: dict[tuple[DiscretePlan, str], float] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.profile = self.nominal
        self.lattice = grid(self.space, self.model)
        self._design = Design(self.space)
        self._rows = [(g, r) for g, k in enumerate(self.lattice.knobs) for r in range(k.n)]
        self._row_configs = np.concatenate(self.lattice.configs)
        self._row_facts = PlanFacts.of_lattice(self.lattice)
        self.residual = Residual.prior(self._design)
        self.scores = score_lattice(self.model, self.profile, self.workload, self.lattice)

    @property
    def maximize(self) -> bool:
        return self.space.objective == "throughput"

    def better(self, a: float, b: float, margin: float = 0.0) -> bool:
        """``a`` beats ``b`` by more than ``margin`` (a fraction)."""
        return a > b * (1 + margin) if self.maximize else a < b * (1 - margin)

    # ---- refresh ------------------------------------------------------------------------------------------
    def refresh(self, seen: Iterable[Observation]) -> None:
        seen = list(seen)
        ok = [o for o in seen if o.status == "ok" and o.value is not None and o.value > 0]
        records = [o.record for o in ok if o.record] if self.calibrate_records else []
        self.profile = refresh_profile(self.nominal, records)
        self.scores = score_lattice(self.model, self.profile, self.workload, self.lattice)
        self._fit_residuals(ok)
        self._fit_ceilings([o for o in seen if o.status == "oom"])

    def _fit_residuals(self, ok: list[Observation]) -> None:
        self.residual = Residual.prior(self._design)
        if not ok:
            return
        raw = score_plans(self.model, self.profile, self.workload, [o.plan for o in ok])
        predicted = raw.value(self.space.objective)
        use = [i for i in range(len(ok)) if predicted[i] > 0 and np.isfinite(predicted[i])]
        if not use:
            return
        facts = PlanFacts.of_plans([ok[i].plan for i in use], raw.constraints["gpu_memory"][use] + 1.0)
        y = np.log(np.array([ok[i].value for i in use]) / predicted[use])
        self.residual = Residual.fit(self._design, self._design.matrix(facts), y)

    def _fit_ceilings(self, ooms: list[Observation]) -> None:
        self._ceilings = {}
        if not ooms:
            return
        raw = score_plans(self.model, self.profile, self.workload, [o.plan for o in ooms])
        for i, o in enumerate(ooms):
            footprint = float(raw.gpu_peak_bytes[i] if o.oom_where == "gpu" else raw.cpu_bytes[i])
            key = (DiscretePlan.of(o.plan), o.oom_where)
            self._ceilings[key] = min(self._ceilings.get(key, np.inf), footprint * OOM_CEILING_MARGIN)

    # ---- predictions --------------------------------------------------------------------------------------
    def _learned(self, configs: Sequence[DiscretePlan], scores: Scores) -> dict[str, np.ndarray]:
        """Constraints with the learned ceilings: a plan at or above one that ran out of memory breaks it."""
        out = {k: v.copy() for k, v in scores.constraints.items()}
        for i, c in enumerate(configs):
            for where, figure, name in (("gpu", scores.gpu_peak_bytes, "gpu_memory"),
                                        ("host", scores.cpu_bytes, "cpu_memory")):
                ceiling = self._ceilings.get((c, where))
                if ceiling is not None:
                    out[name][i] = max(out[name][i], figure[i] / ceiling - 1.0)
        return out

    def predict(self, plan: Plan) -> dict[str, Any]:
        """The refreshed prediction of one plan: figures, graded constraints, feasibility, corrected value."""
        s = score_plans(self.model, self.profile, self.workload, [plan])
        constraints = self._learned([DiscretePlan.of(plan)], s)
        out = s.at(0)
        out["constraints"] = {k: float(v[0]) for k, v in constraints.items()}
        out["feasible"] = all(v <= 0 for v in out["constraints"].values())
        raw = float(s.value(self.space.objective)[0])
        facts = PlanFacts.of_plans([plan], np.array([out["constraints"]["gpu_memory"] + 1.0]))
        mean, sd = self.residual.predict(self._design.matrix(facts))
        out["value_raw"] = raw
        out["value"] = raw * float(np.exp(mean[0]))
        out["value_log_sd"] = float(sd[0])
        return out

    def _lattice_residual(self) -> tuple[np.ndarray, np.ndarray]:
        facts = self._row_facts.with_util(self.scores.constraints["gpu_memory"] + 1.0)
        return self.residual.predict(self._design.matrix(facts))

    def corrected_values(self) -> np.ndarray:
        """The objective over the lattice with the residual model's mean applied."""
        mean, _ = self._lattice_residual()
        return self.scores.value(self.space.objective) * np.exp(mean)

    def lattice_feasible(self) -> np.ndarray:
        feasible = self.scores.feasible.copy()
        for (config, where), ceiling in self._ceilings.items():
            ci = self.space.configs.index(config) if config in self.space.configs else -1
            rows = self._row_configs == ci
            figure = self.scores.gpu_peak_bytes if where == "gpu" else self.scores.cpu_bytes
            feasible &= ~(rows & (figure >= ceiling))
        return feasible

    def _candidates(self) -> np.ndarray:
        raw = self.scores.value(self.space.objective)
        return self.lattice_feasible() & np.isfinite(raw) & (raw > 0)

    def _pick(self, order: np.ndarray, exclude: Iterable[str], k: int, distinct_configs: bool,
              accept: Callable[[Plan], bool] | None, score: np.ndarray) -> list[tuple[Plan, float]]:
        skip, taken, out = set(exclude), set(), []
        for i in order:
            if distinct_configs and int(self._row_configs[i]) in taken:
                continue
            plan = self.lattice.plan(*self._rows[i])
            key = run_key(plan)
            if key in skip or (accept is not None and not accept(plan)):
                continue
            skip.add(key)
            taken.add(int(self._row_configs[i]))
            out.append((plan, float(score[i])))
            if len(out) == k:
                break
        return out

    def ranked(self, exclude: Iterable[str] = (), k: int = 1, distinct_configs: bool = False,
               accept: Callable[[Plan], bool] | None = None) -> list[tuple[Plan, float]]:
        """The best ``k`` feasible lattice plans by corrected prediction (plan, predicted value), skipping
        plan keys in ``exclude`` and plans ``accept`` refuses."""
        values = self.corrected_values()
        idx = np.flatnonzero(self._candidates())
        order = idx[np.argsort(-values[idx] if self.maximize else values[idx], kind="stable")]
        return self._pick(order, exclude, k, distinct_configs, accept, values)

    def advice(self, incumbent: float | None, exclude: Iterable[str] = (),
               ei_min: float = EI_MIN) -> tuple[Plan, float, float] | None:
        """The untried plan of highest expected (log) improvement over ``incumbent``: (plan, predicted
        value, expected improvement), or None when no plan promises ``ei_min``."""
        if incumbent is None:
            best = self.ranked(exclude=exclude, k=1)
            return (best[0][0], best[0][1], math.inf) if best else None
        raw = self.scores.value(self.space.objective)
        mean, sd = self._lattice_residual()
        ok = self._candidates()
        with np.errstate(divide="ignore", invalid="ignore"):
            needed = np.log(incumbent / raw)  # the residual that would just match the incumbent
        gain = (mean - needed) if self.maximize else (needed - mean)
        ei = np.where(ok, expected_improvement(gain, sd), -np.inf)
        order = np.argsort(-ei, kind="stable")
        order = order[ei[order] >= ei_min]
        picks = self._pick(order, exclude, 1, False, None, ei)
        if not picks:
            return None
        plan, e = picks[0]
        return plan, float(self.predict(plan)["value"]), e


def expected_improvement(gain: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """E[max(0, X)] for X ~ N(gain, sd^2): what a run is expected to add over the incumbent (log)."""
    from scipy.stats import norm

    sd = np.maximum(sd, 1e-9)
    z = gain / sd
    return gain * norm.cdf(z) + sd * norm.pdf(z)


# ---- the residual model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanFacts:
    """What the residual model reads of plans (arrays over plans)."""

    offload: np.ndarray  # index into OFFLOAD_KINDS
    bits: np.ndarray
    layout: list  # (tp, pp, dp) per plan
    kv_offload: np.ndarray
    pageable: np.ndarray  # copies from host memory without pinning
    batch_per_replica: np.ndarray
    util: np.ndarray  # predicted GPU memory use, a fraction of usable

    def with_util(self, util: np.ndarray) -> "PlanFacts":
        return PlanFacts(self.offload, self.bits, self.layout, self.kv_offload, self.pageable,
                         self.batch_per_replica, util)

    @classmethod
    def of_plans(cls, plans: Sequence[Plan], util: np.ndarray) -> "PlanFacts":
        return cls(
            offload=np.array([OFFLOAD_KINDS.index(p.offload) for p in plans]),
            bits=np.array([p.weight_bits for p in plans]),
            layout=[(p.tp, p.pp, p.dp) for p in plans],
            kv_offload=np.array([p.kv_offload for p in plans], dtype=float),
            pageable=np.array([p.copies_from_host_memory and not p.pin_memory for p in plans], dtype=float),
            batch_per_replica=np.array([p.batch_per_replica for p in plans], dtype=float),
            util=np.asarray(util, dtype=float),
        )

    @classmethod
    def of_lattice(cls, lattice: Lattice) -> "PlanFacts":
        offload, bits, layout, kv, pageable, batch = [], [], [], [], [], []
        one_hot = knob_named(Plan, "offload").one_hot
        for lay, k in zip(lattice.degrees, lattice.knobs):
            offload.append(sum(OFFLOAD_KINDS.index(choice) * k.columns[col] for col, choice in one_hot))
            bits.append(k.weight_bits)
            layout += [lay] * k.n
            kv.append(k.kv_offload.astype(float))
            pageable.append((copies_from_host(k.offload_cpu, k.kv_offload) & ~k.pin_memory).astype(float))
            batch.append(k.batch_size / lay[2])
        return cls(np.concatenate(offload), np.concatenate(bits), layout, np.concatenate(kv),
                   np.concatenate(pageable), np.concatenate(batch), np.zeros(len(layout)))


class Design:
    """The residual model's columns for one space: intercept, offload kinds, bits, layouts, KV offload,
    pageable, log2 batch, memory pressure; and each column's prior standard deviation."""

    def __init__(self, space: Space) -> None:
        self.layouts = sorted({(c.tp, c.pp, c.dp) for c in space.configs})
        names = (["intercept"] + [f"offload={o}" for o in OFFLOAD_KINDS] + [f"bits={b}" for b in WEIGHT_BITS]
                 + [f"layout=tp{t}pp{p}dp{d}" for t, p, d in self.layouts]
                 + ["kv_offload", "pageable", "log2_batch", "pressure"])
        self.names = tuple(names)
        self.prior_sd = np.array([PRIOR_SD[n.split("=")[0]] for n in names])

    def matrix(self, f: PlanFacts) -> np.ndarray:
        n = len(f.offload)
        x = np.zeros((n, len(self.names)))
        x[:, 0] = 1.0
        x[np.arange(n), 1 + f.offload] = 1.0
        x[np.arange(n), 1 + len(OFFLOAD_KINDS) + np.array([WEIGHT_BITS.index(int(b)) for b in f.bits], dtype=int)] = 1.0
        base = 1 + len(OFFLOAD_KINDS) + len(WEIGHT_BITS)
        index = {lay: i for i, lay in enumerate(self.layouts)}
        cols = np.array([index.get(tuple(lay), -1) for lay in f.layout], dtype=int)
        known = cols >= 0
        x[np.flatnonzero(known), base + cols[known]] = 1.0
        tail = base + len(self.layouts)
        x[:, tail] = f.kv_offload
        x[:, tail + 1] = f.pageable
        x[:, tail + 2] = np.log2(np.maximum(f.batch_per_replica, 1.0))
        x[:, tail + 3] = np.maximum(0.0, f.util - PRESSURE_FROM) / (1.0 - PRESSURE_FROM)  # 0 at 80%, 1 when full
        return x


@dataclass(frozen=True)
class Residual:
    """The posterior N(mean, cov) of the residual effects (Bayesian linear regression)."""

    names: tuple[str, ...]
    mean: np.ndarray
    cov: np.ndarray

    @classmethod
    def prior(cls, design: Design) -> "Residual":
        return cls(design.names, np.zeros(len(design.names)), np.diag(design.prior_sd**2))

    @classmethod
    def fit(cls, design: Design, x: np.ndarray, y: np.ndarray, noise_sd: float = NOISE_SD) -> "Residual":
        precision = x.T @ x / noise_sd**2 + np.diag(1.0 / design.prior_sd**2)
        cov = np.linalg.inv(precision)
        mean = cov @ x.T @ y / noise_sd**2
        return cls(design.names, mean, cov)

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, sd) of the residual of each row of ``x``."""
        mean = x @ self.mean
        var = np.einsum("ij,jk,ik->i", x, self.cov, x)
        return mean, np.sqrt(np.maximum(var, 0.0))

    def effects(self) -> dict[str, float]:
        return {n: float(m) for n, m in zip(self.names, self.mean)}
