"""Pseudo-label thresholds (dinomix/methods/thresholds.py): fixed, and per class from confidence quantiles, with
values checked against hand computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinomix.methods.thresholds import ClassThresholds, class_quantiles


def _teacher():
    """Class 0 (background) is sure (0.95-0.99), class 1 (a kidney, say) never reaches 0.9 (0.5-0.8)."""
    conf = torch.tensor([0.95, 0.97, 0.99, 0.96, 0.5, 0.6, 0.7, 0.8])
    pseudo = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    return conf, pseudo


def test_class_quantiles_by_hand():
    conf, pseudo = _teacher()
    q = class_quantiles(conf, pseudo, 3, 0.5)
    assert q[0] == pytest.approx(0.965)      # median of 0.95 0.96 0.97 0.99
    assert q[1] == pytest.approx(0.65)       # median of 0.5 0.6 0.7 0.8
    assert np.isnan(q[2])                    # class 2 is not predicted anywhere


def test_fixed_threshold_is_the_same_for_every_class_and_never_moves():
    conf, pseudo = _teacher()
    th = ClassThresholds(3, 0.9, "fixed")
    th.observe(conf, pseudo)
    assert th.tau.tolist() == [0.9, 0.9, 0.9]
    assert th.mask(conf, pseudo).tolist() == [True] * 4 + [False] * 4   # the kidney is never trusted


def test_class_quantile_trusts_the_surer_half_of_an_organ_the_teacher_is_never_sure_of():
    conf, pseudo = _teacher()
    th = ClassThresholds(3, 0.9, "class_quantile", quantile=0.5, momentum=0.9)
    th.observe(conf, pseudo)
    # first sight: the quantile itself, capped at the ceiling; unseen classes keep the ceiling
    assert th.tau == pytest.approx([0.9, 0.65, 0.9])
    assert th.mask(conf, pseudo).tolist() == [True] * 4 + [False, False, True, True]


def test_class_quantile_thresholds_follow_an_ema_and_respect_the_floor():
    th = ClassThresholds(3, 0.9, "class_quantile", quantile=0.5, momentum=0.9, floor=0.3)
    th.observe(torch.tensor([0.6, 0.7]), torch.tensor([1, 1]))          # median 0.65
    th.observe(torch.tensor([0.4, 0.5]), torch.tensor([1, 1]))          # median 0.45
    assert th.tau[1] == pytest.approx(0.9 * 0.65 + 0.1 * 0.45)
    th.observe(torch.tensor([0.1, 0.2]), torch.tensor([2, 2]))          # median 0.15, below the floor
    assert th.tau[2] == pytest.approx(0.3)
    assert th.seen.tolist() == [False, True, True]


def test_threshold_state_round_trips():
    conf, pseudo = _teacher()
    a = ClassThresholds(3, 0.9, "class_quantile")
    a.observe(conf, pseudo)
    b = ClassThresholds(3, 0.9, "class_quantile")
    b.load_state_dict(a.state_dict())
    assert np.array_equal(a.tau, b.tau) and np.array_equal(a.seen, b.seen)
    assert b.summary(["background", "kidney", "pancreas"])["tau"]["kidney"] == pytest.approx(0.65)


def test_bad_threshold_settings_are_refused():
    with pytest.raises(ValueError, match="floor"):
        ClassThresholds(3, 0.5, "class_quantile", floor=0.7)
    with pytest.raises(ValueError, match="unknown threshold mode"):
        ClassThresholds(3, 0.9, "flexmatch")
