"""The book's rule for comparative claims (lora_tutorial.book.verdict)."""

import pytest

from lora_tutorial.book import verdict as v


@pytest.mark.parametrize("diffs, outcome, k", [
    ([0.1, 0.2, 0.05], v.HOLDS, 3),            # every seed favours the claim
    ([-0.1, -0.2, -0.05], v.FAILS, 0),         # every seed goes against it
    ([0.1, -0.1, 0.05], v.INCONCLUSIVE, 2),    # the seeds disagree
    ([0.1, 0.0, 0.2], v.INCONCLUSIVE, 2),      # a tie favours neither side
    ([1.0] * 9 + [-0.01], v.HOLDS, 9),         # mean beyond 2 spreads
    ([-1.0] * 9 + [0.01], v.FAILS, 1),
])
def test_decide_follows_the_stated_rule(diffs, outcome, k):
    result = v.decide(diffs)
    assert (result.outcome, result.in_favour, result.n) == (outcome, k, len(diffs))


def test_summary_reports_seeds_mean_and_spread():
    result = v.decide([0.01, 0.02, 0.03])
    assert result.summary(scale=100, digits=1, unit=" points") == \
        "3 of 3 seeds, mean +2.0 ± 1.0 points"


def test_decide_within_is_about_a_tolerance():
    assert v.decide_within([0.01, -0.02, 0.0], 0.05).outcome == v.HOLDS
    assert v.decide_within([0.1, -0.2, 0.3], 0.05).outcome == v.FAILS
    assert v.decide_within([0.01, -0.2, 0.0], 0.05).outcome == v.INCONCLUSIVE


@pytest.mark.parametrize("diffs", [[0.1, 0.2], [0.1, float("nan"), 0.2]])
def test_too_few_seeds_or_nan_are_refused(diffs):
    with pytest.raises(ValueError, match="differences"):
        v.decide(diffs)


def test_best_inside_refuses_a_best_on_the_edge():
    assert v.best_inside([1, 2, 3], [0.5, 0.1, 0.4]) == 1
    assert v.best_inside([1, 2, 3], [0.5, 0.9, 0.4], higher_is_better=True) == 1
    with pytest.raises(ValueError, match="lr.*edge of the grid"):
        v.best_inside([1, 2, 3], [0.5, 0.4, 0.1], name="lr")
    with pytest.raises(ValueError, match="tolerance"):
        v.decide_within([0.1, 0.1, 0.1], 0)
