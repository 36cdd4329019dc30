"""How this book decides a comparative claim: one rule, used by every chapter.

The appendix page "How this book decides a claim" states the rule in words; this
module is that rule in code, so that a chapter's prose, its tables and its guards
all read the same outcome.

A claim compares two arms (LoRA against full fine-tuning, ``B = 0`` against
``A = 0``, ...). It is measured over at least :data:`MIN_SEEDS` seeds: the seeds of
everything random that is not the thing compared (initialisation, data order,
dropout masks, and the pretraining where the pretrained model matters). For each
seed the chapter computes one *difference*, signed so that a positive number
favours the claim. Then:

* the claim **holds** if every seed favours it, or if the mean difference exceeds
  :data:`SPREAD_MULTIPLE` times the spread (the standard deviation of the
  differences across seeds);
* it **does not hold** if every seed goes against it, or the mean difference is
  below minus that multiple of the spread;
* otherwise it is **inconclusive at this scale**.

A seed whose difference is exactly zero (a tie, which happens with accuracies on a
few hundred images) favours neither side. Claims of *equality* ("QLoRA matches
LoRA", "alpha barely matters") use :func:`decide_within` with a tolerance stated in
the chapter. Where a claim is about *tuned* methods, each arm's learning rate is
chosen per seed on validation data from a grid whose best point lies inside it:
:func:`best_inside` picks it and refuses a best point on the grid's edge.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "FAILS",
    "HOLDS",
    "INCONCLUSIVE",
    "MIN_SEEDS",
    "SPREAD_MULTIPLE",
    "Verdict",
    "best_inside",
    "decide",
    "decide_within",
]

#: The outcome of a claim every seed (or the mean beyond the spread) favours.
HOLDS = "holds"
#: The outcome of a claim every seed (or the mean beyond the spread) goes against.
FAILS = "does not hold"
#: The outcome of a claim neither way decided.
INCONCLUSIVE = "inconclusive at this scale"

#: The fewest seeds a verdict may rest on.
MIN_SEEDS = 3
#: How many spreads the mean difference must clear when the seeds disagree.
SPREAD_MULTIPLE = 2.0


@dataclass(frozen=True)
class Verdict:
    """The outcome of the rule for one claim.

    Attributes:
        differences: one number per seed, positive where that seed favours the claim
            (for :func:`decide_within`, the signed differences between the arms).
        outcome: :data:`HOLDS`, :data:`FAILS` or :data:`INCONCLUSIVE`.
        in_favour: how many seeds favour the claim.
        tolerance: the tolerance of an equality claim (``None`` for a comparison).
    """

    differences: tuple[float, ...]
    outcome: str
    in_favour: int
    tolerance: float | None = None

    @property
    def n(self) -> int:
        """The number of seeds."""
        return len(self.differences)

    @property
    def mean(self) -> float:
        """The mean difference over the seeds."""
        return statistics.fmean(self.differences)

    @property
    def spread(self) -> float:
        """The standard deviation of the differences across seeds."""
        return statistics.stdev(self.differences)

    def seeds(self) -> str:
        """``"k of n seeds"``."""
        return f"{self.in_favour} of {self.n} seeds"

    def summary(self, digits: int = 3, scale: float = 1.0, unit: str = "") -> str:
        """``"k of n seeds, mean +m ± s"``, the numbers multiplied by ``scale``.

        For instance ``scale=100, unit=" points"`` prints accuracy differences in
        percentage points. Print only as many digits as agree across machines.
        """
        m, s = scale * self.mean, scale * self.spread
        return f"{self.seeds()}, mean {m:+.{digits}f} ± {s:.{digits}f}{unit}"


def _differences(differences: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(d) for d in differences)
    if len(values) < MIN_SEEDS:
        raise ValueError(
            f"differences must hold one value per seed for at least {MIN_SEEDS} seeds, "
            f"got {len(values)}: {values!r}")
    if not all(math.isfinite(d) for d in values):
        raise ValueError(f"differences must be finite, got {values!r}")
    return values


def decide(differences: Sequence[float]) -> Verdict:
    """The rule for a comparison "A beats B".

    Args:
        differences: per seed, the score of the claim's favoured arm minus the
            other's, signed so that a positive number favours the claim (for a
            loss, ``loss_B - loss_A``; for an accuracy, ``acc_A - acc_B``).

    Returns:
        A :class:`Verdict`: :data:`HOLDS` if every seed favours the claim or the
        mean exceeds :data:`SPREAD_MULTIPLE` spreads, :data:`FAILS` if every seed
        goes against it or the mean is below minus that, else :data:`INCONCLUSIVE`.
    """
    values = _differences(differences)
    favour = sum(d > 0 for d in values)
    against = sum(d < 0 for d in values)
    mean, spread = statistics.fmean(values), statistics.stdev(values)
    if favour == len(values) or mean > SPREAD_MULTIPLE * spread:
        outcome = HOLDS
    elif against == len(values) or mean < -SPREAD_MULTIPLE * spread:
        outcome = FAILS
    else:
        outcome = INCONCLUSIVE
    return Verdict(values, outcome, favour)


def decide_within(differences: Sequence[float], tolerance: float) -> Verdict:
    """The rule for a claim of equality: "A and B agree within ``tolerance``".

    It holds if every seed's difference lies within the tolerance, does not hold
    if every seed's lies outside it, and is inconclusive otherwise.
    """
    values = _differences(differences)
    if not (isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool)
            and math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance must be a positive finite number, got {tolerance!r}")
    inside = sum(abs(d) <= tolerance for d in values)
    if inside == len(values):
        outcome = HOLDS
    elif inside == 0:
        outcome = FAILS
    else:
        outcome = INCONCLUSIVE
    return Verdict(values, outcome, inside, float(tolerance))


def best_inside(grid: Sequence[float], scores: Sequence[float], *, name: str = "grid",
                higher_is_better: bool = False) -> int:
    """The index of the best score, which must not lie on the grid's edge.

    Tuning on a grid whose best point is its first or last value says only that
    the optimum lies further out; a comparison of tuned methods would then
    handicap that arm. So this refuses such a grid, naming it.
    """
    if len(grid) != len(scores) or len(grid) < 3:
        raise ValueError(
            f"{name}: need at least 3 grid points with one score each, "
            f"got {len(grid)} points and {len(scores)} scores")
    values = [float(s) for s in scores]
    pick = max if higher_is_better else min
    best = values.index(pick(values))
    if best in (0, len(values) - 1):
        raise ValueError(
            f"{name}: the best point {grid[best]!r} lies on the edge of the grid "
            f"{list(grid)!r}; widen the grid so that the best lies inside it")
    return best
