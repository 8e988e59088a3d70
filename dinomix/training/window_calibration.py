"""Window calibration: one linear map of a hospital's intensities, fitted on its corrected scans, through which the
new model draws the organs the clinician reviewed (every other organ as before).

Why: another scanner or protocol changes the contrast of every organ at once. Per-organ logit offsets
(training/calibration.py) win back little of that, while one global map of the HU does. On the P1 eval scans under a
simulated contrast change (HU -> 40 + 0.7 (HU - 40)), a map fitted on two corrected scans and vouched for by
leave-one-scan-out gained +3.8 Dice over all 13 organs (all organs reviewed) and +5.3 (minority organs reviewed), and
on the scans' own scanner it kept nothing (benchmarks/window_calibration_design.py, docs/correction-loop.md).

A candidate map is HU -> PIVOT_HU + c (HU - PIVOT_HU) + l (contrast c, level l). Applied before the parent's window
[a_min, a_max] it amounts to a narrower window (`WindowMap.window`). Only maps whose window lies inside the parent's are
offered (c >= 1): they are computed exactly from the image the parent's window gives (`WindowMap.apply`), so the
fine-tune needs no second preprocessing and the model none either (nets/window_routing.py).

The organs nobody reviewed are not drawn through the map: nothing vouches for them, and no label-free check tells a map
that brings back an organ the parent lost under a scanner change from one that erases an organ the parent drew right
(both move the organ away from the parent's drawing: docs/correction-loop.md, "The window calibration in the engine").
So the new model runs its network twice and takes those organs from the parent's pass: they change only where a
reviewed organ now wins over them (`WindowRoutingConfig`, `routing_config`).

Nothing is trained. The map is fitted on the corrected scans, then judged by the hospital's other patients where
there are any: the unlabeled scans of the fine-tune. A map that undoes what a scanner changed shows the network the
intensities it was trained on, so it is surer of itself on every scan of that scanner; a map that only fits the
corrected scans' drawing leaves it less sure on the others (`entropy_change`, `MAX_ENTROPY_CHANGE`). So the map is
kept when the network's entropy over the organs falls on the unlabeled scans and no corrected scan speaks against it
(`MIN_FIT_GAIN` with one, no left-out scan worse with more); without unlabeled scans, when every corrected scan left
out gains on its reviewed organs, as the routed model draws them (`MIN_LOCO_GAIN`), and clearly so on average
(`MIN_LOCO_MEAN_GAIN`). Neither can vouch for every reviewed organ of other patients (in the design folds single
organs went down by 1.5 to 4.7 Dice points on other scans), so a kept map always leaves the new model `unknown`: the
Trainer asks before making it current. A map fitted to one scanner suits that scanner's scans only: on scans of
another source it can cost much more (the TotalSegmentator CTs lost 20 to 33 points of pancreas to a map fitted under
a contrast change).

The search is hand-written: no library fits an intensity transform to a segmentation network's Dice. The entropy check
borrows the idea of test-time adaptation by entropy minimisation (TENT, Wang et al. 2021), as evidence, not as a loss.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..nets.window_routing import WindowRoutingConfig, entropy_change, merge, smoothed
from ..preprocessing.config import IntensityConfig
from .data import CachedCase

PIVOT_HU = 40.0  # soft tissue: a change of contrast keeps it in place
CONTRASTS = (1.15, 1.3, 1.45, 1.6, 1.8, 2.0)  # the design study's grid, above 1 (windows inside the parent's)
LEVELS = (-30.0, 0.0, 30.0)
# Each corrected scan left out gains this much on its reviewed organs' mean Dice with the map fitted on the others (the
# design study's rule: on the scans' own scanner it kept no map in 20 folds, under a contrast change it kept 9 of 10).
# A rule on the left-out scan's worst organ was tried and dropped: in the engine's folds it dropped two maps that did
# no harm on the evaluated scans (esophagus -4.2 and -4.0 on a left-out scan; gains +5.8 and +1.8 there).
MIN_LOCO_GAIN = 1.0
# ... and their mean this much: a map is a scanner's correction, and a scanner change shows on every left-out scan. On
# the eval folds (2026-12-07, the engine's runs of benchmarks/correction_loop.py): under a contrast change the kept
# maps had mean left-out gains of 5.3 to 9.2 and gained +4.6 to +8.2 on the evaluated scans with no organ down by 1;
# under a +30 HU level change 1.5 to 3.6, and they gained +0.5 to +0.8 while costing an organ 2 to 3 points in 2 of
# 4 folds. The gains are over every organ reviewed on the scan, touch-ups the parent already draws at 90 included:
# counting only the organs below 90 kept a map under thicker slices (z blur) for kidneys and left adrenal (left-out
# +2.3, +6.4) that cost the left adrenal 6.3 points on the evaluated scans (docs/correction-loop.md, section "The
# reporter's correction style, thicker slices, and the clinician's wait", "Tried, not kept").
MIN_LOCO_MEAN_GAIN = 4.0
# The fit takes the map nearest the identity among those whose smallest gain over the corrected scans is within this
# share of the best: two scans rank maps of nearly equal gain by chance, and the strongest maps carry worst to other
# patients. On two P1 train scans under a contrast change (tests/training/test_finetune_window.py) the smallest gains of
# the 17 maps lay between 14.9 and 18.3 Dice points (model grid); the best (contrast x2, level -30 HU) cost the adrenals
# of a third patient 11 and 27 points (-3.9 on the reviewed organs), the map this rule takes (x1.3, -30 HU) gained +2.0
# there (docs/correction-loop.md, "The window calibration in the engine").
FIT_SLACK = 0.1
MIN_SCANS = 2  # one scan cannot be left out: from one corrected scan, only unlabeled scans can judge a map
# The map's evidence from the hospital's other patients: the mean, over the unlabeled scans, of the relative change of
# the network's entropy over the voxels drawn as an organ (with or without the map), at most this. Lab study on the
# shipped model, 4 P1 eval scans corrected (30 choices of 1 or 2 of them, 3 correction styles) and 4 P1 train scans
# unlabeled, under 5 simulated scanners (docs/correction-loop.md, "The hospital's other patients judge the window"):
# every map fitted under a contrast change (x0.7, where maps gained +2.1 to +19.4 on the other scans) lowered it by
# 17 to 24 % on average (12 to 15 % over two of the scans); every map fitted on the scans' own scanner, under thicker
# slices or a +30 HU level change (maps that cost an organ up to 20 points) raised it by 2 to 50 %.
MAX_ENTROPY_CHANGE = -0.05
# With one corrected scan and unlabeled scans to judge: the map must fit that scan's corrections this much better.
MIN_FIT_GAIN = 1.0
# Model files made before 2026-12-07 late (judging unsmoothed): each scan the new model segments is drawn through the
# kept map only where its entropy over the organs rises by at most this through it
# (`WindowRoutingConfig.max_entropy_change`, nets/window_routing.py `gated_merge`); other scans are drawn as the parent.
# Same lab study: on the scans of the scanner the maps were fitted for, the change was -52 to +13 % (88 scan-map pairs;
# 1 above +10 %, where the map gained 2.6 Dice points); on the TotalSegmentator CTs (another scanner, where those maps
# cost the left adrenal up to 3.5 points and the pancreas up to 11) +13 to +69 %. A gate of +15 % let one of them
# through (+13 %, pancreas -11 there; benchmark runs of 2026-12-07, evening).
SCAN_GATE = 0.10
# The unlabeled scans' judge looks at each scan smoothed by a Gaussian of this many voxels of the model grid
# (nets/window_routing.py `smoothed`). A map of contrast c amplifies the scan's noise c times, and noise alone makes
# the network less sure of itself: under a lower dose (25 HU of noise) every map raised the entropy by 6 to 80 %, and
# under a lower contrast with that noise the maps that gained +2.4 to +7.6 (worst organ -0.8) raised it by 7 to 50 %,
# so none was kept. Smoothing takes the noise out, but it also blurs the anatomy, and a stronger contrast then
# sharpens it again: judged on scans smoothed by one voxel (the setting until 2026-12-08), two of four unlabeled scans
# alone, or with a third, kept the maps fitted under a +30 HU level change (entropy down to -17 %), which cost the
# esophagus 1.4 to 3.2 points and, in one fold, the left adrenal 8.7. Half a voxel (lab study over 4 unlabeled scans,
# one or two at a time; docs/correction-loop.md, "Half a voxel"): under the level change and on the scans' own
# scanner, a lower dose or thicker slices no map kept (entropy -1 % or more, every scan); lower contrast with noise -7
# to -35 % (every map kept with two unlabeled scans, 101 of 120 choices with one); lower contrast alone -8 to -55 %
# (all).
JUDGE_SMOOTHING_VOX = 0.5
# Each scan the new model segments is judged too (the gate), on the scan smoothed by `GATE_SMOOTHING_VOX`, and drawn
# through the kept map only where its entropy falls as the unlabeled scans' must (`MAX_ENTROPY_CHANGE`). The gate
# judges one scan alone, so it keeps the one voxel: through the maps kept under a lower contrast, with or without
# noise, the scanner's scans fell by 20 to 45 % at one voxel, and the TotalSegmentator CTs (another scanner) rose by 1
# % or more through every map (lab study, 2026-12-07). At half a voxel the TotalSegmentator CTs rose by 15 % or more,
# but so little did some of the scanner's own scans fall (-4 to +1 %) that a third of the benchmark's evaluated scans
# under lower contrast were drawn as the parent (corrected gain lower in 6 of 8 runs, by up to 1.3). Unsmoothed
# (`SCAN_GATE`) the TotalSegmentator CTs had overlapped with the scanner's noisy scans (+11 to +34 %).
GATE_SMOOTHING_VOX = 1.0
SMOOTHED_SCAN_GATE = MAX_ENTROPY_CHANGE


@dataclass(frozen=True)
class WindowMap:
    """HU -> PIVOT_HU + contrast (HU - PIVOT_HU) + level, the map of a hospital's intensities onto the training ones."""

    contrast: float = 1.0
    level: float = 0.0

    @property
    def identity(self) -> bool:
        return self.contrast == 1.0 and self.level == 0.0

    def hu_before(self, hu: float) -> float:
        """The HU of a scan that the map sends to `hu`."""
        return PIVOT_HU + (hu - PIVOT_HU - self.level) / self.contrast

    def window(self, it: IntensityConfig) -> IntensityConfig:
        """The window that applies the map and then `it`: [a_min, a_max] of the raw scan."""
        return it.model_copy(update={"a_min": round(self.hu_before(it.a_min), 3),
                                     "a_max": round(self.hu_before(it.a_max), 3)})

    def inside(self, it: IntensityConfig) -> bool:
        """Whether the new window lies inside `it` (then `apply` is exact on images windowed by `it`)."""
        w = self.window(it)
        return w.a_min >= it.a_min - 1e-6 and w.a_max <= it.a_max + 1e-6

    def apply(self, image: torch.Tensor, it: IntensityConfig) -> torch.Tensor:
        """An image windowed by `it` (clipped to [b_min, b_max]) as the new window gives it; exact when `inside`."""
        assert self.inside(it), "a window wider than the parent's needs the raw scan"
        w = self.window(it)
        span = (it.b_max - it.b_min)
        hu = it.a_min + (image - it.b_min) * ((it.a_max - it.a_min) / span)
        out = it.b_min + (hu - w.a_min) * (span / (w.a_max - w.a_min))
        return out.clamp_(min(it.b_min, it.b_max), max(it.b_min, it.b_max))

    def describe(self) -> str:
        return f"contrast x{self.contrast:g}, level {self.level:+g} HU"


def candidates(it: IntensityConfig) -> list[WindowMap]:
    """The maps tried: the design study's grid, those whose window lies inside the parent's (identity first)."""
    if not it.a_min < PIVOT_HU < it.a_max:
        return [WindowMap()]
    grid = [WindowMap(c, lv) for c, lv in itertools.product(CONTRASTS, LEVELS)]
    return [WindowMap()] + [m for m in grid if m.inside(it)]


def windowed(case: CachedCase, m: WindowMap, it: IntensityConfig) -> CachedCase:
    """The case as the new window preprocesses it (a copy; the label and crop are the same)."""
    if m.identity:
        return case
    return dataclasses.replace(case, image=m.apply(case.image.as_subclass(torch.Tensor).clone(), it))


Predict = Callable[[CachedCase], tuple[torch.Tensor, torch.Tensor]]  # -> (logits (C, ...), argmax)


def cleaned_map(logits: torch.Tensor, pred: torch.Tensor, clean_up) -> np.ndarray:
    """The label map the clinician gets (`calibration.CleanUp`: the parent's own calibrated organs cleaned up against
    the map drawn without its offsets)."""
    labels = pred.numpy().astype(np.uint8)
    if not clean_up.parent_offsets:
        return clean_up(labels)
    back = torch.zeros(logits.shape[0])
    for k, b in clean_up.parent_offsets:
        back[k] = -b
    anchor = (logits.float() + back.view(-1, *([1] * (logits.dim() - 1)))).argmax(0).numpy().astype(np.uint8)
    return clean_up(labels, anchor, [k for k, _ in clean_up.parent_offsets])


def _organ_dice(pred: np.ndarray, case: CachedCase, num_classes: int) -> dict[int, float]:
    """Dice (%) of each organ the scan's correction reviewed and holds."""
    from .calibration import _confusion_np, _dice

    assert case.label is not None
    conf = _confusion_np(pred, case.label.numpy().astype(np.uint8), num_classes)  # [true, predicted]
    scores = {k: _dice(conf, k) for k in range(1, num_classes) if case.annotated[k]}
    return {k: d for k, d in scores.items() if d is not None}


def routing_config(m: WindowMap, it: IntensityConfig, classes: Sequence[int],
                   modes: Optional[Sequence[str]] = None,
                   floors: Optional[dict[int, float]] = None) -> WindowRoutingConfig:
    """The model file's record of a kept map: the organs drawn through it, the map in the units of the model's own
    window (`WindowMap.apply` as x -> clip(scale x + shift)), the modes it applies to (those it was fitted on), the
    scans it applies to (`SMOOTHED_SCAN_GATE`, judged smoothed: `GATE_SMOOTHING_VOX`), and the organs' floors
    (`organ_volumes.window_floor`)."""
    w = m.window(it)
    scale = (it.a_max - it.a_min) / (w.a_max - w.a_min)
    shift = it.b_min * (1.0 - scale) + (it.a_min - w.a_min) * (it.b_max - it.b_min) / (w.a_max - w.a_min)
    return WindowRoutingConfig(contrast=m.contrast, level_hu=m.level, window_hu=(w.a_min, w.a_max), scale=scale,
                               shift=shift, low=min(it.b_min, it.b_max), high=max(it.b_min, it.b_max),
                               classes=sorted(int(k) for k in classes),
                               modes=list(modes) if modes is not None else None,
                               max_entropy_change=SMOOTHED_SCAN_GATE, judge_smoothing_vox=GATE_SMOOTHING_VOX,
                               min_organ_ml=dict(floors) if floors else None)


@dataclass
class WindowCalibration:
    """What the search found: the fitted map, its evidence, and whether it is kept (and why not)."""

    fitted: WindowMap
    classes: list[int]                           # the organs drawn through it: those reviewed on a corrected scan
    fit_gains: list[float] = field(default_factory=list)  # each corrected scan's gain with the fitted map
    loco: list[float] = field(default_factory=list)  # each left-out scan's gain with the map fitted on the others
    loco_worst: list[tuple[float, int]] = field(default_factory=list)  # (change, class) of its worst reviewed organ
    kept: bool = False
    why: str = ""
    tried: int = 0                               # maps tried
    window_hu: tuple[float, float] = (0.0, 0.0)  # the fitted map's window of the raw scan [a_min, a_max]
    entropy: list[float] = field(default_factory=list)  # each unlabeled scan's relative change (`entropy_change`)
    evidence: str = ""                           # what vouched: "unlabeled scans" or "left-out scans" (kept maps)

    @property
    def entropy_mean(self) -> Optional[float]:
        return float(np.mean(self.entropy)) if self.entropy else None

    def evidence_text(self) -> str:
        """What vouched for a kept map, in words."""
        left = ", ".join(f"{g:+.1f}" for g in self.loco)
        if self.evidence != "unlabeled scans":
            return f"{left} Dice points on the corrected scans when each was left out"
        n, change = len(self.entropy), -100.0 * (self.entropy_mean or 0.0)
        return (f"the model is surer of itself through it on your {n} unlabeled scan{'s' if n > 1 else ''} (entropy "
                f"{change:.0f} % lower), and "
                + (f"it gained {left} Dice points on the corrected scans when each was left out" if self.loco else
                   f"it fits your corrected scan {self.fit_gains[0]:+.1f} Dice points better"))

    def as_dict(self, names: Sequence[str]) -> dict:
        return {"contrast": self.fitted.contrast, "level_hu": self.fitted.level, "kept": self.kept, "why": self.why,
                "evidence": self.evidence, "unlabeled_entropy_change": [round(e, 4) for e in self.entropy],
                "organs": [names[k] for k in self.classes], "fit_gains": [round(g, 2) for g in self.fit_gains],
                "loco_gains": [round(g, 2) for g in self.loco],
                "loco_worst_organ": [[round(v, 2), names[k]] for v, k in self.loco_worst],
                "window_hu": list(self.window_hu), "candidates": self.tried}


def _gain(now: dict[int, float], was: dict[int, float]) -> float:
    return float(np.mean([now[k] - was[k] for k in was])) if was else 0.0


def _fit(gains: dict[WindowMap, list[float]], scans: Sequence[int]) -> WindowMap:
    """The map nearest the identity among those whose smallest gain over `scans` is within FIT_SLACK of the best;
    the identity unless one gains."""
    def least(m: WindowMap) -> float:
        return min(gains[m][s] for s in scans)

    top = max(least(m) for m in gains)
    if top <= 0.0:
        return WindowMap()
    near = [m for m in gains if not m.identity and least(m) >= top * (1.0 - FIT_SLACK)]
    return min(near, key=lambda m: (round(abs(m.contrast - 1.0) + abs(m.level) / 100.0, 6), -least(m)))


def routed_logits(parent: torch.Tensor, windowed: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """The logits (C, ...) a window-routed model gives (nets/window_routing.py), from the two passes' logits."""
    every = set(classes) >= set(range(1, parent.shape[0]))
    return windowed.float() if every else merge(parent[None], windowed[None], list(classes))[0]


def search(corrected: list[CachedCase], predict: Predict, clean_up, it: IntensityConfig, names: Sequence[str],
           progress: Callable[[float], None] = lambda f: None,
           check: Callable[[], None] = lambda: None, unlabeled: Sequence[CachedCase] = ()) -> WindowCalibration:
    """Fits a window map on the corrected scans (`predict`: the parent's logits and argmax of a case, on the model
    grid; `names`: class names, background first), scored on the routed model's cleaned-up drawing of the organs
    reviewed on them, and judges it on the `unlabeled` scans (each smoothed, `JUDGE_SMOOTHING_VOX`; the gate judges a
    segmented scan at `GATE_SMOOTHING_VOX`) and by leaving each corrected scan out."""
    num_classes = len(names)
    maps = candidates(it)
    classes = [k for k in range(1, num_classes) if any(case.annotated[k] for case in corrected)]
    dice: list[dict[WindowMap, dict[int, float]]] = [{} for _ in corrected]
    for i, case in enumerate(corrected):
        parent = None
        for j, m in enumerate(maps):  # the identity first: the parent's own drawing
            lg, _ = predict(windowed(case, m, it))
            parent = lg if parent is None else parent
            lg = routed_logits(parent, lg, classes)
            dice[i][m] = _organ_dice(cleaned_map(lg, lg.argmax(0), clean_up), case, num_classes)
            del lg
            progress((i * len(maps) + j + 1) / (len(maps) * len(corrected)))
            check()
    gains = {m: [_gain({k: dice[i][m][k] for k in dice[i][WindowMap()]}, dice[i][WindowMap()])
                 for i in range(len(corrected))] for m in maps}
    everyone = list(range(len(corrected)))
    cal = WindowCalibration(fitted=_fit(gains, everyone), classes=classes, tried=len(maps))
    w = cal.fitted.window(it)
    cal.window_hu = (w.a_min, w.a_max)
    cal.fit_gains = gains[cal.fitted]
    if cal.fitted.identity:
        cal.why = "no window fits your corrections better than the model's own"
        return cal
    if unlabeled:
        for case in unlabeled:
            calm = dataclasses.replace(case, image=smoothed(case.image.as_subclass(torch.Tensor), JUDGE_SMOOTHING_VOX))
            cal.entropy.append(entropy_change(predict(calm)[0], predict(windowed(calm, cal.fitted, it))[0]))
            check()
    for s in everyone if len(corrected) >= MIN_SCANS else []:
        m = _fit(gains, [t for t in everyone if t != s])
        cal.loco.append(gains[m][s])
        base = dice[s][WindowMap()]
        cal.loco_worst.append(min(((dice[s][m][k] - base[k], k) for k in base), default=(0.0, 0)))
    cal.kept, cal.evidence, cal.why = _judge(cal)
    return cal


def _judge(cal: WindowCalibration) -> tuple[bool, str, str]:
    """(kept, what vouched, why not): the unlabeled scans where there are any, else the left-out corrected scans."""
    left = ", ".join(f"{g:+.1f}" for g in cal.loco)
    if cal.entropy:
        change = cal.entropy_mean
        assert change is not None
        if change > MAX_ENTROPY_CHANGE:
            n = len(cal.entropy)
            return False, "", (f"on your {n} unlabeled scan{'s' if n > 1 else ''} the model is not surer of itself "
                               f"through it (entropy {100 * change:+.0f} %, it must fall by "
                               f"{-100 * MAX_ENTROPY_CHANGE:g} %): it fits the corrections, not your scanner")
        if cal.loco and min(cal.loco) < 0.0:
            return False, "", f"a corrected scan left out does worse with it ({left} Dice points)"
        if not cal.loco and min(cal.fit_gains) < MIN_FIT_GAIN:
            return False, "", (f"it fits your corrections only {min(cal.fit_gains):+.1f} Dice points better (it must "
                               f"gain {MIN_FIT_GAIN:+g})")
        return True, "unlabeled scans", ""
    if len(cal.fit_gains) < MIN_SCANS:
        return False, "", (f"fitted on {len(cal.fit_gains)} corrected scan, which cannot be left out to check it (it "
                           "takes 2 corrected scans, or unlabeled scans of the same scanner)")
    if min(cal.loco) < MIN_LOCO_GAIN or float(np.mean(cal.loco)) < MIN_LOCO_MEAN_GAIN:
        return False, "", (f"leave-one-scan-out does not support it ({left} Dice points on the left-out scans; each "
                           f"must gain {MIN_LOCO_GAIN:+g}, and {MIN_LOCO_MEAN_GAIN:+g} on average)")
    return True, "left-out scans", ""
