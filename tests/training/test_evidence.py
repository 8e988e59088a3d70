"""When left-out corrected scans vouch for a change (dinomix/training/evidence.py): the lower confidence bound of
the mean left-out gain, so that a few widely spread gains do not count as evidence."""

from __future__ import annotations

import pytest

from dinomix.training.evidence import lower_bound, spread_too_wide


def test_the_lower_bound_is_the_one_sided_students_t_bound_of_the_mean():
    # mean 2, sd 1, n 3: t(0.95, 2) = 2.920 -> 2 - 2.920 / sqrt(3)
    assert lower_bound([1.0, 2.0, 3.0]) == pytest.approx(2.0 - 2.919986 / 3 ** 0.5, abs=1e-4)
    assert lower_bound([5.0]) is None


def test_wide_gains_cannot_vouch_and_say_why():
    why = spread_too_wide([1.96, 4.0, 12.24], min_scans=3)  # the branch that lost 2.3 points on other scans
    assert why is not None and "spread too widely" in why and "+12.2" in why


def test_consistent_gains_vouch_and_too_few_are_left_to_the_caller():
    assert spread_too_wide([0.6, 1.2, 1.5], min_scans=3) is None
    assert spread_too_wide([1.0, 9.0], min_scans=3) is None  # two scans: the caller's count decides


def test_more_scans_let_the_same_spread_vouch():
    gains = [1.96, 4.0, 12.24]
    assert spread_too_wide(gains, 3) is not None and spread_too_wide(gains * 3, 3) is None
