"""Score parity of two lm-eval runs of the same tasks (hpi's runtime against a single-node reference).

Given both runs' ``simple_evaluate`` results with ``log_samples=True``:

- per task and metric: the score delta with both stderrs; a score agrees when
  ``|score - reference| <= score tolerance * max(1, |reference|)`` (relative for perplexities, which are not
  fractions);
- per request: the log-likelihood delta (max and median over every loglikelihood and rolling request), which
  agrees when ``|delta| <= max(absolute tolerance, relative tolerance * max(1, |reference|))``, and the
  agreement of what the scores decide: the argmax over a question's choices, each continuation's is_greedy
  flag, and the generated text.

The tolerances depend on the precision both runs compute in (``TOLERANCES``):

- fp32: 0.001 of an accuracy (0.1 points) and 1e-3 nats per request (issue 17's figures; the CPU runs of
  tests/serve/test_lm_eval.py meet them in every layout);
- bf16 (and fp16, whose 10 mantissa bits round less than bf16's 7): 0.01 of an accuracy (1 point, 1 % relative
  above 1) and 2 % of the reference's log-likelihood per request, measured on one H200 with an 8B-shaped model
  (benchmarks/results/2026-12-03-h200-eval): hpi's bf16 runtime against lm-eval's hf model in bf16 differed by
  at most 0.005 of an accuracy and 1.61 % of a log-likelihood, and hf's own bf16 against its fp32 by 0.015 and
  1.65 % (bf16 itself moves a score by more than 0.1 points).

Pure Python over the results' dictionaries: no model, no lm-eval import.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Tolerances:
    score: float  # of an accuracy; relative for metrics above 1
    loglikelihood_nats: float  # per request, absolute
    loglikelihood_relative: float  # per request, of max(1, |the reference's log-likelihood|)

    def loglikelihood(self, reference: float) -> float:
        return max(self.loglikelihood_nats, self.loglikelihood_relative * max(1.0, abs(reference)))


BF16 = Tolerances(score=0.01, loglikelihood_nats=0.0, loglikelihood_relative=0.02)
TOLERANCES = {"float32": Tolerances(score=0.001, loglikelihood_nats=1e-3, loglikelihood_relative=0.0),
              "bfloat16": BF16, "float16": BF16}  # keyed by lm-eval's hf dtype names (the server's /ready)
SCORE_TOLERANCE = TOLERANCES["float32"].score
LOGLIKELIHOOD_TOLERANCE = TOLERANCES["float32"].loglikelihood_nats


@dataclass(frozen=True)
class ScoreDelta:
    task: str
    metric: str  # lm-eval's "acc,none"
    score: float
    reference: float
    stderr: float | None
    reference_stderr: float | None
    tolerance: float = SCORE_TOLERANCE

    @property
    def delta(self) -> float:
        return self.score - self.reference

    @property
    def ok(self) -> bool:
        return abs(self.delta) <= self.tolerance * max(1.0, abs(self.reference))


@dataclass(frozen=True)
class RequestAgreement:
    """One task's per-request comparison."""

    task: str
    loglikelihood_deltas: tuple[float, ...]  # |hpi - reference| per scored request
    decisions: int  # argmaxes, greedy flags and generations compared
    decisions_agreeing: int
    allowed: tuple[float, ...]  # each request's tolerance (Tolerances.loglikelihood of its reference)

    @property
    def max_delta(self) -> float:
        return max(self.loglikelihood_deltas, default=0.0)

    @property
    def median_delta(self) -> float:
        return statistics.median(self.loglikelihood_deltas) if self.loglikelihood_deltas else 0.0

    @property
    def agreement(self) -> float:
        return self.decisions_agreeing / self.decisions if self.decisions else 1.0

    @property
    def worst(self) -> tuple[float, float]:
        """The delta that comes closest to its tolerance, and that tolerance."""
        pairs = list(zip(self.loglikelihood_deltas, self.allowed, strict=True))
        return max(pairs, key=lambda p: p[0] / p[1], default=(0.0, 1.0))  # every tolerance is > 0 (TOLERANCES)

    @property
    def ok(self) -> bool:
        return all(d <= a for d, a in zip(self.loglikelihood_deltas, self.allowed, strict=True))


@dataclass(frozen=True)
class Parity:
    scores: tuple[ScoreDelta, ...]
    requests: tuple[RequestAgreement, ...]
    precision: str = "float32"

    @property
    def tolerances(self) -> Tolerances:
        return TOLERANCES[self.precision]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.scores) and all(r.ok for r in self.requests)

    def as_dict(self) -> dict[str, Any]:
        """The verdict and every figure, for parity.json."""
        t = self.tolerances
        return {"ok": self.ok, "precision": self.precision, "score_tolerance": t.score,
                "loglikelihood_tolerance_nats": t.loglikelihood_nats,
                "loglikelihood_tolerance_relative": t.loglikelihood_relative,
                "scores": [{**dataclasses.asdict(s), "delta": s.delta, "ok": s.ok} for s in self.scores],
                "requests": [{"task": r.task, "n_loglikelihoods": len(r.loglikelihood_deltas),
                              "max_loglikelihood_delta": r.max_delta, "median_loglikelihood_delta": r.median_delta,
                              "decisions": r.decisions, "agreement": r.agreement, "ok": r.ok}
                             for r in self.requests],
                "failures": self.failures()}

    def failures(self) -> list[str]:
        """One line per failed check, quoting the rule it broke."""
        t = self.tolerances
        out = [f"{s.task} {s.metric}: |{s.score:.6g} - {s.reference:.6g}| = {abs(s.delta):.3g} > "
               f"{s.tolerance:g} x max(1, |reference|) ({self.precision})" for s in self.scores if not s.ok]
        rule = (f"{t.loglikelihood_nats:g}" if not t.loglikelihood_relative else
                f"{t.loglikelihood_relative:g} x max(1, |reference|)")
        out += [f"{r.task}: |log-likelihood delta| = {r.worst[0]:.3g} > {rule} = {r.worst[1]:.3g} "
                f"({self.precision})" for r in self.requests if not r.ok]
        return out


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def score_deltas(results: dict, reference: dict, tolerance: float = SCORE_TOLERANCE) -> list[ScoreDelta]:
    """Every numeric metric both runs report, per task (stderrs beside them, "N/A" read as None)."""
    out = []
    for task, metrics in sorted(reference["results"].items()):
        mine = results["results"].get(task, {})
        for key, ref_value in sorted(metrics.items()):
            if "_stderr," in key or key in ("alias", "name", "sample_len") or _number(ref_value) is None:
                continue
            if _number(mine.get(key)) is None:
                raise ValueError(f"{task}: the run has no number for {key} (the reference has {ref_value})")
            stderr_key = key.replace(",", "_stderr,", 1)
            out.append(ScoreDelta(task, key, float(mine[key]), float(ref_value), _number(mine.get(stderr_key)),
                                  _number(metrics.get(stderr_key)), tolerance))
    return out


def _responses(sample: dict) -> list:
    """A sample's raw responses, one per request (lm-eval wraps each in a list)."""
    return [r[0] if isinstance(r, list) and len(r) == 1 else r for r in sample["resps"]]


def request_agreement(task: str, samples: list[dict], reference: list[dict],
                      tolerances: Tolerances = TOLERANCES["float32"]) -> RequestAgreement:
    ref_by_doc = {s["doc_id"]: s for s in reference}
    deltas: list[float] = []
    allowed: list[float] = []
    decisions = agreeing = 0
    for sample in samples:
        mine, ref = _responses(sample), _responses(ref_by_doc[sample["doc_id"]])
        if len(mine) != len(ref):
            raise ValueError(f"{task} doc {sample['doc_id']}: {len(mine)} responses, the reference has {len(ref)}")
        if mine and isinstance(ref[0], str):  # generate_until: the text decides
            decisions += len(ref)
            agreeing += sum(a == b for a, b in zip(mine, ref, strict=True))
            continue
        lls = [m[0] if isinstance(m, (list, tuple)) else m for m in mine]
        ref_lls = [r[0] if isinstance(r, (list, tuple)) else r for r in ref]
        deltas += [abs(a - b) for a, b in zip(lls, ref_lls, strict=True)]
        allowed += [tolerances.loglikelihood(b) for b in ref_lls]
        if isinstance(ref[0], (list, tuple)):  # loglikelihood: the greedy flags and the argmax decide
            decisions += len(ref) + 1
            agreeing += sum(bool(m[1]) == bool(r[1]) for m, r in zip(mine, ref, strict=True))
            agreeing += lls.index(max(lls)) == ref_lls.index(max(ref_lls))
    return RequestAgreement(task, tuple(deltas), decisions, agreeing, tuple(allowed))


def compare(results: dict, reference: dict, precision: str = "float32") -> Parity:
    """``results`` and ``reference``: ``lm_eval.simple_evaluate(..., log_samples=True)`` of the same tasks, both
    computed in ``precision`` (a ``TOLERANCES`` key: lm-eval's hf dtype name)."""
    if precision not in TOLERANCES:
        raise ValueError(f"no parity tolerances for {precision!r}: one of {', '.join(TOLERANCES)}")
    t = TOLERANCES[precision]
    requests = [request_agreement(task, results["samples"][task], reference["samples"][task], t)
                for task in sorted(reference["samples"])]
    return Parity(tuple(score_deltas(results, reference, t.score)), tuple(requests), precision)
