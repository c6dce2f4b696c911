"""How far two greedy decodes of the same weights agree, counted only where the choice is decided (issue 20).

A bf16 decode is compared with the same weights in fp32, teacher-forced with the same tokens. With random weights
the fp32 logits of the best two tokens are often nearer each other than bf16's rounding moves them
(benchmarks/results/2026-12-05-h100-issue20/SUMMARY.md: the bf16 graph hpi replays today agreed with fp32 on 0.863
of 512 positions), so plain agreement mostly counts near-ties, which either bf16 path may break either way. Margins
say which positions are decided:

- fp32's margin at a position: logit(top-1) - logit(top-2), fp32's own two best tokens;
- a path's margin there: the same difference of *its* logits at fp32's two tokens (negative: it prefers the second);
- its margin error: |path margin - fp32 margin|, what its rounding moved the decision by;
- the noise floor: a high quantile (``FLOOR_QUANTILE``) of the baseline's margin errors, the baseline being the
  path hpi runs today: how far bf16 rounding moves a decision on this model;
- decided positions: fp32's margin above the floor. There the baseline's own rounding flips the choice at most
  ``1 - FLOOR_QUANTILE`` of the time, so a new path that agrees less often on them changed the numerics by more than
  today's rounding does, while disagreements below the floor are ties either path breaks by chance.

Collectors (``TopTwo``, ``MarginsOn``) take each position's logits as a decode goes, so no full-vocabulary logits are
kept; ``floor`` and ``decided_agreement`` turn them into the JSON a benchmark row keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The baseline's margin errors under which a position is a near-tie: 99 in 100 of its own rounding moves are smaller.
FLOOR_QUANTILE = 0.99


def top_two(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([b, 2] the two best tokens of each row, best first; [b] the logit margin between them, fp32)."""
    values, index = logits.float().topk(2, dim=-1)
    return index, values[:, 0] - values[:, 1]


def margin_on(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[b] logit(index[:, 0]) - logit(index[:, 1]) of each row, fp32."""
    picked = logits.float().gather(-1, index)
    return picked[:, 0] - picked[:, 1]


class TopTwo:
    """The reference decode's two best tokens and margin at each position (call with position, logits)."""

    def __init__(self) -> None:
        self.index: list[torch.Tensor] = []
        self.margins: list[torch.Tensor] = []

    def __call__(self, position: int, logits: torch.Tensor) -> None:
        if position != len(self.index):
            raise ValueError(f"TopTwo got position {position} after {len(self.index)} positions: feed them in order")
        index, margin = top_two(logits)
        self.index.append(index)
        self.margins.append(margin.cpu())

    def margin(self) -> torch.Tensor:
        """[positions, b] fp32's margins."""
        return torch.stack(self.margins)


class MarginsOn:
    """A path's margins at the reference's two best tokens, position by position."""

    def __init__(self, reference: TopTwo) -> None:
        self.reference = reference
        self.margins: list[torch.Tensor] = []

    def __call__(self, position: int, logits: torch.Tensor) -> None:
        index = self.reference.index[position].to(logits.device)
        self.margins.append(margin_on(logits, index).cpu())

    def margin(self) -> torch.Tensor:
        """[positions, b] this path's margins on the reference's tokens."""
        return torch.stack(self.margins)

    def errors(self) -> torch.Tensor:
        """[positions, b] |this path's margin - the reference's|."""
        reference = self.reference.margin()
        if len(self.margins) != reference.shape[0]:
            raise ValueError(f"{len(self.margins)} positions of margins against {reference.shape[0]} of the "
                             "reference: decode the same positions")
        return (self.margin() - reference).abs()


@dataclass(frozen=True)
class Floor:
    """The noise floor a baseline's rounding sets and the positions the reference decides above it."""

    quantile: float
    floor_logits: float
    decided: torch.Tensor  # bool [positions, b]: fp32's margin > floor_logits

    @property
    def decided_share(self) -> float:
        return self.decided.float().mean().item()


def floor(baseline: MarginsOn, quantile: float = FLOOR_QUANTILE) -> Floor:
    """The ``quantile`` of the baseline's margin errors (the nearest error at or above it: one that occurred), and
    the positions whose fp32 margin exceeds it."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile {quantile}: give a fraction between 0 and 1, e.g. {FLOOR_QUANTILE}")
    errors = baseline.errors().flatten().double()
    value = torch.quantile(errors, quantile, interpolation="higher").item()
    return Floor(quantile, value, baseline.reference.margin() > value)


def share(a: list[torch.Tensor], b: list[torch.Tensor], where: torch.Tensor | None = None) -> float | None:
    """The share of (position, row) greedy choices on which ``a`` and ``b`` agree, over the positions ``where``
    is True (all when None); None when ``where`` selects none."""
    same = (torch.stack(a).cpu() == torch.stack(b).cpu()).reshape(-1)
    if where is not None:
        same = same[where.reshape(-1)]
    return same.float().mean().item() if same.numel() else None


def decided_agreement(path: MarginsOn, choices: list[torch.Tensor], baseline: list[torch.Tensor],
                      reference: list[torch.Tensor], noise: Floor) -> dict:
    """A path's agreement on the decided positions (with the baseline and with fp32) and its margin errors, whose
    quantile beside the floor says whether it rounds more than the baseline."""
    errors = path.errors().flatten().double()
    return {"agree_decided": share(choices, baseline, noise.decided),
            "agree_vs_fp32_decided": share(choices, reference, noise.decided),
            "margin_error_median": errors.median().item(),
            f"margin_error_q{round(noise.quantile * 100)}": torch.quantile(
                errors, noise.quantile, interpolation="higher").item()}
