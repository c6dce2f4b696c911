"""hpi.evaluation.parity on hand-made lm-eval results: each rule trips where it should and not before."""

from __future__ import annotations

import pytest

from hpi.evaluation.parity import LOGLIKELIHOOD_TOLERANCE, SCORE_TOLERANCE, compare


def run(acc: float, ppl: float, lls: list[list[float]], greedy: list[list[bool]], rolling: list[float],
        texts: list[str]) -> dict:
    mc = [{"doc_id": d, "resps": [[(ll, g)] for ll, g in zip(doc, flags)]}
          for d, (doc, flags) in enumerate(zip(lls, greedy))]
    return {"results": {"mc": {"alias": "mc", "acc,none": acc, "acc_stderr,none": 0.1},
                        "ppl": {"word_perplexity,none": ppl, "word_perplexity_stderr,none": "N/A"},
                        "gen": {"exact_match,first_number": 0.5, "exact_match_stderr,first_number": 0.2}},
            "samples": {"mc": mc,
                        "ppl": [{"doc_id": d, "resps": [[ll]]} for d, ll in enumerate(rolling)],
                        "gen": [{"doc_id": d, "resps": [[t]]} for d, t in enumerate(texts)]}}


REF = dict(acc=0.25, ppl=1000.0, lls=[[-1.0, -2.0], [-3.0, -2.5]], greedy=[[True, False], [False, False]],
           rolling=[-50.0, -60.0], texts=["7", "12"])


def test_identical_runs_agree_on_everything():
    parity = compare(run(**REF), run(**REF))
    assert parity.ok and parity.failures() == []
    mc = next(r for r in parity.requests if r.task == "mc")
    assert (mc.max_delta, mc.decisions, mc.agreement) == (0.0, 6, 1.0)  # 4 greedy flags + 2 argmaxes


def test_a_small_log_likelihood_delta_passes_and_a_large_one_fails():
    small = {**REF, "lls": [[-1.0 + LOGLIKELIHOOD_TOLERANCE / 2, -2.0], [-3.0, -2.5]]}
    parity = compare(run(**small), run(**REF))
    assert parity.ok
    assert next(r for r in parity.requests if r.task == "mc").max_delta == pytest.approx(LOGLIKELIHOOD_TOLERANCE / 2)
    large = {**REF, "rolling": [-50.0, -60.0 + 3 * LOGLIKELIHOOD_TOLERANCE]}
    parity = compare(run(**large), run(**REF))
    assert not parity.ok
    assert parity.failures() == ["ppl: |log-likelihood delta| = 0.003 > 0.001 = 0.001 (float32)"]


def test_scores_compare_absolutely_below_one_and_relatively_above():
    assert compare(run(**{**REF, "acc": 0.25 + SCORE_TOLERANCE / 2}), run(**REF)).ok
    parity = compare(run(**{**REF, "acc": 0.25 + 2 * SCORE_TOLERANCE}), run(**REF))
    assert [s.metric for s in parity.scores if not s.ok] == ["acc,none"]
    delta = next(s for s in parity.scores if s.metric == "acc,none")
    assert (delta.stderr, delta.reference_stderr) == (0.1, 0.1)
    assert compare(run(**{**REF, "ppl": 1000.9}), run(**REF)).ok  # 0.09 % of 1000
    assert not compare(run(**{**REF, "ppl": 1001.1}), run(**REF)).ok


def test_flipped_decisions_count_against_agreement():
    flipped = {**REF, "lls": [[-2.0, -1.0], [-3.0, -2.5]], "greedy": [[False, True], [False, False]],
               "texts": ["7", "13"]}
    parity = compare(run(**flipped), run(**REF))
    mc = next(r for r in parity.requests if r.task == "mc")
    gen = next(r for r in parity.requests if r.task == "gen")
    assert (mc.decisions_agreeing, mc.decisions) == (3, 6)  # two greedy flags and one argmax flipped
    assert gen.agreement == 0.5
    assert not parity.ok  # the log-likelihoods moved by 1.0


def test_a_metric_missing_from_the_run_is_an_error_not_a_pass():
    mine = run(**REF)
    del mine["results"]["mc"]["acc,none"]
    with pytest.raises(ValueError, match="mc: the run has no number for acc,none"):
        compare(mine, run(**REF))


def test_bf16_tolerates_two_percent_of_a_log_likelihood_and_a_point_of_accuracy():
    """bf16's tolerances are relative (a rolling document's log-likelihood is hundreds of nats): 2 % of the
    reference's log-likelihood per request, 0.01 of an accuracy."""
    near = {**REF, "rolling": [-50.0 * 1.019, -60.0], "acc": 0.25 + 0.009}
    assert not compare(run(**near), run(**REF)).ok  # fp32's rules: far off
    parity = compare(run(**near), run(**REF), "bfloat16")
    assert parity.ok and parity.as_dict()["loglikelihood_tolerance_relative"] == 0.02
    far = {**REF, "rolling": [-50.0 * 1.021, -60.0], "acc": 0.25 + 0.011}
    parity = compare(run(**far), run(**REF), "bfloat16")
    assert parity.failures() == [
        "mc acc,none: |0.261 - 0.25| = 0.011 > 0.01 x max(1, |reference|) (bfloat16)",
        "ppl: |log-likelihood delta| = 1.05 > 0.02 x max(1, |reference|) = 1 (bfloat16)"]
    small = {**REF, "lls": [[-1.0 + 0.019, -2.0], [-3.0, -2.5]]}  # below 1 nat the tolerance is 0.02 nats
    assert compare(run(**small), run(**REF), "bfloat16").ok
    with pytest.raises(ValueError, match="no parity tolerances for 'int8'"):
        compare(run(**REF), run(**REF), "int8")
