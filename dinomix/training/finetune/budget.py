"""Fitting a fine-tune into its time budget (`--minutes`): the iteration plan from a measured step time, and the
re-planning from the pace of the last iterations while it trains."""

from __future__ import annotations

import copy
import math
import statistics
import time
from typing import Callable

from ...events import Reporter
from ..semi import SemiTrainer

CALIBRATION_STEPS = 3    # trial iterations timed (then undone); the first warms up and is not counted
MIN_ITERATIONS = 5
LOCO_SHARE = 0.35        # share of the training iterations spent on the leave-one-scan-out checks
# Organ calibration (training/calibration.py) time per scan the offset search runs over, on 2 busy cores: the fit
# runs over the n corrected scans, leave-one-scan-out over n - 1 scans n times, so n^2 scan searches in all. Since the
# search judges the cleaned-up maps (a largest-component pass per offset tried, 2026-12-07), two BTCV scans at 3 mm
# with 13 organs took about 42 s on an idle 2-core machine (4 scan searches, before the coarse-to-fine search cut the
# offsets tried from 49 to 19); 15 s a search leaves room for one other job. Kept free at the end of the budget.
CALIBRATION_S_PER_SCAN_SEARCH = 15.0
REPLAN_WINDOW = 10       # iterations whose pace re-plans a time-budgeted run


def calibration_seconds(n_corrected: int) -> float:
    """Time to keep for the organ calibration of n corrected scans (fit and leave-one-scan-out)."""
    return CALIBRATION_S_PER_SCAN_SEARCH * n_corrected * n_corrected


CLEAN_UP_S = 0.5  # seconds the clean-up of one label map takes on the model grid (a 2-core CPU)


def window_seconds(n_candidates: int, n_corrected: int, t_case: float, n_unlabeled: int = 0) -> float:
    """Time the window calibration takes: every candidate map on every corrected scan, and its clean-up; each
    unlabeled scan smoothed, with and without the fitted map."""
    return n_candidates * n_corrected * (t_case + CLEAN_UP_S) + 2 * n_unlabeled * t_case


def plan_iterations(budget_s: float, spent_s: float, step_s: float, after_s: float, margin: float = 0.08) -> int:
    """Iterations that fit the budget: what is left after the time spent so far and the final evaluation and
    export (after_s), less a safety margin, divided by the measured time of one iteration."""
    left = (budget_s - spent_s - after_s) * (1.0 - margin)
    return max(0, math.floor(left / max(step_s, 1e-6)))


def measure_step(tr: SemiTrainer, rep: Reporter, check: Callable[[], None]) -> float:
    """Seconds one training iteration of the set-up trainer `tr` takes, checkpoints and bookkeeping included: the
    mean of CALIBRATION_STEPS trial iterations but the first, which are then undone (the trainer is back where
    it was, so the run is the one it would have been without them)."""
    start_state = copy.deepcopy(tr.state(0, 0.0, {"mean_dice": -1.0, "iteration": -1}))
    times = []
    for it in range(CALIBRATION_STEPS):
        check()
        ts = time.monotonic()
        tr.step(it)
        times.append(time.monotonic() - ts)
        rep.update((it + 1) / CALIBRATION_STEPS)
    tr.restore_state(start_state)
    step_s = statistics.mean(times[1:]) if len(times) > 1 else times[0]
    return step_s * (1.0 + 0.5 / tr.cfg.checkpoint_every)  # checkpoints and per-iteration bookkeeping


class Replanner:
    """A trainer's `replan` (`Trainer(replan=...)`) under a deadline: after every iteration, the iteration count
    that ends training `after_s` before the deadline at the pace of the last REPLAN_WINDOW iterations (a machine
    that slows down mid-run is followed within a few steps). The count changes only by more than 2 % (or
    downwards), so that the learning-rate schedule does not jitter.

    `cfg` is the trainer's config (its `iterations`: the count planned so far). The caller starts the clock when
    training starts (`start`), since the deadline and what must be left after training are known only then."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.deadline = math.inf
        self.after_s = 0.0
        self.started = time.monotonic()
        self.marks: list[tuple[int, float]] = []

    def start(self, deadline: float, after_s: float = 0.0) -> None:
        """Training starts now and must end `after_s` before `deadline` (time.monotonic() seconds)."""
        self.deadline, self.after_s = deadline, after_s
        self.started = time.monotonic()
        self.marks = []

    def __call__(self, done: int, elapsed: float) -> int:  # noqa: ARG002
        now = time.monotonic()
        marks = self.marks
        marks.append((done, now))
        del marks[:-REPLAN_WINDOW]
        if len(marks) < 2:
            pace = (now - self.started) / max(done, 1)
        else:
            pace = (marks[-1][1] - marks[0][1]) / max(1, marks[-1][0] - marks[0][0])
        left = self.deadline - self.after_s - now
        n = done + max(0, math.floor(left / max(pace, 1e-6)))
        planned = self.cfg.iterations
        return n if abs(n - planned) > max(1, 0.02 * planned) or n < planned else planned
