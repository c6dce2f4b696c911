"""Score parity of two lm-eval runs of the same tasks (hpi's runtime against a single-node reference).

Given both runs' ``simple_evaluate`` results with ``log_samples=True``:

- per task and metric: the score delta with both stderrs; a score agrees when
  ``|score - reference| <= SCORE_TOLERANCE * max(1, |reference|)`` (0.001 of an accuracy, i.e. 0.1 points; for
  perplexities, which are not fractions, the same 0.1 % relative);
- per request: the log-likelihood delta (max and median over every loglikelihood and rolling request), which
  agrees when the max is at most ``LOGLIKELIHOOD_TOLERANCE`` (fp32; issue 17's figures), and the agreement of
  what the scores decide: the argmax over a question's choices, each continuation's is_greedy flag, and the
  generated text.

Pure Python over the results' dictionaries: no model, no lm-eval import.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from typing import Any

SCORE_TOLERANCE = 0.001  # of an accuracy (0.1 points); relative for metrics above 1
LOGLIKELIHOOD_TOLERANCE = 1e-3  # nats, per request, fp32


@dataclass(frozen=True)
class ScoreDelta:
    task: str
    metric: str  # lm-eval's "acc,none"
    score: float
    reference: float
    stderr: float | None
    reference_stderr: float | None

    @property
    def delta(self) -> float:
        return self.score - self.reference

    @property
    def ok(self) -> bool:
        return abs(self.delta) <= SCORE_TOLERANCE * max(1.0, abs(self.reference))


@dataclass(frozen=True)
class RequestAgreement:
    """One task's per-request comparison."""

    task: str
    loglikelihood_deltas: tuple[float, ...]  # |hpi - reference| per scored request
    decisions: int  # argmaxes, greedy flags and generations compared
    decisions_agreeing: int

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
    def ok(self) -> bool:
        return self.max_delta <= LOGLIKELIHOOD_TOLERANCE


@dataclass(frozen=True)
class Parity:
    scores: tuple[ScoreDelta, ...]
    requests: tuple[RequestAgreement, ...]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.scores) and all(r.ok for r in self.requests)

    def as_dict(self) -> dict[str, Any]:
        """The verdict and every figure, for parity.json."""
        return {"ok": self.ok, "score_tolerance": SCORE_TOLERANCE, "loglikelihood_tolerance": LOGLIKELIHOOD_TOLERANCE,
                "scores": [{**dataclasses.asdict(s), "delta": s.delta, "ok": s.ok} for s in self.scores],
                "requests": [{"task": r.task, "n_loglikelihoods": len(r.loglikelihood_deltas),
                              "max_loglikelihood_delta": r.max_delta, "median_loglikelihood_delta": r.median_delta,
                              "decisions": r.decisions, "agreement": r.agreement, "ok": r.ok}
                             for r in self.requests],
                "failures": self.failures()}

    def failures(self) -> list[str]:
        """One line per failed check, quoting the rule it broke."""
        out = [f"{s.task} {s.metric}: |{s.score:.6g} - {s.reference:.6g}| = {abs(s.delta):.3g} > "
               f"{SCORE_TOLERANCE:g} x max(1, |reference|)" for s in self.scores if not s.ok]
        out += [f"{r.task}: max |log-likelihood delta| = {r.max_delta:.3g} > {LOGLIKELIHOOD_TOLERANCE:g}"
                for r in self.requests if not r.ok]
        return out


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def score_deltas(results: dict, reference: dict) -> list[ScoreDelta]:
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
                                  _number(metrics.get(stderr_key))))
    return out


def _responses(sample: dict) -> list:
    """A sample's raw responses, one per request (lm-eval wraps each in a list)."""
    return [r[0] if isinstance(r, list) and len(r) == 1 else r for r in sample["resps"]]


def request_agreement(task: str, samples: list[dict], reference: list[dict]) -> RequestAgreement:
    ref_by_doc = {s["doc_id"]: s for s in reference}
    deltas: list[float] = []
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
        if isinstance(ref[0], (list, tuple)):  # loglikelihood: the greedy flags and the argmax decide
            decisions += len(ref) + 1
            agreeing += sum(bool(m[1]) == bool(r[1]) for m, r in zip(mine, ref, strict=True))
            agreeing += lls.index(max(lls)) == ref_lls.index(max(ref_lls))
    return RequestAgreement(task, tuple(deltas), decisions, agreeing)


def compare(results: dict, reference: dict) -> Parity:
    """``results`` and ``reference``: ``lm_eval.simple_evaluate(..., log_samples=True)`` of the same tasks."""
    requests = [request_agreement(task, results["samples"][task], reference["samples"][task])
                for task in sorted(reference["samples"])]
    return Parity(tuple(score_deltas(results, reference)), tuple(requests))
