"""hpi.executor.agreement: margins on the reference's two best tokens, the noise floor a baseline's rounding sets,
and agreement counted on the positions the reference decides above it (synthetic logits with known margins)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from hpi.executor import agreement  # noqa: E402


def _logits(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_top_two_and_the_margin_on_given_tokens():
    index, margin = agreement.top_two(_logits([[0.0, 3.0, 1.0, 2.5], [4.0, -1.0, 0.0, 3.0]]))
    assert index.tolist() == [[1, 3], [0, 3]] and margin.tolist() == [0.5, 1.0]
    # a path that prefers the reference's second token has a negative margin on the reference's pair
    assert agreement.margin_on(_logits([[0.0, 2.0, 1.0, 2.75]]), index[:1]).tolist() == [-0.75]
    bf16 = _logits([[0.0, 3.0, 1.0, 2.5]]).bfloat16()
    assert agreement.margin_on(bf16, index[:1]).dtype == torch.float32


def _reference_and_baseline(ref_margins: list[float], base_errors: list[float]):
    """A one-row reference whose two best tokens are 0 and 1 with the given margins, and a baseline whose margin on
    them is off by the given errors."""
    top = agreement.TopTwo()
    base = agreement.MarginsOn(top)
    for position, (m, e) in enumerate(zip(ref_margins, base_errors, strict=True)):
        top(position, _logits([[m, 0.0, -5.0]]))
        base(position, _logits([[m + e, 0.0, -5.0]]))
    return top, base


def test_the_floor_is_a_baseline_error_that_occurred_and_decides_positions_above_it():
    margins = [float(m) for m in range(1, 101)]  # fp32 margins 1..100
    errors = [0.01 * i for i in range(100)]  # baseline margin errors 0.00..0.99
    top, base = _reference_and_baseline(margins, errors)
    assert base.errors().flatten().tolist() == pytest.approx(errors, abs=1e-5)
    noise = agreement.floor(base)
    # the 0.99 quantile of 100 errors, taken at the next error up: 0.99, an error that occurred
    assert noise.floor_logits == pytest.approx(0.99, abs=1e-5) and noise.quantile == agreement.FLOOR_QUANTILE
    assert noise.decided.shape == (100, 1) and noise.decided_share == 1.0  # every fp32 margin is >= 1
    half = agreement.floor(base, quantile=0.5)
    assert half.floor_logits == pytest.approx(0.50, abs=1e-5) and half.decided_share == 1.0
    with pytest.raises(ValueError, match="between 0 and 1"):
        agreement.floor(base, quantile=1.0)


def test_agreement_counts_only_decided_positions_and_reports_the_paths_rounding():
    # positions 0-3 are near-ties (fp32 margin 0.1), 4-7 decided (margin 5); the baseline's errors are at most 0.5
    margins = [0.1] * 4 + [5.0] * 4
    top, base = _reference_and_baseline(margins, [-0.5, 0.2, -0.3, 0.0, 0.3, 0.2, 0.1, 0.0])
    noise = agreement.floor(base)
    assert noise.floor_logits == pytest.approx(0.5) and noise.decided.flatten().tolist() == [False] * 4 + [True] * 4
    reference = [torch.tensor([0])] * 8  # fp32 picks token 0 everywhere; the baseline's margin flips 0 and 2
    baseline = [torch.tensor([1]), torch.tensor([0]), torch.tensor([1]), torch.tensor([0])] + reference[4:]
    # a new path flips two near-ties and one decided position (its margin there moved by 6)
    path = agreement.MarginsOn(top)
    choices = []
    for position, (m, shift) in enumerate(zip(margins, [-0.3, -0.3, 0.0, 0.0, 0.0, 0.0, -6.0, 0.0], strict=True)):
        path(position, _logits([[m + shift, 0.0, -5.0]]))
        choices.append(torch.tensor([0 if m + shift > 0 else 1]))
    report = agreement.decided_agreement(path, choices, baseline, reference, noise)
    assert report["agree_decided"] == 0.75 and report["agree_vs_fp32_decided"] == 0.75
    assert agreement.share(choices, reference) == 0.625  # all positions: the near-ties count against it too
    assert report["margin_error_q99"] == pytest.approx(6.0) and report["margin_error_median"] == pytest.approx(0.0)
    base_report = agreement.decided_agreement(base, baseline, baseline, reference, noise)
    assert base_report["agree_decided"] == 1.0 and base_report["agree_vs_fp32_decided"] == 1.0
    assert agreement.share(baseline, reference) == 0.75


def test_share_over_no_position_is_none_and_collectors_refuse_misordered_or_short_input():
    a = [torch.tensor([1, 2])]
    assert agreement.share(a, a, torch.zeros(1, 2, dtype=torch.bool)) is None and agreement.share(a, a) == 1.0
    top = agreement.TopTwo()
    with pytest.raises(ValueError, match="feed them in order"):
        top(1, _logits([[1.0, 0.0]]))
    top(0, _logits([[1.0, 0.0]]))
    top(1, _logits([[1.0, 0.0]]))
    short = agreement.MarginsOn(top)
    short(0, _logits([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="decode the same positions"):
        short.errors()
